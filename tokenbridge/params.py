"""Pipeline parameters: one `params.yaml`, validated by pydantic when loaded.

`params.yaml` holds the default (real-model) values at the top level and, under `profiles.<name>`, the
values a profile overrides. The top-level key `profile` selects the profile. Every profile is validated
in full when the file loads, so a typo anywhere stops the run before any work, with the key's path.

The `distill` section is derived from the loss registry: the loss names it accepts, one `distill.<section>` per
loss's own options model, and each loss's needs (the live teacher, its whole distribution) are read from the
loss classes (`tokenbridge/losses/`), so a new loss needs no edit here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from tokenbridge.config import (
    DEFAULT_PARAMS,
    EnsembleParams,
    EvaluateHypernetParams,
    EvaluateParams,
    ModelsParams,
    ModelSpec,
    Named,
    OnPolicyParams,
    ParamsError,
    PrepareParams,
    RuntimeParams,
    Strict,
    TeacherLogitsParams,
    TeacherTruncation,
    TokenizerKind,
    TrackingParams,
    existing_tokenizer,
)
from tokenbridge.losses.alm import AlmParams
from tokenbridge.losses.registry import LOSSES, params_sections, transfer_losses


def _warmup_fits(warmup: int, info: ValidationInfo, phases: tuple[str, ...]) -> int:
    """`warmup_steps`, refused when longer than a (non-empty) phase it warms up: it would outlast the phase."""
    for phase in phases:
        steps = info.data.get(phase)
        if steps and warmup > steps:
            raise ValueError(f"{warmup} is more than {phase} ({steps}): a warm-up cannot outlast the steps it ramps; "
                             f"set warmup_steps to at most {steps}")
    return warmup


def _listed_once(names: list[str], fix: str) -> list[str]:
    """`names`, refused when one is listed twice: the losses are keyed by name, so it would silently count once."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{twice} listed more than once: {fix}")
    return names


class DistillCommonParams(Strict):
    """The `distill` keys that do not belong to one loss, and the checks across the losses named; `DistillParams`
    adds one section per registered loss's options."""

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
    loss_weights: dict[str, float] = Field(default_factory=dict,
                                           description="fixed weight per combined loss (default 1)")
    combine: Literal["fixed", "gradmag"] = Field(
        "fixed", description="fixed: weights and alpha; gradmag: equal last-layer gradient norm per term "
        "(docs/algorithms/alm.md#combining-losses)")
    alpha: float = Field(0.5, ge=0, le=1, description="(1 - alpha) * next-token CE + alpha * distillation loss")
    alpha_schedule: Literal["constant", "linear_increase", "linear_decrease", "wsd"] = "constant"
    alpha_warmup: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps ramping alpha up from 0")
    alpha_decay: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps decaying alpha to 0")
    teacher: TeacherTruncation = TeacherTruncation()
    on_policy: OnPolicyParams = OnPolicyParams()
    checkpoint_every: int = Field(ge=1)
    heldout_every: int = Field(10, ge=0, description="the held-out learning curve: every this many steps and at the "
                                                     "last, bits-per-byte on the test answers and the teacher's "
                                                     "answers the evaluation scores (evaluate.bpb_examples, "
                                                     "evaluate.teacher_answers); 0: never")
    logits_chunk_size: int = Field(128, ge=1, description="positions per chunk of the vocabulary projection")
    seed: int = 1234

    @property
    def losses(self) -> list[str]:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_the_steps(cls, value: int, info: ValidationInfo) -> int:
        return _warmup_fits(value, info, ("steps",))

    @field_validator("loss")
    @classmethod
    def _each_loss_once(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            _listed_once(value, "list each loss once (loss_weights sets how much one counts)")
        return value

    @field_validator("loss_weights")
    @classmethod
    def _weights_positive(cls, value: dict[str, float]) -> dict[str, float]:
        """The engine leaves out terms weighted 0 or less, so such a weight would drop its loss silently."""
        bad = {name: weight for name, weight in value.items() if weight <= 0}
        if bad:
            raise ValueError(f"{bad}: a weight must be > 0; to leave a loss out, remove it from loss instead")
        return value

    @model_validator(mode="after")
    def _losses_are_usable(self) -> DistillCommonParams:
        names = self.losses
        unknown = [name for name in names if name not in LOSSES]
        if unknown or not names:
            raise ValueError(f"loss: unknown loss {unknown or names}; allowed: {', '.join(LOSSES)}")
        if "sft" in names and len(names) > 1:
            raise ValueError("loss: 'sft' is the next-token term that alpha mixes in; list only distillation losses")
        stray = sorted(set(self.loss_weights) - set(names))
        if stray:
            raise ValueError(f"loss_weights: {stray} not in loss {names}")
        if self.alpha_warmup + self.alpha_decay > 1:
            raise ValueError("alpha_warmup + alpha_decay must be at most 1 (fractions of the steps)")
        live = [name for name in names if LOSSES[name].needs_online_teacher]
        if live and self.teacher_mode != "online":
            raise ValueError(f"loss {live[0]!r} needs the live teacher's hidden states: "
                             "set distill.teacher_mode: online")
        if self.on_policy.fraction > 0 and (self.teacher_mode != "online" or names == ["sft"]):
            raise ValueError("on_policy.fraction > 0: the teacher scores the student's samples, so it needs "
                             "teacher_mode: online and a distillation loss (stored logits cover only the dataset's "
                             "answers)")
        full = self.teacher.top_p == 1 and self.teacher.top_k == 0 and self.teacher_mode == "online"
        needs_full = [name for name in names if LOSSES[name].needs_full_teacher(LOSSES[name].params_in(self))]
        if needs_full and not full:
            raise ValueError(f"{needs_full[0]} is infinite where a truncated teacher has zero probability: use "
                             "teacher_mode: online with teacher.top_p: 1 and teacher.top_k: 0, or skew_reverse_kl / "
                             "jsd with beta < 1")
        return self


def _with_loss_sections(base: type[Strict], stage: str, losses: list[str],
                        defaults: dict[str, BaseModel] | None = None) -> Any:
    """`base` plus one `<section>: <options model>` field per options section of these registered losses (the
    `<stage>` params' `<stage>.<section>`), defaulting to the model's documented defaults or `defaults[section]`."""
    sections = params_sections(losses)
    taken = sorted(set(sections) & set(base.model_fields))
    if taken:
        raise TypeError(f"loss params_section {taken} would replace {stage} keys of the same name: rename it")
    defaults = defaults or {}
    fields: dict[str, Any] = {section: (model, Field(default=defaults[section]) if section in defaults
                                        else Field(default_factory=model)) for section, model in sections.items()}
    return create_model(f"{stage.title()}Params", __base__=base, __module__=__name__, **fields)


def distill_params_model() -> type[DistillCommonParams]:
    """DistillCommonParams plus one section per registered loss's options, as the registry stands."""
    return _with_loss_sections(DistillCommonParams, "distill", list(LOSSES))


if TYPE_CHECKING:  # the loss sections exist only at run time; a type checker sees the shared keys
    DistillParams = DistillCommonParams
else:
    DistillParams = distill_params_model()


class TransferCommonParams(Strict):
    """Stage `transfer` (docs/algorithms/tokenizer-transfer.md): each source model moved onto `tokenizer` by FVT,
    then self-distillation with `loss` (ALM by default), the original model (own tokenizer) the frozen teacher.
    `TransferParams` adds the options section of each loss it accepts (`transfer.alm`, `transfer.uld`, ...)."""

    tokenizer: str = Field(description="target tokenizer: 'student' or 'teacher' (that role's), a local HF "
                                       "directory holding one, or 'byte' (every byte one token, specials kept)")
    init: Literal["fvt", "hypernet"] = Field("fvt", description="starting rows: FVT, or the hypernet stage's "
                                                                 "predictions (only for the model it was trained for)")
    sources: Named[ModelSpec] = Field(description="name -> model moved onto the tokenizer (names: letters, "
                                                      "digits, '_')")
    embedding_steps: int = Field(ge=0, description="phase 1: only the new embeddings (and untied head) train")
    steps: int = Field(ge=0, description="phase 2: `train` parameters and the embeddings")
    train: Literal["lora", "full"] = Field("lora", description="phase 2: LoRA adapters (peft) or every parameter")
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(64, ge=1)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(1e-4, gt=0, description="phase 2 peak; linear warm-up then decay")
    embedding_learning_rate: float = Field(1e-3, gt=0, description="phase 1 peak")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of each phase (at most its steps)")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=32,
                            description="training examples longer than this (tokens, either side) are skipped")
    loss: str = Field("alm", description="the self-distillation loss: a registered cross-tokenizer loss, or 'sft' "
                                         "(next-token training alone, no teacher)")
    hidden_state_weight: float = Field(1.0, ge=0, description="byte targets: weight of the hidden-state loss")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (each phase also keeps its "
                                                         "last); a rerun resumes from the last one")
    heldout_every: int = Field(4, ge=0, description="the held-out learning curve: every this many steps (both phases "
                                                    "counted) and at the last, bits-per-byte on the test answers "
                                                    "the evaluation scores (evaluate.bpb_examples); 0: never")
    seed: int = 1234

    @field_validator("loss")
    @classmethod
    def _moves_between_tokenizers(cls, value: str) -> str:
        if value not in transfer_losses():
            raise ValueError(f"{value!r} cannot train a model on another tokenizer than its teacher's; allowed: "
                             f"{', '.join(transfer_losses())}")
        return value

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str) -> str:
        return existing_tokenizer(value, ("student", "teacher", "byte"))

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_each_phase(cls, value: int, info: ValidationInfo) -> int:
        return _warmup_fits(value, info, ("embedding_steps", "steps"))


if TYPE_CHECKING:
    TransferParams = TransferCommonParams
else:  # self-distillation counts every chunk, the question's too
    TransferParams = _with_loss_sections(TransferCommonParams, "transfer", transfer_losses(),
                                         {"alm": AlmParams(mask_prompt=False)})


class HypernetParams(Strict):
    """Stage `hypernet` (docs/algorithms/hypernetwork.md): an embedding hypernetwork for the `base` role's model,
    trained with ALM against that model on its own tokenizer."""

    base: Literal["student", "teacher"] = Field("student", description="the role whose model it serves")
    layers: int = Field(1, ge=1, description="transformer layers (ZeTT: 3)")
    heads: int = Field(4, ge=1, description="attention heads; must divide the embedding width")
    max_pieces: int = Field(8, ge=1, description="a new token reads at most this many base tokens of its spelling")
    pool_kinds: list[TokenizerKind] = Field(["bpe", "unigram"], min_length=1)
    pool_vocab_sizes: list[int] = Field([1000, 2000, 4000], min_length=1,
                                        description="one pool tokenizer per kind and size, trained on the train split")
    sub_vocabulary_min: float = Field(0.5, gt=0, le=1, description="each step keeps a random share in "
                                                                    "[this, 1] of the sampled tokenizer's tokens")
    heldout_vocab_size: int = Field(1500, ge=300, description="the held-out tokenizer (BPE on the test split's "
                                                              "texts), never trained on")
    identity_steps: int = Field(20, ge=0, description="warm-up: reproduce the base rows from the base's own spellings")
    identity_batch: int = Field(2048, ge=1, description="base tokens per warm-up step")
    identity_learning_rate: float = Field(3e-4, gt=0)
    steps: int = Field(8, ge=0, description="ALM steps, each on a tokenizer sampled from the pool")
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="peak; linear warm-up then decay")
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=32, description="examples longer than this (base tokens) are skipped")
    loss: list[Literal["alm", "sft"]] = Field(["alm"], min_length=1,
                                              description="alm, optionally with next-token CE (sft), equal weights")
    identity_weight: float = Field(1.0, ge=0, description="ALM steps: weight of the auxiliary loss keeping the rows "
                                                          "of tokens the base has near the base rows (0: off)")
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints (each phase also keeps its "
                                                        "last); a rerun resumes from the last one")
    alm: AlmParams = AlmParams(mask_prompt=False)
    seed: int = 1234

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_the_steps(cls, value: int, info: ValidationInfo) -> int:
        return _warmup_fits(value, info, ("steps",))

    @field_validator("loss")
    @classmethod
    def _each_loss_once(cls, value: list[str]) -> list[str]:
        return _listed_once(value, "list each loss once")


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
    hypernet: HypernetParams
    evaluate_hypernet: EvaluateHypernetParams

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError("profile must be a plain name such as 'default' or 'tiny'")
        return value

    @model_validator(mode="after")
    def _training_fits_the_runtime(self) -> PipelineParams:
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
    def _hypernet_init_fits_the_sources(self) -> PipelineParams:
        if self.transfer.init != "hypernet":
            return self
        base = getattr(self.models, self.hypernet.base)
        others = [name for name, spec in self.transfer.sources.items() if spec != base]
        if others:
            raise ValueError(f"transfer.init hypernet: the hypernetwork serves models.{self.hypernet.base} only, and "
                             f"transfer.sources {others} are other models; use init: fvt, or make every source "
                             f"models.{self.hypernet.base}'s spec")
        return self

    @model_validator(mode="after")
    def _ensemble_members_exist(self) -> PipelineParams:
        known = {"student", "teacher", *self.transfer.sources}
        unknown = [name for name in self.ensemble.members if name not in known]
        if unknown:
            raise ValueError(f"ensemble.members: {unknown} are neither 'student', 'teacher' nor a "
                             "transfer.sources name")
        return self


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base` key by key. A mapping that is empty or names a `source` (a model) replaces the base one
    whole: a profile can swap a model, or clear a mapping (`loss_weights: {}`) that merging could never empty."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict) and "source" not in value:
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_KEYED = re.compile(r"([A-Za-z_][\w.]*): (.*)", re.DOTALL)  # a section's check naming its key: "loss: ..."


def _format_errors(error: ValidationError, prefix: str) -> str:
    lines = []
    for item in error.errors():
        loc, value = [prefix, *item["loc"]], item.get("input")
        if item["type"] == "extra_forbidden":
            message = "unknown key (remove it or check its spelling; see docs/parameters.md)"
        else:
            message = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
            allowed = item.get("ctx", {}).get("expected")
            hint = f" (allowed: {allowed})" if allowed and str(allowed) not in message else ""
            keyed = _KEYED.fullmatch(message) if isinstance(value, dict) else None
            if keyed:
                loc.append(keyed[1])
                message = keyed[2]
            message += hint + ("" if isinstance(value, dict) else f"; got {value!r}")
        path = ".".join(str(part) for part in loc if part != "")
        lines.append(f"  {path}: {message}" if path else f"  {message}")
    return "\n".join(lines)


def _profiles(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `profiles` section, checked to map each name to a mapping of overrides: anything else fails in the merge."""
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ParamsError("profiles: expected a mapping of name -> overrides, such as `tiny: {distill: {steps: 4}}`; "
                          f"got a {type(profiles).__name__}")
    for name, overrides in profiles.items():
        if not isinstance(overrides, dict):
            raise ParamsError(f"profiles.{name}: expected a mapping of the sections it overrides, such as "
                              f"`distill: {{steps: 4}}`; got {overrides!r} (remove the profile, or give its overrides)")
        for section, value in overrides.items():
            if value == {}:  # would replace the whole section (`_deep_merge`), not leave it as it is
                raise ParamsError(f"profiles.{name}.{section}: an empty section overrides nothing: remove it, or give "
                                  "the keys it overrides")
    return profiles


def resolve(raw: dict[str, Any], profile: str | None = None) -> PipelineParams:
    """Apply `profiles[profile]` over the top-level values and validate the result."""
    profiles = _profiles(raw)
    raw = {key: value for key, value in raw.items() if key != "profiles"}
    name = profile or raw.get("profile", "default")
    if not isinstance(name, str) or (name != "default" and name not in profiles):
        raise ParamsError(f"profile: unknown profile {name!r}; allowed: default, {', '.join(profiles)}")
    merged = _deep_merge(raw, profiles.get(name, {}))
    merged["profile"] = name
    prefix = "" if name == "default" else f"profiles.{name}"
    try:
        return PipelineParams.model_validate(merged)
    except ValidationError as error:
        where = "params" if name == "default" else f"params (profile {name!r}; keys below may come from the top level)"
        raise ParamsError(f"invalid {where}:\n{_format_errors(error, prefix)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_line: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            if isinstance(key, Hashable) and key in first_line:
                raise ParamsError(f"{mark.name}:{mark.line + 1}:{mark.column + 1}: key {key!r} is given twice in one "
                                  f"mapping (first on line {first_line[key]}): keep one (YAML would use the last)")
            first_line[key] = mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path = DEFAULT_PARAMS, profile: str | None = None) -> PipelineParams:
    """Load and validate params.yaml. Every profile is checked, then the selected one is returned."""
    if not Path(path).exists():
        raise ParamsError(f"{path} not found: run from the project root, or pass --params PATH")
    with open(path, "rb") as handle:
        try:
            raw = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = ", ".join(part for part in (error.context, error.problem) if part)
            raise ParamsError(f"{where}: not valid YAML ({problem}): fix it there (indentation, a ':' after each key, "
                              "closed quotes and brackets)") from None
        except yaml.reader.ReaderError as error:  # bytes that are not text
            raise ParamsError(f"{path}: not readable as YAML ({error.reason} at position {error.position}): save it "
                              "as UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    for other in ["default", *_profiles(raw)]:
        resolve(raw, other)
    return resolve(raw, profile)
