"""The files stages hand each other, one pydantic model per file: written and validated on read here only, so a
stage never trusts a dict another stage left behind.

Each manifest and model card carries its `format` (`tokenbridge.<file>/v<N>`); a file of another format, an
older one or a foreign one, fails on read naming its path, what is wrong and the `dvc repro` that rebuilds it.
Metrics files stay flat numbers for `dvc metrics` (no format field): their models forbid unknown keys instead,
and each score declares its direction, which the report and the Model Registry read from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from tokenbridge.io import write_json

MODEL_CARD = "tokenbridge.json"  # in every model directory
MANIFEST = "manifest.json"  # in data/prepared and data/teacher_logits
ANSWERS = "answers.jsonl"  # in data/teacher_answers and data/original_answers/<source>: greedy answers
# A training history's held-out learning curve: columns `heldout_<score>` (an evaluation score: bits_per_byte,
# teacher_answers_bits_per_byte, original_answers_bits_per_byte) at some steps, with `_low` and `_high` (its 95 %
# bootstrap interval); empty at the other steps (tokenbridge/evaluation/curve.py).
HELDOUT = "heldout_"
SCORE_AND_INTERVAL = ("", "_low", "_high")  # the suffixes of a score, then of its 95 % interval's ends
TEACHER_LOGITS_FORMAT: Literal["tokenbridge.teacher_logits/v2"] = "tokenbridge.teacher_logits/v2"
Better = Literal["lower", "higher"]


class ContractError(ValueError):
    """A stage's input file is missing, unreadable, or not what this version writes."""


class FileContract:
    """A file one stage writes and others read. `WRITTEN_BY` names the DVC stage that rebuilds it."""

    WRITTEN_BY: ClassVar[str]

    @classmethod
    def read(cls, path: Path) -> Self:
        model = cast(type[BaseModel], cls)  # every contract is also a pydantic model
        path = Path(path)
        stage = cls.writer_of(path)
        if not path.exists():
            raise ContractError(f"{path} is missing: the '{stage}' stage writes it; run 'dvc repro {stage}'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ContractError(f"{path} cannot be read ({error}): rebuild it with 'dvc repro {stage}'") from error
        expected = model.model_fields["format"].default if "format" in model.model_fields else None
        if expected is not None and (not isinstance(data, dict) or data.get("format") != expected):
            found = data.get("format") if isinstance(data, dict) else None
            age = "has no format field (an older tokenbridge wrote it)" if found is None else f"is in format {found!r}"
            raise ContractError(f"{path} {age}; this version reads {expected!r}: rebuild it with 'dvc repro {stage}'")
        try:
            return cast(Self, model.model_validate(data))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'file'}: {item['msg']}"
                                 for item in error.errors())
            raise ContractError(f"{path} is not a valid {cls.__name__} ({problems}): it comes from another "
                                f"version or was edited by hand; rebuild it with 'dvc repro {stage}'") from None

    @classmethod
    def writer_of(cls, path: Path) -> str:
        return cls.WRITTEN_BY

    def write(self, path: Path) -> None:
        """Atomically, without the optional fields this file does not have."""
        write_json(path, self.model_dump(exclude_none=True))  # type: ignore[attr-defined]


class Record(BaseModel):
    """A part of a contract file: unknown keys are errors (a foreign file fails), values never change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Contract(FileContract, Record):
    """A whole file that is one JSON object."""


# ---------------------------------------------------------------------------------------------- model card

class TransferTraining(Record):
    """The transfer stage's self-distillation of one source (also in metrics/transfer.json)."""

    steps: int
    final_loss: float | None = Field(None, json_schema_extra={"better": "lower"})  # None: no steps
    first_loss: float | None = None
    examples: int
    median_seconds_per_step: float | None = Field(None, json_schema_extra={"better": "lower"})


class ModelCard(Contract):
    """`tokenbridge.json` in a model directory: what the model is and which tokenizer it speaks. The stage that
    wrote the directory adds where the model came from (distilled, transferred, an ensemble)."""

    WRITTEN_BY: ClassVar[str] = "models"
    # Which stage writes a model directory, by its path under the project (models/teacher, models/student: models).
    WRITERS: ClassVar[dict[str, str]] = {"models/distilled": "distill", "models/ensemble": "ensemble",
                                         "models/transferred": "transfer", "models/sources": "transfer",
                                         "models/hypernet_eval": "evaluate_hypernet"}

    format: Literal["tokenbridge.model_card/v1"] = "tokenbridge.model_card/v1"
    name: str
    spec: dict[str, Any] | None = None  # the models stage: the params.yaml spec it was built from
    tokenizer_sha256: str
    tokenizer_size: int
    parameters: int
    eos_token: str | None = None
    distilled_from: str | None = None  # distill: the student's name, and the loss terms it trained with
    loss: list[str] | None = None
    transferred_from: str | None = None  # transfer: the source's name, FVT's counts, whether it is byte-level
    fvt: dict[str, int] | None = None
    hypernet: dict[str, int] | None = None  # transfer from a hypernetwork's rows: its counts (special, predicted, ...)
    byte_level: bool | None = None
    fingerprint: str | None = None  # transfer: the configuration a finished training belongs to
    training: TransferTraining | None = None
    transfer: dict[str, Any] | None = None
    members: dict[str, str] | None = None  # ensemble: member -> model name, and their weights
    weights: dict[str, float] | None = None

    @classmethod
    def writer_of(cls, path: Path) -> str:
        text = Path(path).as_posix()
        return next((stage for prefix, stage in cls.WRITERS.items() if prefix in text), cls.WRITTEN_BY)

    @classmethod
    def of(cls, model_dir: Path) -> ModelCard:
        """The card of a model directory."""
        return cls.read(Path(model_dir) / MODEL_CARD)


# ---------------------------------------------------------------------------------------------- prepared data

T = TypeVar("T")


class PerRole(Record, Generic[T]):
    teacher: T
    student: T


class SplitSummary(Record):
    examples: int
    dropped_too_long: int
    dropped_unalignable: int  # a model's chat template or tokenizer cannot keep the content byte for byte
    tokens: PerRole[int]
    sha256: PerRole[str]  # of `<split>.<role>.jsonl`: what downstream stages key their saved progress on


class Splits(Record):
    train: SplitSummary
    test: SplitSummary


class ModelRef(Record):
    name: str
    tokenizer_sha256: str


class PreparedManifest(Contract):
    """data/prepared/manifest.json: the splits both models' tokenizations were written for."""

    WRITTEN_BY: ClassVar[str] = "prepare"
    format: Literal["tokenbridge.prepared/v1"] = "tokenbridge.prepared/v1"
    source: str
    splits: Splits
    models: PerRole[ModelRef]


class TeacherAnswersManifest(Contract):
    """data/teacher_answers/manifest.json: beside answers.jsonl, the teacher's greedy answers to test questions."""

    WRITTEN_BY: ClassVar[str] = "teacher_answers"
    teacher: str
    examples: int
    unreadable: int  # answers left out: the student's tokenizer cannot spell them
    ended: int  # answers that reached the teacher's end of turn (the others stopped at max_new_tokens)
    max_new_tokens: int
    dtype: str


# ---------------------------------------------------------------------------------------------- teacher logits

class StoredShard(Record):
    file: str
    sha256: str
    first_index: int
    n_examples: int
    n_tokens: int
    bytes: int

    def holds(self, index: int) -> bool:
        return self.first_index <= index < self.first_index + self.n_examples


class StoredDistribution(Record):
    kept: str
    logprobs: str
    encoding: str
    mean_kept: float
    bytes_per_token: float


class TeacherLogitsManifest(Contract):
    """data/teacher_logits/manifest.json: what was stored, how, from what, and every shard's checksum."""

    WRITTEN_BY: ClassVar[str] = "teacher_logits"
    format: Literal["tokenbridge.teacher_logits/v2"] = TEACHER_LOGITS_FORMAT
    teacher: str
    tokenizer_sha256: str
    vocab_size: int
    top_p: float
    top_k: int
    temperature: float
    dtype: str
    device: str
    fields: list[str]
    row_semantics: str
    distribution: StoredDistribution
    bytes_per_token: float
    prepared_sha256: str
    examples_per_shard: int
    n_examples: int
    n_tokens: int
    shards: list[StoredShard]


class TeacherLogitsSkipped(Contract):
    """data/teacher_logits/manifest.json when distill runs the teacher itself (`distill.teacher_mode: online`)."""

    WRITTEN_BY: ClassVar[str] = "teacher_logits"
    format: Literal["tokenbridge.teacher_logits.skipped/v1"] = "tokenbridge.teacher_logits.skipped/v1"
    skipped: str


# ---------------------------------------------------------------------------------------------- hypernetwork

class HypernetTraining(Record):
    """The hypernet stage's two phases (also in metrics/hypernet.json)."""

    identity_steps: int
    identity_error: float | None = Field(None, json_schema_extra={"better": "lower"})  # last warm-up step's
    steps: int
    first_loss: float | None = None
    final_loss: float | None = Field(None, json_schema_extra={"better": "lower"})
    median_seconds_per_step: float | None = Field(None, json_schema_extra={"better": "lower"})


class HypernetCard(Contract):
    """`hypernet.json` beside a trained hypernetwork's weights: the base model it serves, its shape, and what it
    was trained on."""

    WRITTEN_BY: ClassVar[str] = "hypernet"
    format: Literal["tokenbridge.hypernet/v1"] = "tokenbridge.hypernet/v1"
    base: ModelRef
    width: int  # the rows it reads and writes: the hidden size, twice that when the head is untied
    tied: bool
    layers: int
    heads: int
    max_pieces: int
    pool: list[str]  # the tokenizers it trained on (kind-vocabulary size), sub-sampled each step
    heldout: str  # the trained tokenizer it never saw (heldout_tokenizer/)
    fingerprint: str
    training: HypernetTraining


# ---------------------------------------------------------------------------------------------- metrics

def _direction(model: type[BaseModel], metric: str) -> Better | None:
    field = model.model_fields.get(metric)
    extra = field.json_schema_extra if field is not None else None
    return extra.get("better") if isinstance(extra, dict) else None  # type: ignore[return-value]


class TaskScore(Record):
    """One lm-eval task's scores for one model (`evaluate.tasks`)."""

    metric: str  # the headline: the task's first metric, as `values` names it ("acc", "exact_match,strict-match")
    higher_is_better: bool
    n: int  # documents scored
    values: dict[str, float]  # every metric lm-eval reported, with its standard error ("acc_stderr", ...)

    def stderr_key(self, metric: str) -> str:
        """Where lm-eval's standard error of `metric` is: `acc` -> `acc_stderr`, `m,filter` -> `m_stderr,filter`."""
        name, _, kept = metric.partition(",")
        return f"{name}_stderr" + (f",{kept}" if kept else "")

    def headline(self) -> dict[str, float]:
        """The headline metric as `value` with `value_stderr` when lm-eval gave one: what tables and intervals read."""
        stderr = self.values.get(self.stderr_key(self.metric))
        return {"value": self.values[self.metric], **({"value_stderr": stderr} if stderr is not None else {})}


class EvalMetrics(Contract):
    """metrics/eval/<model>.json (a DVC metrics file): one model's scores; GSM only where it was measured."""

    WRITTEN_BY: ClassVar[str] = "evaluate"
    bits_per_byte: float = Field(json_schema_extra={"better": "lower"})
    bits_per_byte_low: float | None = None  # its 95 % bootstrap interval over the test answers
    bits_per_byte_high: float | None = None
    bpb_bytes: int
    # The student's distance from the teacher on the same answers (docs/evaluation.md#distance-from-the-teacher)
    chunk_gap_bits_per_byte: float | None = Field(None, json_schema_extra={"better": "lower"})
    chunk_gap_bits_per_byte_low: float | None = None
    chunk_gap_bits_per_byte_high: float | None = None
    # Bits-per-byte on the teacher's own greedy answers to the same questions (stage teacher_answers)
    teacher_answers_bits_per_byte: float | None = Field(None, json_schema_extra={"better": "lower"})
    teacher_answers_bits_per_byte_low: float | None = None
    teacher_answers_bits_per_byte_high: float | None = None
    teacher_answers_bytes: int | None = None
    # evaluate_transfer: bits-per-byte on the original model's own greedy answers (a moved model's closeness to the
    # model it was moved from; written by the transfer stage, data/original_answers/<source>)
    original_answers_bits_per_byte: float | None = Field(None, json_schema_extra={"better": "lower"})
    original_answers_bits_per_byte_low: float | None = None
    original_answers_bits_per_byte_high: float | None = None
    original_answers_bytes: int | None = None
    # The chunk gap on the student's own greedy answers to those questions (GKD's on-policy distribution)
    own_answers_chunk_gap_bits_per_byte: float | None = Field(None, json_schema_extra={"better": "lower"})
    own_answers_chunk_gap_bits_per_byte_low: float | None = None
    own_answers_chunk_gap_bits_per_byte_high: float | None = None
    own_answers_unreadable: int | None = None
    gsm_exact_match: float | None = Field(None, json_schema_extra={"better": "higher"})
    gsm_exact_match_stderr: float | None = None  # lm-eval's standard error of the mean over questions
    gsm_exact_match_flexible: float | None = Field(None, json_schema_extra={"better": "higher"})
    gsm_exact_match_flexible_stderr: float | None = None
    gsm_n: int | None = None
    tasks: dict[str, TaskScore] | None = None  # evaluate.tasks, by name (gsm, arithmetic, ...)

    @classmethod
    def writer_of(cls, path: Path) -> str:
        return f"evaluate@{Path(path).stem}"

    @classmethod
    def read_all(cls, metrics_dir: Path, names: list[str]) -> dict[str, EvalMetrics]:
        """Every named model's scores, in the given order; fails naming the stage that has not run."""
        return {name: cls.read(Path(metrics_dir) / f"{name}.json") for name in names}

    @staticmethod
    def better(metric: str) -> Better:
        """Whether a lower or a higher value of a score is better; fails for a name that is not a score."""
        direction = _direction(EvalMetrics, metric)
        if direction is None:
            raise KeyError(f"{metric!r} is not a score of metrics/eval/<model>.json: "
                           f"{[name for name in EvalMetrics.model_fields if _direction(EvalMetrics, name)]}")
        return direction

    def scores(self) -> dict[str, float | int]:
        """The single-number scores, as the file holds them (the benchmark tasks' scores: `tasks`, `numbers`)."""
        return self.model_dump(exclude_none=True, exclude={"tasks"})

    def numbers(self) -> dict[str, float | int]:
        """Every number the file holds, flat, for MLflow: the scores, then each task's metrics as
        `<task>.<metric>[/<filter>]` (MLflow's keys cannot hold lm-eval's comma)."""
        return {**self.scores(), **{f"{task}.{metric.replace(',', '/')}": value
                                    for task, score in (self.tasks or {}).items()
                                    for metric, value in score.values.items()}}


# A score's interval, standard error or spread over seeds, beside it in a file.
UNCERTAINTY_SUFFIXES = ("_low", "_high", "_stderr", "_seed_sd")


def interval(scores: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """A score's 95 % interval from the fields beside it: `<metric>_low`/`_high`, or `<metric>` +- 1.96
    `<metric>_stderr` (a normal approximation); None when the file holds neither."""
    if scores.get(f"{metric}_low") is not None and scores.get(f"{metric}_high") is not None:
        return float(scores[f"{metric}_low"]), float(scores[f"{metric}_high"])
    if scores.get(f"{metric}_stderr") is not None and scores.get(metric) is not None:
        half = 1.96 * float(scores[f"{metric}_stderr"])
        return float(scores[metric]) - half, float(scores[metric]) + half
    return None


class TransferScores(FileContract, RootModel[dict[str, EvalMetrics]]):
    """metrics/eval/transfer.json (DVC metrics): label (`<source>.original|fvt|transferred`, `ensemble`, a role
    member) -> its scores."""

    WRITTEN_BY: ClassVar[str] = "evaluate_transfer"


class DistillMetrics(Contract):
    """metrics/distill.json (DVC metrics): the distill run's summary."""

    WRITTEN_BY: ClassVar[str] = "distill"
    loss: str  # the loss terms, joined by '+'
    steps: int
    resumed_from_step: int
    final_loss: float = Field(json_schema_extra={"better": "lower"})
    on_policy_steps: int
    median_seconds_per_step: float = Field(json_schema_extra={"better": "lower"})
    median_update_seconds: float = Field(json_schema_extra={"better": "lower"})
    runtime: dict[str, Any]
    median_generation_seconds: float | None = Field(None, json_schema_extra={"better": "lower"})


class SourceTransfer(TransferTraining):
    fvt: dict[str, int] | None = None  # target tokens by how FVT initialised them (init: fvt)
    hypernet: dict[str, int] | None = None  # or the hypernetwork (init: hypernet)


class TransferMetrics(FileContract, RootModel[dict[str, SourceTransfer]]):
    """metrics/transfer.json (DVC metrics): each transfer source's FVT counts and self-distillation."""

    WRITTEN_BY: ClassVar[str] = "transfer"


class HypernetMetrics(HypernetTraining, Contract):
    """metrics/hypernet.json (DVC metrics): the hypernet stage's training summary."""

    WRITTEN_BY: ClassVar[str] = "hypernet"


class HypernetScores(FileContract, RootModel[dict[str, EvalMetrics]]):
    """metrics/eval/hypernet.json (DVC metrics): the base model on its own tokenizer (`base`), and on each compared
    tokenizer after `<name>.fvt` / `<name>.hypernet` alone and, when the ALM run is on, `<name>.fvt_alm` /
    `<name>.hypernet_alm`."""

    WRITTEN_BY: ClassVar[str] = "evaluate_hypernet"
