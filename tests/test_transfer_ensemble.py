"""Tokenizer transfer (FVT, ALM self-distillation, bytes) and ensembling: what each stage promises.

Transfer: FVT copies rows exactly where the token exists and averages the source pieces where it does not;
onto an identical tokenizer the transferred model is the original, bit for bit, and self-distillation
starts at its stationary point; a tiny model moved to bytes trains (with the hidden-state loss) and
generates; every cross-tokenizer loss (and next-token training alone) can do the self-distillation, on the
whole text. Ensembles: a model averaged with itself is the model; lm-eval's real harness scores an ensemble
by log-likelihood and by generation; members with different tokenizers are refused.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tokenbridge.config import RuntimeParams
from tokenbridge.contracts import ANSWERS, HELDOUT, MANIFEST, ModelCard, TeacherAnswersManifest
from tokenbridge.data.gsm import generate_gsm_symbolic
from tokenbridge.evaluation.answers import continuations
from tokenbridge.evaluation.bpb import bits_per_byte, bits_per_byte_of, token_logprobs
from tokenbridge.io import read_json, read_jsonl, write_jsonl
from tokenbridge.losses.latents import hidden_state_loss
from tokenbridge.losses.registry import cross_tokenizer_losses, transfer_losses
from tokenbridge.models import load_model, load_tokenizer
from tokenbridge.models.ensemble import EnsembleForCausalLM
from tokenbridge.models.vocabulary import fvt_rows
from tokenbridge.params import TransferParams
from tokenbridge.runtime import Runtime
from tokenbridge.stages.ensemble import build_ensemble
from tokenbridge.stages.evaluate import tokenize_test_set
from tokenbridge.stages.transfer import init_path, run_transfer, train_transfer
from tokenbridge.token_bytes import special_ids, vocab_bytes

FP32 = Runtime.resolve(RuntimeParams(precision="fp32"))  # the tiny models in exact fp32


@pytest.fixture(scope="module")
def prepared_texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    train, test = generate_gsm_symbolic(8, 2, 0.2, seed=7)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root


def _params(tiny_params, **update):
    return tiny_params.transfer.model_copy(update=update)


def _logprobs(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    vocab = len(load_tokenizer(model_dir))
    with torch.no_grad():
        return load_model(model_dir)(input_ids=ids).logits[..., :vocab].log_softmax(-1)


def test_fvt_copies_existing_tokens_and_averages_the_source_pieces_of_new_ones(tiny_tokenizers):
    source, target = tiny_tokenizers["teacher"], tiny_tokenizers["student"]
    matrix = torch.randn(len(source) + 10, 8)
    rows, counts = fvt_rows(source, target, matrix)
    source_table, target_table = vocab_bytes(source), vocab_bytes(target)
    by_bytes = {}
    for index, piece in enumerate(source_table):
        if index not in special_ids(source):
            by_bytes.setdefault(piece, index)
    checked_exact = checked_mean = 0
    for index, piece in enumerate(target_table):
        if index in special_ids(target) or index in (target.bos_token_id, target.eos_token_id, target.pad_token_id):
            continue
        if piece in by_bytes:
            assert torch.equal(rows[index], matrix[by_bytes[piece]]), "an existing token's row is copied exactly"
            checked_exact += 1
        else:
            spelled = source(piece.decode("utf-8"), add_special_tokens=False)["input_ids"]
            torch.testing.assert_close(rows[index], matrix[spelled].mean(0))
            checked_mean += 1
    assert checked_exact > 50 and checked_mean > 5, (checked_exact, checked_mean)
    assert counts["exact"] >= checked_exact and counts["fvt"] >= checked_mean  # (+ specials spelled out)


def test_transfer_onto_an_identical_tokenizer_reproduces_the_models_log_probs_exactly(tiny_params, tiny_dirs,
                                                                                       prepared_texts, tmp_path):
    source = tiny_dirs["teacher"]
    out = tmp_path / "same"
    run_transfer(prepared_texts, source, source, out, tmp_path / "history.csv",
                 _params(tiny_params, embedding_steps=0, steps=0), FP32, tmp_path / "checkpoints")
    ids = torch.randint(0, len(load_tokenizer(source)), (2, 12))
    original = _logprobs(source, ids)
    assert torch.equal(_logprobs(init_path(out, "fvt"), ids), original)
    assert torch.equal(_logprobs(out, ids), original)
    assert load_tokenizer(out)("12 + 7 = 19")["input_ids"] == load_tokenizer(source)("12 + 7 = 19")["input_ids"]

    # Self-distillation onto the same tokenizer starts at the ALM optimum: no gradient to follow.
    summary = train_transfer([json.loads(line) for line in (prepared_texts / "train.jsonl").read_text().splitlines()],
                             source, init_path(out, "fvt"), tmp_path / "trained", tmp_path / "trained.csv",
                             _params(tiny_params, embedding_steps=0, steps=1, train="full"), FP32,
                             tmp_path / "trained-checkpoints")
    history = (tmp_path / "trained.csv").read_text().splitlines()
    grad_norm = float(history[1].split(",")[history[0].split(",").index("grad_norm")])
    assert summary.steps == 1 and grad_norm < 1e-5


def test_a_tiny_model_moved_to_bytes_trains_with_the_hidden_state_loss_and_generates(tiny_params, tiny_dirs,
                                                                                    prepared_texts, tmp_path):
    out = tmp_path / "bytes"
    run_transfer(prepared_texts, tiny_dirs["teacher"], None, out, tmp_path / "history.csv",
                 _params(tiny_params, embedding_steps=1, steps=2, train="full"), FP32, tmp_path / "checkpoints")
    tokenizer = load_tokenizer(out)
    specials = special_ids(tokenizer)
    assert all(len(piece) == 1 for index, piece in enumerate(vocab_bytes(tokenizer)) if index not in specials)
    assert len(tokenizer) == 256 + len(specials)
    assert tokenizer.eos_token == load_tokenizer(tiny_dirs["teacher"]).eos_token, "special tokens are kept"

    history = (tmp_path / "history.csv").read_text().splitlines()
    columns = history[0].split(",")
    rows = [dict(zip(columns, line.split(","))) for line in history[1:]]
    assert [row["phase"] for row in rows] == ["embeddings", "full", "full"]
    assert all(float(row["hidden_state_loss"]) > 0 and float(row["alm_loss"]) > 0 for row in rows)
    fvt, trained = load_model(init_path(out, "fvt")), load_model(out)
    assert not torch.equal(fvt.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)

    prompt = tokenizer("Question: 2 + 2", return_tensors="pt")
    generated = trained.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_transfer_takes_every_cross_tokenizer_loss_and_next_token_training_and_refuses_the_rest(tiny_params):
    assert transfer_losses() == [*cross_tokenizer_losses(), "sft"]
    assert {"alm", "uld", "mined", "multilevel_ot", "dskd"} <= set(transfer_losses())
    base = tiny_params.transfer.model_dump()
    for name in transfer_losses():
        assert TransferParams(**{**base, "loss": name}).loss == name
    for name, why in (("forward_kl", "cannot train a model on another tokenizer"), ("almm", "allowed: alm, ")):
        with pytest.raises(ValueError, match=why):
            TransferParams(**{**base, "loss": name})
    assert TransferParams(**base).alm.mask_prompt is False, "self-distillation counts the question's chunks too"


@pytest.mark.parametrize("loss", ["uld", "mined", "multilevel_ot", "dskd", "sft"])
def test_each_transfer_loss_trains_the_moved_model_on_its_own_term(loss, tiny_params, tiny_dirs, prepared_texts,
                                                                   tmp_path):
    out = tmp_path / loss
    run_transfer(prepared_texts, tiny_dirs["teacher"], tiny_dirs["student"], out, tmp_path / "history.csv",
                 _params(tiny_params, embedding_steps=0, steps=2, train="full", loss=loss), FP32,
                 tmp_path / "checkpoints")
    history = (tmp_path / "history.csv").read_text().splitlines()
    columns = history[0].split(",")
    rows = [dict(zip(columns, line.split(","))) for line in history[1:]]
    assert f"{loss}_loss" in columns and "alm_loss" not in columns
    assert all(float(row[f"{loss}_loss"]) == pytest.approx(float(row["loss"])) for row in rows), \
        "the loss trained is the named term alone (no hidden-state term off byte level)"
    assert all(0 < float(row["loss"]) < float("inf") and float(row["grad_norm"]) > 0 for row in rows)
    fvt, trained = load_model(init_path(out, "fvt")), load_model(out)
    assert not torch.equal(fvt.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)
    assert ModelCard.of(out).transfer["loss"] == loss


def test_hidden_state_loss_is_zero_when_states_agree_and_grows_with_the_difference():
    teacher = torch.randn(2, 5, 4)
    chunks = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 1, -1]])
    student_chunks = torch.tensor([[-1, 0, 1, 2, -1], [-1, 0, 1, -1, -1]])
    # The student's chunk ends read the teacher's states at the teacher's chunk ends: zero loss.
    student = torch.zeros(2, 5, 4)
    student[0, [1, 2, 3]] = teacher[0, [2, 3, 4]]
    student[1, [1, 2]] = teacher[1, [1, 3]]
    assert hidden_state_loss(teacher, student, chunks, student_chunks).value.item() == pytest.approx(0.0, abs=1e-12)
    small = hidden_state_loss(teacher, student + 0.1, chunks, student_chunks).value
    large = hidden_state_loss(teacher, student + 1.0, chunks, student_chunks).value
    assert 0 < small < large


@pytest.fixture(scope="module")
def self_ensemble(tiny_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "ensemble"
    build_ensemble({"a": tiny_dirs["student"], "b": tiny_dirs["student"]}, [0.3, 0.7], out)
    return out


def test_an_ensemble_of_a_model_with_itself_equals_the_model(tiny_dirs, self_ensemble):
    from transformers import AutoModelForCausalLM

    ensemble = AutoModelForCausalLM.from_pretrained(self_ensemble)
    assert isinstance(ensemble, EnsembleForCausalLM)
    model = load_model(tiny_dirs["student"]).eval()
    vocab = len(load_tokenizer(tiny_dirs["student"]))
    ids = torch.randint(0, vocab, (2, 10))
    with torch.no_grad():
        mixture = ensemble(input_ids=ids).logits
        torch.testing.assert_close(mixture, model(input_ids=ids).logits[..., :vocab].log_softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixture.exp().sum(-1), torch.ones(2, 10))
    prompt = ids[:1, :4]
    expected = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(ensemble.generate(input_ids=prompt, max_new_tokens=8, eos_token_id=[]), expected)


def test_mean_of_probabilities_is_not_mean_of_logits(tiny_dirs, tmp_path):
    build_ensemble({"student": tiny_dirs["student"], "other": _perturbed_copy(tiny_dirs["student"], tmp_path)}, [],
                   tmp_path / "ensemble")
    ensemble = EnsembleForCausalLM.from_pretrained(tmp_path / "ensemble")
    ids = torch.randint(0, ensemble.config.vocab_size, (1, 6))
    with torch.no_grad():
        members = [m(input_ids=ids).logits[..., : ensemble.config.vocab_size].log_softmax(-1) for m in ensemble.members]
        mixture = ensemble(input_ids=ids).logits
    torch.testing.assert_close(mixture, torch.logaddexp(*members) - torch.log(torch.tensor(2.0)))
    assert not torch.allclose(mixture, ((members[0] + members[1]) / 2).log_softmax(-1), atol=1e-4)


def _perturbed_copy(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "perturbed"
    shutil.copytree(model_dir, out)
    model = load_model(out)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(out)
    return out


LOGLIK_TASK = {
    "task": "tokenbridge_answer_loglik", "dataset_path": "json", "dataset_name": None, "output_type": "loglikelihood",
    "test_split": "test", "doc_to_text": "{{question}}", "doc_to_target": " {{answer}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def test_lm_eval_scores_an_ensemble_by_log_likelihood_and_generation(self_ensemble, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tokenbridge.evaluation.gsm_lmeval import evaluate_gsm, write_gsm_task

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    records = [{"question": "Tom has 3 apples and gets 4 more. How many?", "answer": "3 + 4 = 7.\n#### 7"}]
    write_jsonl(tmp_path / "test.jsonl", records)
    write_gsm_task(tmp_path / "task", tmp_path / "test.jsonl", tmp_path / "test.jsonl")
    scores = evaluate_gsm(self_ensemble, tmp_path / "task", limit=1, num_fewshot=0, max_gen_toks=8, batch_size=1,
                          dtype="float32", device="cpu", samples_path=tmp_path / "samples.jsonl")
    assert scores["gsm_n"] == 1 and 0 <= scores["gsm_exact_match"] <= 1
    assert "generation" in json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])

    task = {**LOGLIK_TASK, "dataset_kwargs": {"data_files": {"test": str(tmp_path / "test.jsonl")}}}
    (tmp_path / "loglik").mkdir()
    (tmp_path / "loglik" / "task.yaml").write_text(yaml.safe_dump(task))
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(self_ensemble), "device": "cpu"},
                                      tasks=["tokenbridge_answer_loglik"], limit=1, batch_size=1, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "loglik"),
                                                               include_defaults=False))
    sample = results["samples"]["tokenbridge_answer_loglik"][0]
    loglik = sample["resps"][0][0][0]
    # The harness's log-likelihood is the ensemble's own: recompute it from the mixture.
    tokenizer = load_tokenizer(self_ensemble)
    context = tokenizer(records[0]["question"], add_special_tokens=False)["input_ids"]
    whole = tokenizer(records[0]["question"] + " " + records[0]["answer"], add_special_tokens=False)["input_ids"]
    ensemble = EnsembleForCausalLM.from_pretrained(self_ensemble)
    with torch.no_grad():
        logprobs = ensemble(input_ids=torch.tensor([whole])).logits[0]
    expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
    assert whole[: len(context)] == context
    assert loglik == pytest.approx(expected, abs=1e-3)


def test_ensembling_models_with_different_tokenizers_is_refused_naming_both(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="different tokenizers") as error:
        build_ensemble({"teacher": tiny_dirs["teacher"], "student": tiny_dirs["student"]}, [], tmp_path / "ensemble")
    message = str(error.value)
    for name in ("teacher", "student"):
        size = read_json(tiny_dirs[name] / "tokenbridge.json")["tokenizer_size"]
        assert f"{name}: tokenizer.json sha256" in message and f"{size} tokens" in message
    assert "stage transfer" in message and not (tmp_path / "ensemble").exists()


def test_the_lora_phase_trains_adapters_that_are_merged_into_the_saved_model(tiny_params, tiny_dirs, prepared_texts,
                                                                             tmp_path):
    out = tmp_path / "lora"
    heldout = tiny_params.evaluate.model_copy(update={"bpb_examples": 32, "teacher_answers": 2})
    run_transfer(prepared_texts, tiny_dirs["teacher"], tiny_dirs["student"], out, tmp_path / "history.csv",
                 _params(tiny_params, embedding_steps=1, steps=2, train="lora", lora_rank=4, lora_alpha=4,
                         heldout_every=2), FP32, tmp_path / "checkpoints", heldout=heldout,
                 answers_dir=tmp_path / "original_answers")
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [row["phase"] for row in rows] == ["embeddings", "lora", "lora"]
    answered = read_jsonl(tmp_path / "original_answers" / ANSWERS)
    manifest = TeacherAnswersManifest.read(tmp_path / "original_answers" / MANIFEST)
    assert manifest.teacher == ModelCard.of(tiny_dirs["teacher"]).name and len(answered) == manifest.examples > 0
    assert manifest.examples + manifest.unreadable == 2, "the original answers the first teacher_answers questions"
    references = tokenize_test_set(prepared_texts / "test.jsonl", out, tmp_path / "answers.jsonl")
    originals = continuations(answered, load_tokenizer(out))
    evaluated = {"bits_per_byte": bits_per_byte(out, references, 32, FP32.device)["bits_per_byte"],
                 "original_answers_bits_per_byte": bits_per_byte_of(
                     originals, token_logprobs(out, originals, FP32.device))["bits_per_byte"]}
    for score, value in evaluated.items():
        column = f"{HELDOUT}{score}"
        curve = {int(row["step"]): float(row[column]) for row in rows if row[column]}
        assert list(curve) == [2, 3], "every heldout_every steps, both phases counted, and at the last"
        assert curve[3] == pytest.approx(value, rel=1e-4), \
            "the curve's last point is the evaluation's score of the saved model (LoRA merged)"
        assert curve[2] != curve[3]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not [name for name in handle.keys() if "lora" in name], "adapters are merged, not saved beside"
    fvt, trained = load_model(init_path(out, "fvt")), load_model(out)
    assert not torch.equal(fvt.model.layers[0].self_attn.q_proj.weight, trained.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(fvt.get_input_embeddings().weight, trained.get_input_embeddings().weight)
    assert torch.equal(fvt.model.norm.weight, trained.model.norm.weight), "outside LoRA and embeddings nothing moves"


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_a_moved_model_splits_text_as_its_new_tokenizer_does_whatever_its_config_model_type(tiny_dirs, tmp_path,
                                                                                          model_type):
    """transformers 5's AutoTokenizer rebuilds a qwen2 model's tokenizer from its own class, whatever tokenizer.json
    says; load_tokenizer (and lm-eval, which gets its tokenizer) must not."""
    moved = tmp_path / model_type
    shutil.copytree(tiny_dirs["student"], moved)
    (moved / "config.json").write_text(json.dumps({**read_json(moved / "config.json"), "model_type": model_type}))
    text = "Tom has 3 apples.\n\nHe buys  12 more, so 15."
    assert (load_tokenizer(moved)(text, add_special_tokens=False)["input_ids"]
            == load_tokenizer(tiny_dirs["student"])(text, add_special_tokens=False)["input_ids"])
