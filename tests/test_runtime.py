"""`runtime` decides device and precision from what the hardware computes natively: bf16 is only worth it where
the CPU has AMX or AVX512-BF16 (elsewhere a bf16 matmul runs ~70x slower than fp32), and training on a CPU
stays fp32 unless asked."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenbridge.config import ParamsError, RuntimeParams
from tokenbridge.params import load_params
from tokenbridge.runtime import Runtime

ROOT = Path(__file__).parents[1]

# Flags as /proc/cpuinfo lists them (abridged to what matters).
INTEL_SAPPHIRE_RAPIDS = frozenset("avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8".split())
AMD_EPYC_ZEN3 = frozenset("avx2 fma f16c".split())  # no AVX-512 at all
AMD_EPYC_ZEN4 = frozenset("avx2 avx512f avx512bw avx512_bf16".split())
INTEL_SKYLAKE_SERVER = frozenset("avx2 avx512f avx512bw avx512dq".split())  # AVX-512 without its bf16 extension

x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")


@x86_only
@pytest.mark.parametrize("flags, native", [
    (INTEL_SAPPHIRE_RAPIDS, True), (AMD_EPYC_ZEN4, True), (AMD_EPYC_ZEN3, False), (INTEL_SKYLAKE_SERVER, False)])
def test_auto_runs_frozen_models_in_bf16_only_on_cpus_that_compute_it_natively(flags, native):
    runtime = Runtime.resolve(RuntimeParams(device="cpu"), flags)
    assert runtime.inference_dtype == (torch.bfloat16 if native else torch.float32)
    assert not runtime.mixed_bf16, "training on a CPU stays fp32 unless asked"


@x86_only
def test_explicit_precisions_override_the_hardware_decision():
    forced = Runtime.resolve(RuntimeParams(device="cpu", precision="fp32"), INTEL_SAPPHIRE_RAPIDS)
    assert forced.inference_dtype == torch.float32 and not forced.mixed_bf16
    asked = Runtime.resolve(RuntimeParams(device="cpu", precision="bf16-mixed"), AMD_EPYC_ZEN3)
    assert asked.inference_dtype == torch.bfloat16 and asked.mixed_bf16


def test_bf16_mixed_autocasts_the_forward_and_keeps_fp32_weights():
    runtime = Runtime.resolve(RuntimeParams(device="cpu", precision="bf16-mixed"))
    layer = torch.nn.Linear(4, 4)
    with runtime.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_fails_naming_the_fix():
    with pytest.raises(RuntimeError, match="runtime.device: auto or cpu"):
        Runtime.resolve(RuntimeParams(device="cuda"))
    assert Runtime.resolve(RuntimeParams()).device == torch.device("cpu")


def test_a_bad_runtime_value_is_refused_at_load_with_its_path(tmp_path):
    source = (ROOT / "params.yaml").read_text().replace("  precision: auto ", "  precision: bf16 ", 1)
    assert "precision: bf16 " in source
    (tmp_path / "params.yaml").write_text(source)
    with pytest.raises(ParamsError, match="runtime.precision"):
        load_params(tmp_path / "params.yaml")


def test_the_precision_bench_times_both_precisions_on_the_same_step_and_reports_their_ratio(tmp_path):
    """bench/precision.py, the measurement that tells a user whether to ask for bf16-mixed on their CPU (a smoke
    run on tiny shapes: its numbers mean nothing, its report's shape does)."""
    out = tmp_path / "precision.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "precision.py"), "--device", "cpu", "--quick", "--steps", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    seconds = {precision: row["seconds_per_step"] for precision, row in result["steps"].items()}
    assert set(seconds) == {"fp32", "bf16-mixed"} and all(value > 0 for value in seconds.values())
    assert result["fp32_over_bf16_mixed"] == pytest.approx(seconds["fp32"] / seconds["bf16-mixed"])
    assert result["steps"]["fp32"]["terms"].keys() == result["steps"]["bf16-mixed"]["terms"].keys() == {"sft"}
    assert result["native_bf16"] is (Runtime.resolve(RuntimeParams(device="cpu")).inference_dtype == torch.bfloat16), \
        "the bench names the runtime's own decision"
