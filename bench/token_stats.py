"""Benchmark: chunked next-token statistics vs a naive full-vocabulary log-softmax (forward + backward).

Each variant runs in its own subprocess so peak RSS is its own; the report gives the ratios against the
naive baseline measured in the same run. On CUDA (`--device`, as `runtime.device`) peak memory is the step's
`torch.cuda.max_memory_allocated` above what was allocated before it.
Usage: python bench/token_stats.py [--vocab 262144] [--length 512] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _variant(name: str, batch: int, length: int, hidden: int, vocab: int, chunk: int, device: str) -> dict:
    import torch

    from tokenbridge.config import RuntimeParams
    from tokenbridge.losses.token_stats import next_token_stats
    from tokenbridge.runtime import Runtime

    torch.manual_seed(0)
    torch.set_default_device(Runtime.resolve(RuntimeParams(device=device, precision="fp32")).device)
    cuda = torch.get_default_device().type == "cuda"
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(batch, length, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, length))
    boundary = torch.rand(vocab) < 0.3
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 1024 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if name == "naive":
        log_probs = head(states).float().log_softmax(-1)
        token = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        on_boundary = torch.logsumexp(log_probs.masked_fill(~boundary, float("-inf")), -1)
        loss = -(token.sum() + on_boundary.sum())
    else:
        stats = next_token_stats(states, ids, head, vocab, boundary, chunk_size=chunk)
        loss = -(stats.token_logprobs.sum() + stats.boundary_logprobs.sum())
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": name, "seconds": seconds, "peak_extra_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as runtime.device")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.hidden, args.vocab, args.chunk, args.device)
    if args.variant:
        print(json.dumps(_variant(args.variant, *shape)))
        return
    results = {}
    for name in ("naive", "chunked"):
        flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "variant"]
        command = [sys.executable, __file__, "--variant", name, *flags]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    print(f"shape B={args.batch} T={args.length} d={args.hidden} V={args.vocab}, chunk={args.chunk}")
    for name, result in results.items():
        print(f"  {name:8s} {result['seconds']:7.2f} s   peak +{result['peak_extra_mib']:8.0f} MiB")
    naive, chunked = results["naive"], results["chunked"]
    print(f"  chunked/naive: time x{chunked['seconds'] / naive['seconds']:.2f}, "
          f"peak memory x{chunked['peak_extra_mib'] / naive['peak_extra_mib']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()
