"""The embedding hypernetwork (ZeTT): what its decompositions, training and application promise.

A new token is read as base tokens that spell its bytes (byte-level and SentencePiece vocabularies alike); an
untrained hypernetwork is FVT; the identity warm-up brings a perturbed hypernetwork back to reproducing the base
model on its own tokenizer; special tokens keep their base rows; only the hypernetwork receives gradients; the
applied model is a HF directory transformers and lm-eval load; and it is refused for a model it was not trained for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenbridge.config import RuntimeParams, TeacherTruncation
from tokenbridge.contracts import MODEL_CARD, ContractError, ModelCard
from tokenbridge.data.chat import encode_example
from tokenbridge.evaluation.bpb import bits_per_byte
from tokenbridge.evaluation.gsm_lmeval import evaluate_gsm, write_gsm_task
from tokenbridge.flows.hypernet import main as hypernet_cli
from tokenbridge.io import read_jsonl
from tokenbridge.losses.alm import AlmLoss
from tokenbridge.losses.base import LossSetup
from tokenbridge.models import copy_tokenizer_files, input_embeddings, load_model, load_tokenizer
from tokenbridge.models.hypernet import Hypernet, base_rows, predict_rows, standardisation, token_pieces
from tokenbridge.models.retokenize import retokenized_model
from tokenbridge.models.tokenizer_pool import learned_tokens, sub_vocabulary, train_backend, with_chat_format
from tokenbridge.models.vocabulary import fvt_rows, vocabulary_map
from tokenbridge.runtime import Runtime
from tokenbridge.stages.evaluate import tokenize_test_set
from tokenbridge.stages.hypernet import (
    hypernet_forward,
    identity_spellings,
    identity_warmup,
    sampled_batch,
    sampled_vocabulary,
    tokenizer_pool,
    train_hypernet,
)
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.stages.transfer import init_path, run_transfer
from tokenbridge.token_bytes import special_ids, vocab_bytes
from tokenbridge.training.checkpoint import Checkpoint
from tokenbridge.training.engine import Engine
from tokenbridge.training.parallel import TrainingModule
from tokenbridge.training.ranks import Ranks
from tokenbridge.training.teachers import LiveTeacher, Teacher

FP32 = Runtime.resolve(RuntimeParams(precision="fp32"))
PARAMS_FILE = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def prepared(tiny_params, tiny_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hypernet")
    run_prepare(tiny_dirs, root / "prepared", tiny_params.prepare)
    return root / "prepared"


@pytest.fixture(scope="module")
def hypernet_dir(tiny_params, tiny_dirs, prepared) -> Path:
    out = prepared.parent / "hypernet"
    train_hypernet(prepared, tiny_dirs["student"], out, prepared.parent / "hypernet.csv", tiny_params.hypernet, FP32,
                   prepared.parent / "checkpoints")
    return out


@pytest.fixture(scope="module")
def texts(prepared) -> list[str]:
    return [f"{r['question']}\n{r['answer']}" for r in read_jsonl(prepared / "train.jsonl")]


def _bpb(model_dir: Path, prepared: Path) -> float:
    encoded = tokenize_test_set(prepared / "test.jsonl", model_dir, model_dir / "test.encoded.jsonl")
    return bits_per_byte(model_dir, encoded, 6, torch.device("cpu"))["bits_per_byte"]


@pytest.mark.parametrize("base_role", ["teacher", "student"])  # byte-level BPE, SentencePiece-style BPE
def test_every_new_token_decomposes_into_base_pieces_that_spell_its_bytes(tiny_tokenizers, texts, base_role):
    base = tiny_tokenizers[base_role]
    other = tiny_tokenizers["student" if base_role == "teacher" else "teacher"]
    targets = [other, *(with_chat_format(train_backend(kind, 500, texts), base) for kind in ("bpe", "unigram"))]
    for target in targets:
        mapping = vocabulary_map(base, target)
        base_table, target_table = vocab_bytes(base), vocab_bytes(target)
        pieces = token_pieces(mapping, max_pieces=64)
        assert len(pieces) > 0.9 * (len(target) - len(mapping.special))
        for index, parts in pieces.items():
            spelled = b"".join(base_table[part] for part in parts)
            assert spelled == target_table[index], target.convert_ids_to_tokens(index)
        assert all(pieces[index] == [source] for index, source in mapping.exact.items()
                   if index not in mapping.target_specials)
        assert not pieces.keys() & mapping.target_specials, "special tokens are never predicted"
        assert all(len(parts) <= 8 for parts in token_pieces(mapping, max_pieces=8).values())


@pytest.mark.parametrize("kind", ["bpe", "unigram", "base:student", "base:teacher"])
def test_a_random_sub_vocabulary_still_encodes_any_text_to_the_same_bytes(texts, kind, tiny_tokenizers):
    full = learned_tokens(tiny_tokenizers[kind[5:]]) if kind.startswith("base:") else train_backend(kind, 500, texts)
    sub = sub_vocabulary(full, 0.3, random.Random(0))
    assert sub.get_vocab_size() < full.get_vocab_size()
    tokenizer = with_chat_format(sub, tiny_tokenizers["student"])
    table = vocab_bytes(tokenizer)
    text = "A train leaves at 9:45 and travels 120 km; naïve ☃ costs $3.50.\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[index] for index in ids) == text.encode()


def test_an_untrained_hypernetwork_predicts_the_fvt_rows(tiny_tokenizers):
    base, target = tiny_tokenizers["student"], tiny_tokenizers["teacher"]
    rows = torch.randn(len(base), 16)
    mean, std = standardisation(rows, len(base))
    hypernet = Hypernet(16, layers=1, heads=4, max_pieces=64, mean=mean, std=std)
    mapping = vocabulary_map(base, target)
    ids, predicted = predict_rows(hypernet, rows, token_pieces(mapping, 64))
    torch.testing.assert_close(predicted.detach(), fvt_rows(base, target, rows, mapping=mapping)[0][ids])


def test_the_identity_warmup_brings_a_perturbed_hypernetwork_back_to_the_base_model(tiny_params, tiny_dirs,
                                                                                    prepared, tmp_path):
    base_dir = tiny_dirs["student"]
    base = load_tokenizer(base_dir)
    model = load_model(base_dir)
    rows = base_rows(input_embeddings(model).detach(), None).clone()
    mean, std = standardisation(rows, len(base))
    torch.manual_seed(0)
    hypernet = Hypernet(rows.shape[1], layers=1, heads=4, max_pieces=8, mean=mean, std=std)
    torch.nn.init.normal_(hypernet.out.weight, std=0.05)  # no longer the identity

    def base_model_through_hypernet(name: str) -> float:
        mapping = vocabulary_map(base, base)
        with torch.no_grad():
            ids, predicted = predict_rows(hypernet, rows, token_pieces(mapping, 8))
            input_embeddings(model)[ids] = predicted
        model.save_pretrained(tmp_path / name)
        copy_tokenizer_files(base_dir, tmp_path / name)
        return _bpb(tmp_path / name, prepared)

    reference = _bpb(base_dir, prepared)
    assert abs(base_model_through_hypernet("perturbed") - reference) > 2e-3, "the perturbation must show"
    params = tiny_params.hypernet.model_copy(update={"identity_steps": 300, "identity_batch": 512,
                                                     "identity_learning_rate": 3e-3, "checkpoint_every": 300})
    history = identity_warmup(hypernet, rows, identity_spellings(base, 8, seed=0), params,
                              lambda optimizer: Checkpoint(tmp_path / "checkpoint", {}, hypernet, optimizer, Ranks()))
    assert len(history) == 300
    assert abs(base_model_through_hypernet("warmed_up") - reference) < 1e-3


def test_the_tokenizer_pool_is_trained_once_per_text_and_pool_params_and_kept(tiny_params, prepared, tmp_path):
    """HF's Unigram trainer is not deterministic, so a rerun (a resume, or other training params) must read the
    pool it trained, not train another."""
    records, test_records = (read_jsonl(prepared / f"{split}.jsonl") for split in ("train", "test"))
    params = tiny_params.hypernet
    first, heldout = tokenizer_pool(records, test_records, params, tmp_path / "pool", "key")
    assert sorted(first) == sorted(f"{kind}-{size}" for kind in params.pool_kinds for size in params.pool_vocab_sizes)
    again, heldout_again = tokenizer_pool(records, test_records, params, tmp_path / "pool", "key")
    assert {name: backend.to_str() for name, backend in again.items()} == \
        {name: backend.to_str() for name, backend in first.items()}
    assert heldout_again.to_str() == heldout.to_str()
    smaller = params.model_copy(update={"pool_kinds": ["bpe"]})
    assert sorted(tokenizer_pool(records, test_records, smaller, tmp_path / "pool", "other key")[0]) == \
        [f"bpe-{size}" for size in params.pool_vocab_sizes]


def test_special_tokens_keep_their_base_rows_and_the_base_tokenizer_reproduces_the_model(tiny_dirs, prepared,
                                                                                          hypernet_dir, tmp_path):
    base_dir = tiny_dirs["student"]
    original = input_embeddings(load_model(base_dir)).detach()
    for target in ("teacher", "student"):
        out = tmp_path / target
        counts = retokenized_model(base_dir, tiny_dirs[target], out, "hypernet", 0, hypernet_dir)
        assert counts["special"] >= 2 and counts["predicted"] > 0
        base, moved_tokenizer = load_tokenizer(base_dir), load_tokenizer(out)
        mapping = vocabulary_map(base, moved_tokenizer)
        moved = input_embeddings(load_model(out)).detach()
        same_name = {index: base.convert_tokens_to_ids(moved_tokenizer.convert_ids_to_tokens(index))
                     for index in special_ids(moved_tokenizer) if index in mapping.exact}
        for index, source in (mapping.special | same_name).items():  # by role, and specials the base has by name
            assert torch.equal(moved[index], original[source])
        assert sum(counts.values()) == len(moved_tokenizer)
    # The trained hypernetwork (tiny profile: a short warm-up, two ALM steps) still reproduces the base model.
    assert abs(_bpb(tmp_path / "student", prepared) - _bpb(base_dir, prepared)) < 1e-3


def test_only_the_hypernetwork_receives_gradients(tiny_params, tiny_dirs, prepared, texts):
    params = tiny_params.hypernet
    base_dir = tiny_dirs["student"]
    base = load_tokenizer(base_dir)
    student = load_model(base_dir).requires_grad_(False)
    rows = base_rows(input_embeddings(student).detach(), None).clone()
    hypernet = Hypernet(rows.shape[1], params.layers, params.heads, params.max_pieces,
                        *standardisation(rows, len(base)))
    tokenizer = with_chat_format(sub_vocabulary(train_backend("unigram", 500, texts), 0.7, random.Random(1)), base)
    vocabulary = sampled_vocabulary(base, tokenizer, rows, rows.device, params)
    records = read_jsonl(prepared / "train.jsonl")[:2]
    table = vocab_bytes(base)
    teachers = [encode_example(base, r["question"], r["answer"], table) for r in records]
    teacher = LiveTeacher(Teacher.load(base_dir, torch.float32, torch.device("cpu")), teachers,
                          TeacherTruncation(), 1.0, 32)
    batch = sampled_batch(tokenizer, records, teachers, teacher.teacher.boundary, vocabulary["boundary"])
    alm = AlmLoss(params.alm, LossSetup(base_dir, base_dir, same_tokenizer=False, cache_dir=prepared.parent))
    forward = hypernet_forward(hypernet, student, rows, alm, tied=True)
    module = TrainingModule(student, torch.nn.ModuleDict({"hypernet": hypernet}),
                            lambda *args: forward(vocabulary, *args))
    engine = Engine(module, torch.optim.AdamW(hypernet.parameters(), lr=1e-3), FP32, Ranks(), 1.0)
    untrained = forward(vocabulary, batch, teacher.view(batch), ["alm", "identity"], False)
    assert float(untrained["identity"].parts[0].value) == 0, "an untrained hypernetwork keeps the shared rows"
    assert untrained["identity"].parts[0].count > 0
    torch.nn.init.normal_(hypernet.out.weight, std=0.1)  # away from the stationary point at the base rows
    result = engine.step([batch], [teacher.view(batch)], {"alm": 1.0, "sft": 1.0, "identity": 1.0}, 1e-3,
                         "test step")
    assert result.grad_norm > 0 and result.values["identity"] > 0
    assert all(parameter.grad is None for parameter in student.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in hypernet.parameters())


def test_apply_writes_a_model_that_transformers_and_lm_eval_load(tiny_dirs, prepared, hypernet_dir, tmp_path):
    out = tmp_path / "applied"
    hypernet_cli(["apply", "--tokenizer", str(tiny_dirs["teacher"]), "--out", str(out), "--hypernet",
                  str(hypernet_dir), "--base", str(tiny_dirs["student"]), "--params", str(PARAMS_FILE)])
    card = ModelCard.of(out)
    assert card.transferred_from == ModelCard.of(tiny_dirs["student"]).name and card.hypernet
    assert (out / "tokenizer.json").read_bytes() == (tiny_dirs["teacher"] / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(load_tokenizer(tiny_dirs["teacher"]))
    write_gsm_task(tmp_path / "task", prepared / "test.jsonl", prepared / "train.jsonl")
    scores = evaluate_gsm(out, tmp_path / "task", limit=1, num_fewshot=0, max_gen_toks=4, batch_size=1,
                          dtype="float32", device="cpu")
    assert scores["gsm_n"] == 1


def test_a_hypernetwork_is_refused_for_a_model_it_was_not_trained_for(tiny_dirs, hypernet_dir, tmp_path):
    with pytest.raises(ContractError, match="init: fvt"):
        retokenized_model(tiny_dirs["teacher"], tiny_dirs["student"], tmp_path / "out", "hypernet", 0, hypernet_dir)
    assert not (tmp_path / "out" / MODEL_CARD).exists()


def test_the_transfer_stage_starts_from_the_hypernetwork_with_init_hypernet(tiny_params, tiny_dirs, prepared,
                                                                           hypernet_dir, tmp_path):
    params = tiny_params.transfer.model_copy(update={"init": "hypernet", "embedding_steps": 0, "steps": 1})
    summary = run_transfer(prepared, tiny_dirs["student"], tiny_dirs["teacher"], tmp_path / "moved",
                           tmp_path / "history.csv", params, FP32, tmp_path / "checkpoints", hypernet_dir)
    assert summary.hypernet and summary.fvt is None and summary.steps == 1
    assert ModelCard.of(init_path(tmp_path / "moved", "hypernet")).hypernet == summary.hypernet


def test_an_untied_head_gets_its_own_predicted_rows(tiny_params, tiny_dirs, prepared, tmp_path):
    untied_dir = tmp_path / "untied"
    model = load_model(tiny_dirs["student"])
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data = torch.randn_like(input_embeddings(model).detach())  # unlike the input rows
    model.lm_head = head
    model.save_pretrained(untied_dir)
    copy_tokenizer_files(tiny_dirs["student"], untied_dir)
    ModelCard.of(tiny_dirs["student"]).model_copy(update={"name": "tiny-untied"}).write(untied_dir / MODEL_CARD)
    reloaded = load_model(untied_dir)
    assert reloaded.get_output_embeddings().weight.data_ptr() != input_embeddings(reloaded).data_ptr()

    params = tiny_params.hypernet.model_copy(update={"steps": 1, "identity_steps": 2})
    card = train_hypernet(prepared, untied_dir, tmp_path / "hypernet", tmp_path / "history.csv", params, FP32,
                          tmp_path / "checkpoints")
    assert not card.tied and card.width == 2 * model.config.hidden_size
    retokenized_model(untied_dir, tiny_dirs["teacher"], tmp_path / "moved", "hypernet", 0, tmp_path / "hypernet")
    moved = load_model(tmp_path / "moved")
    inputs, outputs = input_embeddings(moved).detach(), moved.get_output_embeddings().weight.detach()
    mapping = vocabulary_map(load_tokenizer(untied_dir), load_tokenizer(tmp_path / "moved"))
    for index, source in mapping.special.items():
        assert torch.equal(inputs[index], input_embeddings(reloaded)[source])
        assert torch.equal(outputs[index], reloaded.get_output_embeddings().weight[source])
    spelled = list(mapping.spelled)
    assert not torch.allclose(inputs[spelled], outputs[spelled])
    # A short training leaves each half near FVT's mean of its own base rows: the head's predictions come from the
    # base head's rows, not from the input rows.
    base, target = load_tokenizer(untied_dir), load_tokenizer(tmp_path / "moved")
    fvt_head = fvt_rows(base, target, reloaded.get_output_embeddings().weight.detach(), mapping=mapping)[0]
    fvt_inputs = fvt_rows(base, target, input_embeddings(reloaded).detach(), mapping=mapping)[0]
    assert (outputs[spelled] - fvt_head[spelled]).norm() < 0.5 * (outputs[spelled] - fvt_inputs[spelled]).norm()
    assert (inputs[spelled] - fvt_inputs[spelled]).norm() < 0.5 * (inputs[spelled] - fvt_head[spelled]).norm()
