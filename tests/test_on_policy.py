"""On-policy distillation (GKD, docs/algorithms/gkd.md): the student-data fraction lambda, sampling with a KV
cache, the teacher scoring the student's samples with its own tokenizer, and agreement with TRL's GKD loss."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tokenbridge.stages.distill as distill
from tokenbridge.alignment import example_chunks
from tokenbridge.config import HfModelSpec, OnPolicyParams, PrepareParams
from tokenbridge.data.chat import encode_continuation, encode_prompt
from tokenbridge.data.padding import left_pad, pad_batch
from tokenbridge.models import load_model, load_tokenizer, materialize
from tokenbridge.models.tiny import PLAIN_TEMPLATE
from tokenbridge.on_policy import OnPolicySampler, completion_example, is_on_policy_step, valid_text
from tokenbridge.runtime import Runtime
from tokenbridge.sampling import completions, decode
from tokenbridge.stages.distill import train
from tokenbridge.stages.prepare import run_prepare
from tokenbridge.token_bytes import vocab_bytes
from tokenbridge.training.batching import batch_indices


def _params(tiny_params, **overrides):
    base = tiny_params.distill.model_dump()
    base.update({"teacher_mode": "online", "steps": 3, "checkpoint_every": 10, "learning_rate": 3e-3})
    base.update(overrides)
    return type(tiny_params.distill).model_validate(base)


def _run(root, dirs, params, tiny_params, name, log_metrics=lambda metrics, step: None):
    summary = train(root / "prepared", dirs["student"], root / name / "model", root / name / "checkpoints",
                    root / name / "history.csv", params, tiny_params.teacher_logits, dirs["teacher"], None,
                    log_metrics=log_metrics, runtime=Runtime.resolve(tiny_params.runtime))
    with open(root / name / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    return summary, history, load_file(str(root / name / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def cross_pair(tiny_params, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("on_policy")
    run_prepare(tiny_dirs, root / "prepared", tiny_params.prepare)
    return root, tiny_dirs


# -------------------------------------------------------------------------------- lambda


def test_the_step_choice_is_seeded_per_step_and_its_frequency_is_lambda():
    for fraction in (0.0, 0.25, 0.5, 1.0):
        chosen = [is_on_policy_step(step, fraction, seed=3) for step in range(4000)]
        assert sum(chosen) / len(chosen) == pytest.approx(fraction, abs=0.03)
        assert chosen == [is_on_policy_step(step, fraction, seed=3) for step in range(4000)]
    assert all(is_on_policy_step(step, 1.0, seed) for step in range(100) for seed in range(3))
    assert not any(is_on_policy_step(step, 0.0, seed) for step in range(100) for seed in range(3))


def test_lambda_zero_reproduces_off_policy_training_exactly(cross_pair, tiny_params):
    root, dirs = cross_pair
    _, reference_history, reference = _run(root, dirs, _params(tiny_params), tiny_params, "off-policy")
    settings = {"fraction": 0.0, "temperature": 0.3, "max_new_tokens": 5}
    _, history, weights = _run(root, dirs, _params(tiny_params, on_policy=settings), tiny_params, "lambda-0")
    _, _, on_policy = _run(root, dirs, _params(tiny_params, on_policy={**settings, "fraction": 1.0}), tiny_params,
                           "lambda-1-control")

    assert [row["loss"] for row in history] == [row["loss"] for row in reference_history]
    assert all(row["on_policy"] == "0" and float(row["generation_seconds"]) == 0 for row in history)
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name
    assert any(not torch.equal(on_policy[name], tensor) for name, tensor in reference.items())


def test_with_lambda_one_every_batch_is_the_students_own_samples(cross_pair, tiny_params, monkeypatch):
    root, dirs = cross_pair
    batches = []
    real_make_batch = distill.make_batch

    def spy(students, teachers, word_starts, stored=None):
        batches.append((students, teachers))
        return real_make_batch(students, teachers, word_starts, stored)

    monkeypatch.setattr(distill, "make_batch", spy)
    params = _params(tiny_params, steps=4, on_policy={"fraction": 1.0, "max_new_tokens": 6})
    logged = []
    summary, history, _ = _run(root, dirs, params, tiny_params, "lambda-1", lambda m, step: logged.append(m))

    tokenizer = load_tokenizer(dirs["student"])
    questions = [json.loads(line)["question"] for line in (root / "prepared" / "train.jsonl").read_text().splitlines()]
    dataset = {tuple(json.loads(line)["input_ids"])
               for line in (root / "prepared" / "train.student.jsonl").read_text().splitlines()}
    assert summary.on_policy_steps == 4 and len(batches) == 4
    for step, (students, _) in enumerate(batches):
        for index, example in zip(batch_indices(step, params.batch_size, len(questions), 6, params.seed), students):
            prompt = encode_prompt(tokenizer, questions[index]).input_ids
            assert example.input_ids[: len(prompt)] == prompt
            assert 1 <= sum(example.loss_mask) <= 6 and not any(example.loss_mask[: len(prompt)])
            assert tuple(example.input_ids) not in dataset
    assert all(m["on_policy"] == 1 and m["alpha"] == 1.0 and "sft_loss" not in m for m in logged)
    assert all(float(row["generation_seconds"]) > 0 and float(row["update_seconds"]) > 0 for row in history)


def test_on_policy_needs_the_live_teacher():
    from tokenbridge.params import DistillParams

    with pytest.raises(ValueError, match="teacher_mode: online"):
        DistillParams(teacher_mode="offline", steps=1, batch_size=1, learning_rate=1e-3, checkpoint_every=1,
                      on_policy=OnPolicyParams(fraction=0.5))


# -------------------------------------------------------------------------------- sampling


def test_batched_kv_cache_decoding_of_left_padded_prompts_matches_each_prompt_alone(tiny_dirs):
    model = load_model(tiny_dirs["student"]).eval()
    prompts = [[5, 9, 30, 31, 7], [12, 40], [3, 3, 3, 8]]
    ids, mask = left_pad(prompts, pad_id=0)
    greedy = lambda scores: scores.argmax(-1)  # noqa: E731
    batched = completions(decode(model, ids, mask, 7, greedy, set(), 0), ids.shape[1], set())
    for prompt, row in zip(prompts, batched):
        alone = torch.tensor([prompt])
        with torch.no_grad():
            reference = model.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=7, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
        assert row == reference[0, len(prompt):].tolist()


def test_a_completion_ends_at_its_first_end_of_sequence_token_which_is_kept():
    sequences = torch.tensor([[1, 2, 7, 9, 0, 0], [1, 2, 4, 5, 6, 8]])
    assert completions(sequences, 2, eos_ids={9}) == [[7, 9], [4, 5, 6, 8]]


def test_sampled_tokens_sit_on_the_common_byte_stream_and_the_teacher_reads_valid_text(tiny_tokenizers):
    student, teacher = tiny_tokenizers["student"], tiny_tokenizers["teacher"]
    table = vocab_bytes(student)
    question = "What is 3 + 4?"
    prompt = encode_prompt(student, question, table)
    answer_ids = student("It is 7, caf\u00e9.", add_special_tokens=False)["input_ids"]
    example, text, ended = completion_example(prompt, len(question.encode()), answer_ids + [student.eos_token_id],
                                              table, {student.eos_token_id}, set())
    assert text == "It is 7, caf\u00e9.".encode() and ended
    answer_bytes = len(question.encode()) + len(text)
    assert example.spans[-1] == (answer_bytes, answer_bytes + 1) and all(example.loss_mask[len(prompt.input_ids):])
    reader = encode_continuation(teacher, question, valid_text(text), ended)
    _, _, targets = example_chunks(reader, example)
    covered = sum(1 for span, target in zip(reader.spans, reader.loss_mask) if target and span)
    assert sum(targets) >= 1 and covered >= 1
    assert reader.loss_mask[-1] and reader.input_ids[-1] == teacher.eos_token_id

    assert valid_text("caf\u00e9".encode()[:-1]) == "caf"  # a sample cut inside a character
    cut, text, ended = completion_example(prompt, len(question.encode()), answer_ids, table, {student.eos_token_id},
                                          set())
    assert not ended and (encode_continuation(teacher, question, valid_text(text), ended).input_ids[-1]
                          != teacher.eos_token_id)


# -------------------------------------------------------------------------------- cross-tokenizer zero gradient


CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]
SPECIALS = ["<pad>", "<bos>", "<eot>"]


def _character_model(pieces: list[str], out_dir, embedding: torch.Tensor, layers: dict):
    """A Llama over a character-level tokenizer whose vocabulary is `pieces` in that order (every text has one
    tokenization, so another tokenizer's re-tokenization of a sample is unique)."""
    backend = Tokenizer(models.BPE(vocab={piece: index for index, piece in enumerate(pieces)}, merges=[]))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eot>", bos_token="<bos>",
                                        pad_token="<pad>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = PLAIN_TEMPLATE
    config = LlamaConfig(vocab_size=len(pieces), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.load_state_dict({**layers, "model.embed_tokens.weight": embedding, "lm_head.weight": embedding})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def permuted_pair(tmp_path_factory):
    """A student and a teacher with different tokenizers (the same characters under permuted ids) whose teacher
    is the student with its embedding rows permuted alike: both give every text the same likelihood."""
    root = tmp_path_factory.mktemp("permuted")
    pieces = SPECIALS + CHARACTERS
    order = list(range(len(pieces)))
    random.Random(0).shuffle(order)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(pieces), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=True))
    layers = {k: v for k, v in student.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    embedding = student.model.embed_tokens.weight.detach()
    _character_model(pieces, root / "student-source", embedding, layers)
    _character_model([pieces[i] for i in order], root / "teacher-source", embedding[order], layers)
    noisy = {k: v + 0.05 * torch.randn_like(v) if "mlp" in k else v for k, v in layers.items()}
    _character_model([pieces[i] for i in order], root / "noisy-source", embedding[order], noisy)
    for role in ("student", "teacher", "noisy"):
        materialize(HfModelSpec(source="hf", path=str(root / f"{role}-source")), root / role, root / "cache")
    records = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
               for a, b in [(3, 4), (10, 7), (2, 9), (5, 5)]]
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare = PrepareParams(source="jsonl", train_jsonl=str(root / "train.jsonl"), test_jsonl=str(root / "test.jsonl"),
                            n_train=4, n_test=4, max_length=512)
    run_prepare({"teacher": root / "teacher", "student": root / "student"}, root / "prepared", prepare)
    return root


def _first_gradient_norm(root, teacher, tiny_params, name) -> float:
    params = _params(tiny_params, steps=1, batch_size=4, loss="alm", on_policy=ON_POLICY)
    logged = []
    train(root / "prepared", root / "student", root / name / "model", root / name / "checkpoints",
          root / name / "history.csv", params, tiny_params.teacher_logits, root / teacher, None,
          log_metrics=lambda metrics, step: logged.append(metrics), runtime=Runtime.resolve(tiny_params.runtime))
    return logged[0]["grad_norm"]


ON_POLICY = {"fraction": 1.0, "max_new_tokens": 24}


def test_cross_tokenizer_on_policy_alm_has_zero_gradient_when_both_models_give_equal_chunk_likelihoods(
        permuted_pair, tiny_params):
    student, teacher = load_tokenizer(permuted_pair / "student"), load_tokenizer(permuted_pair / "teacher")
    assert student.get_vocab() != teacher.get_vocab()
    sampler = OnPolicySampler(student, teacher, set(), OnPolicyParams(**ON_POLICY), tiny_params.distill.seed)
    questions = [json.loads(line)["question"] for line in (permuted_pair / "train.jsonl").read_text().splitlines()]
    students, teachers = sampler(load_model(permuted_pair / "student"), questions, step=0)
    assert sum(sum(example_chunks(t, s)[2]) for s, t in zip(students, teachers)) >= 40, \
        "samples align into answer chunks"

    equal = _first_gradient_norm(permuted_pair, "teacher", tiny_params, "equal")
    different = _first_gradient_norm(permuted_pair, "noisy", tiny_params, "different")
    assert different > 1e-5
    assert equal < 1e-3 * different


# -------------------------------------------------------------------------------- agreement with TRL


def trl_gkd_inputs(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepared examples as TRL's GKD batch: (input_ids, attention_mask, labels with -100 off the targets)."""
    ids, mask = pad_batch([record["input_ids"] for record in records])
    is_target = torch.zeros_like(ids, dtype=torch.bool)
    for row, record in enumerate(records):
        is_target[row, : len(record["loss_mask"])] = torch.tensor(record["loss_mask"], dtype=torch.bool)
    return ids, mask, ids.masked_fill(~is_target, -100)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_generalized_jsd_step_loss_equals_trl_gkd_on_an_identical_batch(same_tokenizer_pair, tiny_params, beta):
    from trl.experimental.gkd import GKDTrainer

    root, dirs = same_tokenizer_pair
    params = _params(tiny_params, steps=1, loss="jsd", alpha=1.0, jsd={"beta": beta})
    logged = []
    train(root / "prepared", dirs["student"], root / f"trl-{beta}" / "model", root / f"trl-{beta}" / "checkpoints",
          root / f"trl-{beta}" / "history.csv", params, tiny_params.teacher_logits, dirs["teacher"], None,
          log_metrics=lambda metrics, step: logged.append(metrics), runtime=Runtime.resolve(tiny_params.runtime))

    records = [json.loads(line) for line in (root / "prepared" / "train.student.jsonl").read_text().splitlines()]
    indices = batch_indices(0, params.batch_size, len(records), tiny_params.teacher_logits.examples_per_shard,
                            params.seed)
    ids, mask, labels = trl_gkd_inputs([records[i] for i in indices])
    with torch.no_grad():
        student_logits = load_model(dirs["student"])(input_ids=ids, attention_mask=mask).logits
        teacher_logits = load_model(dirs["teacher"])(input_ids=ids, attention_mask=mask).logits
    reference = GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:],
                                                beta=beta)
    assert logged[0]["jsd_loss"] == pytest.approx(reference.item(), rel=1e-4)
    assert logged[0]["loss"] == logged[0]["jsd_loss"]
