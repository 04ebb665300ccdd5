"""Benchmark: one training step (forward + backward) of every registered loss, as time and peak-memory ratios
to plain next-token cross-entropy, at several vocabulary sizes, in one run.

The baseline is what a user would write without us: a full fp32 `log_softmax` over [B, T, V], a gather of
the target tokens and a mean. Every loss step includes what a real step adds on the student side: the
chunked next-token statistics (`next_token_stats`) behind `StudentView`; the registered `sft` row is that
plus the cross-entropy on them, our chunked equivalent of the baseline.

Synthetic inputs (not timed, not counted): the student is leaf hidden states [B, T, d] with a gradient and
an `nn.Linear(d, V)` head whose weight is trained, so every row includes its [V, d] fp32 weight gradient.
Teacher and student share the tokenizer: identical input ids, the same V, teacher hidden size = d. The
teacher is offline (stored top-k, k = 64, plus its token and boundary log-probs, computed in chunks during
setup) for every loss that accepts stored data, and live (hidden states + head; its token and boundary
log-probs also computed during setup, as the training loop does before the loss) for `dskd` and
`reverse_kl`. ALM and MinED get the identity pairing (chunk c = token c + 1, every chunk after the prompt a
target).

`--device cuda` (or `auto` on a GPU machine) runs every step on the GPU, under `--precision` as training would
(`runtime.precision`: bf16-mixed autocasts the head); there peak memory is `torch.cuda.max_memory_allocated`
during the step minus what was allocated before it, and time is wall time after a synchronize.

Each (loss, V) measurement runs in its own subprocess. On the CPU, after setup the process's peak-RSS mark is reset
(`/proc/self/clear_refs`), so the reported peak is the step's own: VmHWM after the step minus VmRSS before it.
glibc is told to return every freed block of 1 MiB or more to the system (`MALLOC_MMAP_THRESHOLD_`): by
default blocks under its adaptive threshold (up to 32 MiB) stay in the heap once freed, so RSS would depend
on whether a slice's tensors happen to fall under it, and on what setup left behind, rather than on what the
step holds. Time is the step's process CPU time (user + sys, all threads; wall time is kept too): on a
machine shared with other work it varies much less than wall time.

The report is a Markdown table of ratios to the naive CE measured in the same run (rows: losses; per V: time
and peak memory), the naive CE's absolute numbers above it, and each step's peak against the promise that
no loss needs more than one fp32 B x T x V tensor at a time.
Usage: python bench/losses.py [--vocab 49152 151936 262144] [--length 256] [--batch 2] [--losses sft alm]
       [--json results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenbridge.losses.registry  # noqa: E402,F401  (registers every loss)
from tokenbridge.config import RuntimeParams  # noqa: E402
from tokenbridge.contracts import MODEL_CARD, ModelCard  # noqa: E402
from tokenbridge.losses.base import LOSSES, Alignment, LossSetup, StudentView, TeacherView  # noqa: E402
from tokenbridge.losses.registry import build_losses  # noqa: E402
from tokenbridge.losses.token_stats import next_token_stats, truncated_next_token_stats  # noqa: E402
from tokenbridge.params import DistillParams  # noqa: E402
from tokenbridge.runtime import Runtime  # noqa: E402

BASELINE = "naive_ce"
DEFAULT_VOCABS = (49152, 151936, 262144)
TOP_K = 64
THREADS = 2
MMAP_THRESHOLD = 2**20  # bytes: freed blocks this large go back to the system at once
MIB = 2**20


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak since the reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM the current RSS, so the next reading is the step's own peak (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class SyntheticModel(torch.nn.Module):
    """Just the parts a loss may touch: input embeddings (DSKD's index embeddings) and the output head."""

    config = SimpleNamespace(final_logit_softcapping=None)

    def __init__(self, vocab: int, hidden_size: int) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, hidden_size)
        self.lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def _model_dirs(root: Path, vocab: int, hidden: int) -> tuple[Path, Path]:
    """Two model dirs holding what losses read from `LossSetup`'s dirs: a Llama config (DSKD: hidden sizes)
    and a model card (MinED: the tokenizer size, its identity mapping on one shared tokenizer)."""
    dirs = []
    for name in ("teacher", "student"):
        path = root / name
        LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                    num_attention_heads=1, num_key_value_heads=1).save_pretrained(path)
        ModelCard(name=f"bench-{name}", tokenizer_sha256="0" * 64, tokenizer_size=vocab,
                  parameters=0).write(path / MODEL_CARD)
        dirs.append(path)
    return dirs[0], dirs[1]


def _measure(name: str, batch: int, length: int, hidden_size: int, vocab: int, chunk: int, runtime: Runtime) -> dict:
    """One forward + backward of `name` in this process: seconds and the step's peak extra memory (RSS on the
    CPU, allocated device memory on CUDA)."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    torch.set_default_device(runtime.device)
    cuda = runtime.device.type == "cuda"
    student_model = SyntheticModel(vocab, hidden_size)
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, length))
    prompt = max(1, length // 8)
    loss_mask = (torch.arange(length) >= prompt).expand(batch, length).clone()
    boundary = torch.rand(vocab) < 0.3

    # First-call allocations (thread pools, kernel workspaces) belong to the process, not to the step.
    student_model.lm_head(hidden[:, :1]).sum().backward()
    student_model.zero_grad(set_to_none=True)
    hidden.grad = None

    with tempfile.TemporaryDirectory(prefix="bench_losses_") as work:
        step = (_naive_step(student_model, hidden, input_ids) if name == BASELINE
                else _loss_step(name, student_model, hidden, input_ids, loss_mask, boundary, chunk, prompt, Path(work)))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 1024
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what setup freed, so the baseline is what is live
            _reset_peak_rss()
            before = _status_kib("VmRSS")
        started, cpu_started = time.perf_counter(), time.process_time()
        with runtime.autocast():
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        peak = torch.cuda.max_memory_allocated() / 1024 if cuda else _status_kib("VmHWM")
    # On CUDA, CPU time means nothing: the ratios use wall time there.
    return {"loss": name, "vocab": vocab, "seconds": seconds, "cpu_seconds": seconds if cuda else cpu_seconds,
            "peak_extra_mib": (peak - before) / 1024, "device": runtime.describe()["device_name"]}


def _naive_step(student_model: SyntheticModel, hidden: torch.Tensor, input_ids: torch.Tensor
                ) -> Callable[[], None]:
    """Plain next-token cross-entropy as a user would write it: a full fp32 [B, T, V] log-softmax."""

    def step() -> None:
        log_probs = student_model.lm_head(hidden).float().log_softmax(-1)
        token = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        (-token.mean()).backward()

    return step


def _loss_step(name: str, student_model: SyntheticModel, hidden: torch.Tensor, input_ids: torch.Tensor,
               loss_mask: torch.Tensor, boundary: torch.Tensor, chunk: int, prompt: int,
               work: Path) -> Callable[[], None]:
    """Setup for a registered loss (teacher signals, views, alignment, model dirs under `work`; not measured)
    and its step."""
    batch, length, hidden_size = hidden.shape
    vocab = student_model.lm_head.out_features
    teacher_model = SyntheticModel(vocab, hidden_size).requires_grad_(False)
    teacher_hidden = torch.randn(batch, length, hidden_size)
    params = DistillParams(teacher_mode="online", steps=1, batch_size=batch, learning_rate=1e-4, checkpoint_every=1)
    loss_class = LOSSES[name]
    live = loss_class.needs_online_teacher or loss_class.needs_full_teacher(loss_class.params_in(params))
    with torch.no_grad():
        stored = (next_token_stats(teacher_hidden, input_ids, teacher_model.lm_head, vocab, boundary, chunk_size=chunk)
                  if live else truncated_next_token_stats(teacher_hidden, input_ids, torch.ones_like(input_ids),
                                                          teacher_model, vocab, boundary, 1.0, TOP_K, 1.0))
    attention_mask = torch.ones_like(input_ids)
    common = dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                  token_logprobs=stored.token_logprobs, boundary_logprobs=stored.boundary_logprobs, vocab_size=vocab)
    if live:
        teacher = TeacherView(**common, truncation=params.teacher, model=teacher_model, hidden=teacher_hidden,
                              head=teacher_model.lm_head)
    else:
        teacher = TeacherView(**common, truncation=params.teacher, topk_ids=stored.topk_ids,
                              topk_logprobs=stored.topk_logprobs)

    chunk_ids = (torch.arange(length) - 1).expand(batch, length).clone()  # token 0 starts no chunk
    alignment = Alignment(teacher_chunks=chunk_ids, student_chunks=chunk_ids.clone(),
                          chunk_is_target=(torch.arange(1, length) >= prompt).expand(batch, length - 1).clone(),
                          teacher_word_start=torch.rand(batch, length) < 0.3,
                          student_word_start=torch.rand(batch, length) < 0.3)

    teacher_dir, student_dir = _model_dirs(work, vocab, hidden_size)
    setup = LossSetup(teacher_dir=teacher_dir, student_dir=student_dir, same_tokenizer=True, cache_dir=work / "cache")
    loss = build_losses([name], params, setup)[name]

    def step() -> None:
        # As in the training loop: boundary log-probs only for a loss that reads them, and the view stays alive
        # through the backward pass.
        stats = next_token_stats(hidden, input_ids, student_model.lm_head, vocab,
                                 boundary if loss.needs_student_boundary else None, chunk_size=chunk)
        student = StudentView(model=student_model, hidden=hidden, head=student_model.lm_head, vocab_size=vocab,
                              input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                              token_logprobs=stats.token_logprobs, boundary_logprobs=stats.boundary_logprobs,
                              chunk_size=chunk)
        loss(student, teacher, alignment).loss.backward()

    return step


def _machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return (f"{platform.machine()} ({models[0] if models else 'unknown CPU'}), {os.cpu_count()} cores, "
            f"{ram:.1f} GiB RAM; torch {torch.__version__}, {THREADS} threads")


def _run_one(name: str, vocab: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--measure", name, "--vocab", str(vocab), "--length", str(args.length),
               "--batch", str(args.batch), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
               "--device", args.device, "--precision", args.precision]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"loss": name, "vocab": vocab, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio_cells(result: dict, baseline: dict) -> str:
    if "error" in result or "error" in baseline:
        return "failed | failed"
    return (f"{result['cpu_seconds'] / baseline['cpu_seconds']:.2f} | "
            f"{result['peak_extra_mib'] / max(baseline['peak_extra_mib'], 1e-9):.2f}")


def _report(results: dict[int, dict[str, dict]], args: argparse.Namespace, names: list[str]) -> list[str]:
    vocabs = list(results)
    lines = [f"Shape: B={args.batch} T={args.length} d={args.hidden}, chunk={args.chunk}, teacher top-k={TOP_K}.",
             "Naive CE (full fp32 log_softmax + gather + mean, forward + backward): " + "; ".join(
                 f"V={v}: {results[v][BASELINE]['cpu_seconds']:.2f} CPU s ({results[v][BASELINE]['seconds']:.2f} s "
                 f"wall), +{results[v][BASELINE]['peak_extra_mib']:.0f} MiB"
                 if "error" not in results[v][BASELINE] else f"V={v}: failed" for v in vocabs),
             "time x: ratio of process CPU time (user + sys, all threads), which other load on the machine disturbs "
             "less than wall time; peak x: ratio of the step's peak extra RSS.", ""]
    lines.append("| loss | " + " | ".join(f"time x (V={v}) | peak x (V={v})" for v in vocabs) + " |")
    lines.append("|---|" + "---:|---:|" * len(vocabs))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_ratio_cells(results[v][name], results[v][BASELINE]) for v in vocabs)
                     + " |")

    lines += ["", "Memory promise (no loss needs more than one fp32 B x T x V tensor at a time): "
              "each step's peak extra RSS in units of one fp32 B x T x V tensor; flagged when above one such tensor "
              "plus the head's [V, d] fp32 weight gradient, which every step also holds:"]
    for v in vocabs:
        full_mib = args.batch * args.length * v * 4 / MIB
        grad_mib = v * args.hidden * 4 / MIB
        units = {n: r["peak_extra_mib"] / full_mib for n, r in results[v].items() if "error" not in r}
        lines.append(f"- V={v} (B x T x V fp32 = {full_mib:.0f} MiB; head gradient = {grad_mib / full_mib:.2f} of it): "
                     + ", ".join(f"{n} {x:.2f}" for n, x in units.items()))
        over = [n for n, x in units.items() if x > 1 + grad_mib / full_mib and n != BASELINE]
        if over:
            lines.append(f"  above one B x T x V tensor plus the head gradient: {', '.join(over)}")
    failures = [r for v in vocabs for r in results[v].values() if "error" in r]
    if failures:
        lines += ["", "Failed:"] + [f"- {r['loss']} at V={r['vocab']}: {r['error']}" for r in failures]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=list(DEFAULT_VOCABS), help="vocabulary sizes")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (T)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (B)")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size of both models (d)")
    parser.add_argument("--chunk", type=int, default=128, help="positions per slice of any vocabulary projection")
    parser.add_argument("--losses", nargs="+", help="registered loss names (default: all)")
    parser.add_argument("--json", type=Path, help="also save the raw numbers here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as runtime.device")
    parser.add_argument("--precision", choices=("auto", "bf16-mixed", "fp32"), default="auto",
                        help="as runtime.precision (training's: auto is bf16 autocast on CUDA, fp32 on a CPU)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        runtime = Runtime.resolve(RuntimeParams(device=args.device, precision=args.precision))
        print(json.dumps(_measure(args.measure, args.batch, args.length, args.hidden, args.vocab[0], args.chunk,
                                  runtime)))
        return

    available = ["sft", *(name for name in LOSSES if name != "sft")]  # our chunked CE first, for reference
    names = args.losses or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; registered: {', '.join(available)}")
    print(f"Machine: {_machine()}; load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    results: dict[int, dict[str, dict]] = {}
    for vocab in args.vocab:
        results[vocab] = {}
        for name in [BASELINE, *names]:
            results[vocab][name] = _run_one(name, vocab, args)
            print(f"  measured {name} at V={vocab}", file=sys.stderr, flush=True)
    print("\n".join(_report(results, args, names)))
    print(f"\nWall time of the whole run: {time.perf_counter() - started:.0f} s; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine(), "shape": {k: getattr(args, k) for k in (
            "batch", "length", "hidden", "chunk")}, "top_k": TOP_K, "results": {
            str(v): list(r.values()) for v, r in results.items()}}, indent=2))
    if any("error" in r for v in results.values() for r in v.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
