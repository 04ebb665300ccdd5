"""Where and in what precision every stage computes: `params.runtime`, resolved against the hardware.

- device `auto`: CUDA when present, else the CPU. Every stage asks `Runtime` for its device; nothing
  assumes a CPU.
- Training precision `auto`: on CUDA, bf16 autocast over fp32 master weights and optimizer state
  (`bf16-mixed`); on the CPU, fp32 unless asked.
- Inference dtype (teacher forward, generation): bf16 where the hardware computes it natively, else fp32.
  A CPU's bf16 matmul is only fast with AMX or AVX512-BF16: without them (AMD EPYC before Zen 4, most
  Intel before Cooper Lake) a bf16 matmul runs about 70x slower than fp32, so `auto` means fp32 there.
  On CUDA, bf16 from Ampere on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokenbridge.config import RuntimeParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# CPU feature flags (as /proc/cpuinfo spells them) under which oneDNN runs bf16 matmuls natively.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=4)
def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of `keys`; None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux x86 `flags`, aarch64 `Features`); empty where they cannot be read."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """x86: AMX or AVX512-BF16; aarch64: the `bf16` extension (Graviton 3, Neoverse V1 and later)."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & NATIVE_BF16_CPU_FLAGS)


def resolve_device(requested: str) -> torch.device:
    """`auto`: this process's CUDA device when torch sees one, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch sees no CUDA device (a CPU build of torch, or no GPU "
                           "visible): set runtime.device: auto or cpu, or install torch's CUDA build")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per process


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes bf16 matmuls natively (fast), not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16(flags)


@dataclass(frozen=True)
class Runtime:
    """The resolved `params.runtime`: one device, a training precision and an inference dtype."""

    device: torch.device
    mixed_bf16: bool  # training: bf16 autocast over fp32 weights (else plain fp32)
    inference_dtype: torch.dtype  # frozen models (teacher, evaluation, sampling-only models)
    micro_batch_size: int | None  # examples per forward/backward of one process (None: its whole share)
    gradient_checkpointing: bool
    compile: bool
    strategy: str  # ddp | fsdp, when several processes train

    @classmethod
    def resolve(cls, params: RuntimeParams, flags: frozenset[str] | None = None) -> Runtime:
        device = resolve_device(params.device)
        native = native_bf16(device, flags)
        if params.precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("runtime.precision bf16-mixed: this GPU has no bf16 (before Ampere); use fp32")
        mixed = params.precision == "bf16-mixed" or (params.precision == "auto" and device.type == "cuda" and native)
        if params.precision == "fp32":
            inference = torch.float32
        elif params.precision == "bf16-mixed":
            inference = torch.bfloat16
        else:
            inference = torch.bfloat16 if native else torch.float32
        return cls(device, mixed, inference, params.micro_batch_size, params.gradient_checkpointing, params.compile,
                   params.strategy)

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.mixed_bf16 else "fp32"

    @property
    def inference_dtype_name(self) -> str:
        return str(self.inference_dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training forward's precision context: bf16 autocast, or nothing (fp32)."""
        if not self.mixed_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare_student(self, model: PreTrainedModel) -> PreTrainedModel:
        """Move a trainable model (fp32 master weights) to the device; checkpoint and compile as asked."""
        # transformers wraps `to` in functools.wraps(Module.to), which mypy reads as the unbound method
        model = model.to(self.device)  # type: ignore[arg-type]
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.compile:
            model.get_decoder().compile(dynamic=True)
        return model

    def describe(self) -> dict[str, str | int | bool | None]:
        """What ran where, for metrics files and MLflow."""
        return {"device": self.device.type, "device_name": device_name(self.device), "precision": self.precision,
                "inference_dtype": self.inference_dtype_name, "micro_batch_size": self.micro_batch_size,
                "gradient_checkpointing": self.gradient_checkpointing, "compile": self.compile,
                "strategy": self.strategy}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """The machine beside a reported number: the device's model (the CPU's, as lscpu names it), architecture,
    cores and memory."""
    import psutil

    return (f"{device_name(device)}, {platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB")
