"""The files stages hand each other: each is written and read back through its one model, a file of another
version or from elsewhere fails naming its path, what is wrong and the stage that rebuilds it, and the metrics
files stay flat numbers for `dvc metrics` while their models know which way is better."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenbridge.config import TrackingParams
from tokenbridge.contracts import (
    ContractError,
    DistillMetrics,
    EvalMetrics,
    ModelCard,
    ModelRef,
    PerRole,
    PreparedManifest,
    SourceTransfer,
    Splits,
    SplitSummary,
    StoredDistribution,
    StoredShard,
    TeacherLogitsManifest,
    TeacherLogitsSkipped,
    TransferMetrics,
    TransferScores,
    TransferTraining,
)

SPLIT = SplitSummary(examples=3, dropped_too_long=1, dropped_unalignable=0, tokens=PerRole[int](teacher=30, student=40),
                     sha256=PerRole[str](teacher="a" * 64, student="b" * 64))
CARD = ModelCard(name="tiny-bytelevel-400", spec={"source": "tiny"}, tokenizer_sha256="c" * 64, tokenizer_size=400,
                 parameters=1234, eos_token="<eot>")
EXAMPLES = [
    CARD,
    CARD.model_copy(update={"name": "tiny-distilled", "distilled_from": CARD.name, "loss": ["alm", "sft"]}),
    CARD.model_copy(update={"name": "src-transferred", "transferred_from": "src", "fvt": {"exact": 3, "fvt": 1},
                            "byte_level": True, "fingerprint": "f" * 16, "transfer": {"steps": 2},
                            "training": TransferTraining(steps=2, final_loss=1.5, first_loss=2.0, examples=4,
                                                         median_seconds_per_step=0.25)}),
    CARD.model_copy(update={"name": "ensemble(a x0.50, b x0.50)", "members": {"student": "a", "teacher": "b"},
                            "weights": {"student": 0.5, "teacher": 0.5}}),
    PreparedManifest(source="generated", splits=Splits(train=SPLIT, test=SPLIT),
                     models=PerRole[ModelRef](teacher=ModelRef(name="t", tokenizer_sha256="d" * 64),
                                              student=ModelRef(name="s", tokenizer_sha256="e" * 64))),
    TeacherLogitsManifest(
        teacher="t", tokenizer_sha256="d" * 64, vocab_size=400, top_p=0.95, top_k=64, temperature=1.0,
        dtype="float32", device="cpu", fields=["input_ids"], row_semantics="row j predicts token j+1",
        distribution=StoredDistribution(kept="top-p then top-k", logprobs="full vocabulary", encoding="zstd",
                                        mean_kept=3.5, bytes_per_token=2.25),
        bytes_per_token=9.5, prepared_sha256="a" * 64, examples_per_shard=2, n_examples=3, n_tokens=30,
        shards=[StoredShard(file="shard-00000.safetensors", sha256="0" * 64, first_index=0, n_examples=2,
                            n_tokens=20, bytes=100),
                StoredShard(file="shard-00001.safetensors", sha256="1" * 64, first_index=2, n_examples=1,
                            n_tokens=10, bytes=50)]),
    TeacherLogitsSkipped(skipped="distill.teacher_mode is online"),
    EvalMetrics(bits_per_byte=1.25, bpb_bytes=900, gsm_exact_match=0.5, gsm_exact_match_flexible=0.75, gsm_n=4),
    EvalMetrics(bits_per_byte=1.25, bpb_bytes=900),
    TransferScores({"src.fvt": EvalMetrics(bits_per_byte=2.0, bpb_bytes=900)}),
    DistillMetrics(loss="alm", steps=4, resumed_from_step=0, final_loss=0.5, on_policy_steps=0,
                   median_seconds_per_step=1.5, median_update_seconds=1.25, runtime={"device": "cpu"}),
    TransferMetrics({"src": SourceTransfer(fvt={"exact": 3}, steps=0, examples=4)}),
]


@pytest.mark.parametrize("contract", EXAMPLES, ids=lambda contract: type(contract).__name__)
def test_every_contract_reads_back_what_it_wrote(contract, tmp_path):
    path = tmp_path / "file.json"
    contract.write(path)
    assert type(contract).read(path) == contract


def test_a_file_without_a_format_from_an_older_version_fails_naming_path_format_and_stage(tmp_path):
    path = tmp_path / "manifest.json"
    data = EXAMPLES[4].model_dump()
    del data["format"]
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=rf"{path} has no format field \(an older tokenbridge wrote it\); this "
                                            r"version reads 'tokenbridge.prepared/v1'.*'dvc repro prepare'"):
        PreparedManifest.read(path)


def test_a_file_of_another_format_fails_naming_both_formats(tmp_path):
    path = tmp_path / "manifest.json"
    EXAMPLES[6].write(path)  # online mode's manifest where stored logits are expected
    with pytest.raises(ContractError, match=rf"{path} is in format 'tokenbridge.teacher_logits.skipped/v1'; this "
                                            r"version reads 'tokenbridge.teacher_logits/v2'.*dvc repro teacher_logits"):
        TeacherLogitsManifest.read(path)


def test_a_foreign_file_fails_naming_each_wrong_field(tmp_path):
    path = tmp_path / "student_after.json"
    path.write_text(json.dumps({"bits_per_byte": "low", "bpb_bytes": 9, "perplexity": 3.0}))
    with pytest.raises(ContractError, match=rf"{path} is not a valid EvalMetrics \(bits_per_byte: .*number.*; "
                                            r"perplexity: Extra inputs are not permitted\)"
                                            r".*dvc repro evaluate@student_after"):
        EvalMetrics.read(path)


def test_a_file_that_is_not_json_fails_naming_its_path(tmp_path):
    path = tmp_path / "tokenbridge.json"
    path.write_text("{not json")
    with pytest.raises(ContractError, match=rf"{path} cannot be read"):
        ModelCard.read(path)


@pytest.mark.parametrize(("path", "stage"), [
    (Path("data/prepared/manifest.json"), "prepare"), (Path("data/teacher_logits/manifest.json"), "teacher_logits"),
    (Path("models/teacher/tokenbridge.json"), "models"), (Path("models/distilled/tokenbridge.json"), "distill"),
    (Path("models/transferred/src/tokenbridge.json"), "transfer"),
    (Path("models/ensemble/tokenbridge.json"), "ensemble"),
    (Path("metrics/eval/teacher.json"), "evaluate@teacher"), (Path("metrics/distill.json"), "distill"),
    (Path("metrics/eval/transfer.json"), "evaluate_transfer"), (Path("metrics/transfer.json"), "transfer")])
def test_a_missing_file_names_the_stage_that_writes_it(path, stage, tmp_path):
    contract = {"manifest.json": PreparedManifest if "prepared" in str(path) else TeacherLogitsManifest,
                "tokenbridge.json": ModelCard, "distill.json": DistillMetrics, "transfer.json": TransferMetrics}
    kind = (TransferScores if path == Path("metrics/eval/transfer.json") else EvalMetrics
            if path.parent == Path("metrics/eval") else contract[path.name])
    with pytest.raises(ContractError, match=rf"{tmp_path / path} is missing: the '{stage}' stage writes it; "
                                            rf"run 'dvc repro {stage}'"):
        kind.read(tmp_path / path)


def test_metrics_files_hold_flat_numbers_only(tmp_path):
    EXAMPLES[7].write(tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data == {"bits_per_byte": 1.25, "bpb_bytes": 900, "gsm_exact_match": 0.5,
                    "gsm_exact_match_flexible": 0.75, "gsm_n": 4}


def test_each_score_declares_which_way_is_better():
    assert EvalMetrics.better("bits_per_byte") == "lower"
    assert EvalMetrics.better("gsm_exact_match") == EvalMetrics.better("gsm_exact_match_flexible") == "higher"
    with pytest.raises(KeyError, match="'gsm_n' is not a score"):
        EvalMetrics.better("gsm_n")


def test_the_registry_compares_by_the_direction_the_metrics_declare():
    assert TrackingParams(primary_metric="gsm_exact_match").higher_is_better
    assert not TrackingParams(primary_metric="bits_per_byte").higher_is_better
