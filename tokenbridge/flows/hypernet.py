"""Stage `hypernet`: train an embedding hypernetwork (ZeTT) for the `hypernet.base` role's model, with ALM against
that model on its own tokenizer, on tokenizers sampled from a pool trained on the training text; log it to MLflow
and register it as `tracking.registered_hypernet`. docs/hypernet.md.

Inputs: data/prepared (texts), models/<hypernet.base>; params `hypernet.*`, `runtime.*`. Outputs: models/hypernet/
(hypernet.pt, hypernet.json, pool/<name>/, heldout_tokenizer/), metrics/hypernet.csv, metrics/hypernet.json,
and, beside them (no DVC output), checkpoints/hypernet/<phase>/: a rerun resumes.
Run alone: tokenbridge hypernet   (or: dvc repro hypernet)

Apply it (seconds; no training):
  tokenbridge hypernet apply --tokenizer DIR --out DIR
writes a HF model directory: the base model on the tokenizer in DIR (any HF tokenizer directory), its rows
predicted by the hypernetwork, special tokens on their base rows; transformers and lm-eval load it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow

from tokenbridge import tracking
from tokenbridge.config import ParamsError
from tokenbridge.contracts import HypernetMetrics
from tokenbridge.flows.common import stage_cli, tracked_stage
from tokenbridge.models.hypernet import load_hypernet
from tokenbridge.models.retokenize import retokenized_model
from tokenbridge.params import load_params
from tokenbridge.paths import (
    HYPERNET_CHECKPOINT_DIR,
    HYPERNET_DIR,
    HYPERNET_HISTORY,
    HYPERNET_METRICS,
    PREPARED_DIR,
    ROLE_DIRS,
)
from tokenbridge.runtime import Runtime
from tokenbridge.stages.hypernet import hypernet_metrics, train_hypernet


@flow(name="hypernet", log_prints=True)
def hypernet(params_file: str = "params.yaml") -> HypernetMetrics:
    with tracked_stage("hypernet", params_file, ("hypernet", "runtime")) as params:
        base_dir = ROLE_DIRS[params.hypernet.base]
        runtime = Runtime.resolve(params.runtime)
        print(f"hypernet: for {base_dir} on {runtime.device}")
        card = train_hypernet(PREPARED_DIR, base_dir, HYPERNET_DIR, HYPERNET_HISTORY, params.hypernet, runtime,
                              HYPERNET_CHECKPOINT_DIR)
        metrics = hypernet_metrics(card)
        metrics.write(HYPERNET_METRICS)
        tracking.log_metrics(metrics.model_dump(exclude_none=True))
        tracking.log_artifact(HYPERNET_HISTORY)
        module = load_hypernet(HYPERNET_DIR, card.width, card.layers, card.heads, card.max_pieces)
        version = tracking.register_hypernet(module, HYPERNET_DIR, params.tracking.registered_hypernet,
                                             {"base_model": card.base.name,
                                              "base_tokenizer_sha256": card.base.tokenizer_sha256,
                                              "pool": ", ".join(card.pool), "heldout": card.heldout})
        print(f"hypernet: registered {params.tracking.registered_hypernet} version {version}")
        return metrics


def apply(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tokenbridge hypernet apply",
                                     description="Move the hypernetwork's base model onto a tokenizer, zero-shot.")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a HF tokenizer (or model) directory")
    parser.add_argument("--out", required=True, type=Path, help="where to write the HF model directory")
    parser.add_argument("--hypernet", type=Path, default=HYPERNET_DIR, help=f"default: {HYPERNET_DIR}")
    parser.add_argument("--base", type=Path, help="the base model's directory (default: params hypernet.base's)")
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    if not (args.tokenizer / "tokenizer.json").exists():
        parser.error(f"--tokenizer {args.tokenizer} holds no tokenizer.json: give a HF tokenizer or model directory")
    try:
        params = load_params(Path(args.params))
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    base = args.base or ROLE_DIRS[params.hypernet.base]
    started = time.perf_counter()
    counts = retokenized_model(base, args.tokenizer, args.out, "hypernet", params.hypernet.seed, args.hypernet)
    print(f"hypernet apply: wrote {args.out} in {time.perf_counter() - started:.1f} s ({counts})")


def main(argv: list[str]) -> None:
    if argv[:1] == ["apply"]:
        apply(argv[1:])
    else:
        stage_cli(hypernet, __doc__, argv)
