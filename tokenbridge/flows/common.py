"""What every stage flow shares: a `--help`-able command line and a tracked stage context."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect import Flow

from tokenbridge import stopping, tracking
from tokenbridge.config import ParamsError, RuntimeParams
from tokenbridge.params import PipelineParams, load_params
from tokenbridge.stopping import Stopped


@contextlib.contextmanager
def tracked_stage(name: str, params_file: str, sections: tuple[str, ...]) -> Iterator[PipelineParams]:
    """Load params and open the stage's MLflow run, logging the params sections the stage reads."""
    params = load_params(Path(params_file))
    stopping.install()  # again: Prefect's flow engine puts in its own SIGTERM handler, which stops at any point
    logged = {section: getattr(params, section).model_dump() for section in sections}
    with tracking.stage_run(name, params.tracking.experiment, params.profile, logged):
        yield params


def stage_cli(flow: Callable[..., object], doc: str | None, argv: list[str], **options: dict) -> None:
    """`tokenbridge <stage> [--params FILE] [--OPTION ...]`: check params and servers before any work, then run the
    flow, stoppable by SIGTERM or SIGINT, on the Prefect API Prefect's settings name, else on one of its own.

    Each keyword names an extra flow argument and gives its `argparse.add_argument` settings; a multi-word one is
    spelt with dashes on the command line (`render_only`: `--render-only`).
    """
    parser = argparse.ArgumentParser(prog=f"tokenbridge {flow.__module__.rsplit('.', 1)[-1]}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for name, settings in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **settings)
    args = parser.parse_args(argv)
    check_before_work(args.params)
    children_die_with_this_process()
    # A Prefect flow gets one API server that the processes it starts share (the stages of a compare or claim sweep);
    # a plain function (a training rank under torchrun) runs outside Prefect.
    with one_prefect_api() if isinstance(flow, Flow) else contextlib.nullcontext():
        run_stoppable(lambda: flow(params_file=args.params, **{name: getattr(args, name) for name in options}))


def check_before_work(params_file: str) -> None:
    """Exit 2, naming the fix, unless params are valid and the configured servers answer: before any work."""
    try:
        load_params(Path(params_file))
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    stale = _dvc_yaml_gaps(Path(params_file))
    if stale:
        print(f"dvc.yaml is out of date for {params_file}, so DVC would not see these inputs:\n  "
              + "\n  ".join(stale) + "\nFix: regenerate it with `python -m tokenbridge.dvc_stages` (or "
              "`make dvc.yaml`), then rerun", file=sys.stderr)
        sys.exit(2)
    unreachable = tracking.unreachable_servers()
    if unreachable:
        print("\n".join(unreachable), file=sys.stderr)
        sys.exit(2)


def _dvc_yaml_gaps(params_file: Path) -> list[str]:
    """What the project's dvc.yaml lacks for `params_file` (nothing when there is no dvc.yaml beside it).
    dvc_stages is imported by name: this check shapes no output, so it is no code dep of every stage."""
    dvc_file = params_file.parent / "dvc.yaml"
    if not dvc_file.is_file():
        return []
    return importlib.import_module("tokenbridge.dvc_stages").missing_entries(params_file, dvc_file)


# Run beside a stage or pipeline process: remembers its descendants while it lives and stops them when it ends.
_WATCHDOG = """
import contextlib, os, sys, time, psutil
owner, seen = psutil.Process(int(sys.argv[1])), {}
with contextlib.suppress(psutil.Error):
    while owner.is_running() and owner.status() != psutil.STATUS_ZOMBIE:
        seen.update({child.pid: child for child in owner.children(recursive=True) if child.pid != os.getpid()})
        time.sleep(0.5)
left = [child for child in seen.values() if child.is_running()]
for child in left:
    with contextlib.suppress(psutil.Error):
        child.terminate()
for child in psutil.wait_procs(left, timeout=5)[1]:
    with contextlib.suppress(psutil.Error):
        child.kill()
"""


def children_die_with_this_process() -> None:
    """Make the processes this one starts (Prefect's temporary API server, `dvc repro` under the pipeline) end
    with it, kill -9 included: nothing runs in a killed process to stop them, so a small watchdog does, from
    outside. (psutil's `is_running` also checks the start time, so a reused pid is never hit.)"""
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_stoppable(work: Callable[[], object]) -> None:
    """Run `work`; SIGTERM or SIGINT stops it (`tokenbridge.stopping`) with the shell's exit code for that signal."""
    stopping.install()
    try:
        work()
    except Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)


def torchrun_command(runtime: RuntimeParams, stage: str, argv: list[str], environ: dict[str, str]) -> list[str] | None:
    """The torchrun command that runs `tokenbridge stage argv` as `runtime`'s processes; None for one process.
    Several machines each run it with MASTER_ADDR, MASTER_PORT and NODE_RANK set (docs/distributed.md)."""
    if runtime.processes_per_node * runtime.nodes == 1:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(runtime.processes_per_node)]
    if runtime.nodes == 1:
        command.append("--standalone")
    else:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in environ]
        if missing:
            raise ParamsError(f"runtime.nodes is {runtime.nodes}: set {', '.join(missing)} on every machine "
                              "(the first machine's address and a free port; this machine's index from 0)")
        command += ["--nnodes", str(runtime.nodes), "--node-rank", environ["NODE_RANK"],
                    "--master-addr", environ["MASTER_ADDR"], "--master-port", environ["MASTER_PORT"]]
    return [*command, "-m", "tokenbridge", stage, *argv]


def launch_processes(stage: str, argv: list[str]) -> None:
    """Replace this process by torchrun running the same command when params ask for several training processes
    (so `dvc repro` needs no other command); under torchrun already, or for one process, return."""
    if "LOCAL_RANK" in os.environ:
        return
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    try:
        runtime = load_params(Path(parser.parse_known_args(argv)[0].params)).runtime
        command = torchrun_command(runtime, stage, argv, dict(os.environ))
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    if command is not None:
        print("launching:", " ".join(command), flush=True)
        os.execv(command[0], command)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, chosen by the OS (for a server this process starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def one_prefect_api() -> Iterator[None]:
    """One temporary Prefect API server for this process and every process it starts (they inherit its URL), rather
    than one started in each; nothing to do when Prefect's settings name a server already (PREFECT_API_URL, in the
    environment or the active Prefect profile).

    The port comes from the OS. Prefect's own choice is random in 8000-8999 and checked free before its server
    binds; two processes starting at once can pick the same one, and the loser's health check then passes on the
    winner's server and its flows fail when that server stops."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.events.worker import EventsWorker  # the server's modules take seconds to import: only when needed
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=free_port())
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        del os.environ["PREFECT_API_URL"]
        # Send the logs and events this process still holds while their server is up, as Prefect's test harness does.
        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
        server.stop()
