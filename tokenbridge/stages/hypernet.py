"""Stage `hypernet`: train an embedding hypernetwork that moves the base model onto any tokenizer without training
(ZeTT; docs/algorithms/hypernetwork.md).

1. A tokenizer pool: BPE and Unigram tokenizers trained on the train split's texts at each of
   `pool_vocab_sizes`, and the base tokenizer itself (without its special tokens): the trained ones are as small
   as the training text, while the tokenizers the hypernetwork meets (Qwen2.5's, Gemma-3's) are as large as the
   base's and mostly share its tokens; and a held-out BPE tokenizer trained on the test split's texts, never
   trained on.
2. Identity warm-up (`identity_steps`): the hypernetwork learns to reproduce the base rows of sampled base tokens,
   each read as its own single piece or as the base's spelling of its bytes split in two.
3. ALM (`steps`): each step samples a pool tokenizer and a random sub-vocabulary of it, predicts all its rows,
   runs the frozen base model with them on a batch in that tokenizer, and trains only the hypernetwork with ALM
   against the base model on its own tokenizer (self-distillation), plus next-token CE when `loss` has `sft`,
   plus ZeTT's auxiliary loss (`identity_weight`): the rows predicted for tokens the base also has stay near the
   base rows, so training on other vocabularies does not drift the rows every vocabulary shares.

Inputs: data/prepared/{train,test}.jsonl (texts), the base role's model directory. Outputs: models/hypernet/
(hypernet.pt, hypernet.json, pool/<name>/ and heldout_tokenizer/, each a HF tokenizer in the base's chat format),
metrics/hypernet.csv (per step), metrics/hypernet.json.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenbridge.config import TeacherTruncation
from tokenbridge.contracts import ContractError, HypernetCard, HypernetMetrics, HypernetTraining, ModelCard, ModelRef
from tokenbridge.data.chat import Encoded, encode_example
from tokenbridge.io import atomic_path, fingerprint, read_jsonl, write_text
from tokenbridge.losses.alm import AlmLoss
from tokenbridge.losses.base import LossOutput, LossSetup, Mean, TeacherView
from tokenbridge.losses.sft import sft_mean
from tokenbridge.models import (
    input_embeddings,
    load_model,
    load_tokenizer,
    model_identity,
    output_embeddings,
    save_tokenizer,
)
from tokenbridge.models.gguf import default_cache_dir
from tokenbridge.models.hypernet import (
    CARD,
    Hypernet,
    base_rows,
    on_predicted_rows,
    predict_rows,
    save_hypernet,
    standardisation,
    token_pieces,
)
from tokenbridge.models.retokenize import is_tied
from tokenbridge.models.tokenizer_pool import learned_tokens, sub_vocabulary, train_backend, with_chat_format
from tokenbridge.models.vocabulary import fvt_rows, source_bytes_index, spellings, vocabulary_map
from tokenbridge.params import HypernetParams
from tokenbridge.paths import HYPERNET_HELDOUT
from tokenbridge.runtime import Runtime
from tokenbridge.stopping import safe_points
from tokenbridge.token_bytes import boundary_mask, special_ids, vocab_bytes
from tokenbridge.training.batching import Batch, batch_indices, make_batch
from tokenbridge.training.checkpoint import Checkpoint, code_version
from tokenbridge.training.engine import Engine
from tokenbridge.training.history import history_csv, median
from tokenbridge.training.parallel import TrainingModule
from tokenbridge.training.ranks import Ranks
from tokenbridge.training.schedules import learning_rate
from tokenbridge.training.teachers import LiveTeacher, Teacher
from tokenbridge.training.views import student_view

CHUNK_SIZE = 128  # positions per slice of a vocabulary projection
HELDOUT_BACKEND = "heldout"  # the held-out tokenizer's name beside the pool's (which are named <kind>-<size>)
HISTORY_COLUMNS = ("step", "phase", "loss", "alm_loss", "identity_error", "tokenizer", "vocab_size", "learning_rate",
                   "grad_norm", "seconds")


def _texts(records: list[dict]) -> list[str]:
    return [f"{record['question']}\n{record['answer']}" for record in records]


def identity_spellings(base: PreTrainedTokenizerBase, max_pieces: int, seed: int) -> dict[int, list[list[int]]]:
    """Base id -> the spellings the warm-up reads it from: itself, and (for tokens of two bytes or more) the base's
    spellings of its bytes split at a random point, so the warm-up also teaches composing pieces."""
    table = vocab_bytes(base)
    specials = special_ids(base)
    by_bytes = source_bytes_index(base, table)
    ids = [index for index, piece in enumerate(table) if piece and index not in specials]
    rng = random.Random(seed)
    cuts = {index: rng.randint(1, len(table[index]) - 1) for index in ids if len(table[index]) > 1}
    halves = [part for index, cut in cuts.items() for part in (table[index][:cut], table[index][cut:])]
    spelled = spellings(base, table, by_bytes, halves)
    out = {index: [[index]] for index in ids}
    for position, index in enumerate(cuts):
        left, right = spelled[2 * position], spelled[2 * position + 1]
        if left and right:
            out[index].append((left + right)[:max_pieces])
    return out


def identity_warmup(hypernet: Hypernet, rows: torch.Tensor, spellings_of: dict[int, list[list[int]]],
                    params: HypernetParams, checkpoint: Callable[[torch.optim.Optimizer], Checkpoint]) -> list[dict]:
    """Train the hypernetwork to map base spellings to the base rows (mean squared error in the rows' standard
    units); returns its history. Each step draws from its own generator, so a resumed run draws what an
    uninterrupted one would."""
    if params.identity_steps == 0:
        return []
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=params.identity_learning_rate, weight_decay=0.0)
    state = checkpoint(optimizer)
    done, history = state.resume()
    ids = list(spellings_of)
    with safe_points():  # SIGTERM / SIGINT: finish the step, checkpoint, stop
        for step in tqdm(range(done, params.identity_steps), desc="hypernet (identity)", unit="step", initial=done,
                         total=params.identity_steps):
            started = time.perf_counter()
            generator = random.Random(f"{params.seed}-identity-{step}")
            chosen = generator.sample(ids, min(params.identity_batch, len(ids)))
            pieces = {position: generator.choice(spellings_of[index]) for position, index in enumerate(chosen)}
            rate = learning_rate(step, params.identity_steps, params.identity_learning_rate, 0)
            for group in optimizer.param_groups:
                group["lr"] = rate
            order, predicted = predict_rows(hypernet, rows, pieces)
            targets = rows[torch.tensor(chosen, device=rows.device)[order]].float()
            loss = ((predicted - targets) / hypernet.std).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(hypernet.parameters(), params.max_grad_norm)
            optimizer.step()
            error = loss.item()
            history.append({"step": step + 1, "phase": "identity", "loss": error, "identity_error": error,
                            "tokenizer": "base", "vocab_size": len(chosen), "learning_rate": rate,
                            "grad_norm": float(grad_norm), "seconds": time.perf_counter() - started})
            done = step + 1
            state.at_step_end(done, history, due=_checkpoint_due(done, params.identity_steps, params))
    return history


def _checkpoint_due(done: int, steps: int, params: HypernetParams) -> bool:
    """Every `checkpoint_every` steps and at a phase's end (kept, so the next phase can resume after it)."""
    return done == steps or done % params.checkpoint_every == 0


def hypernet_forward(hypernet: Hypernet, student: PreTrainedModel, rows: torch.Tensor, alm: AlmLoss, tied: bool):
    """The training forward for one sampled vocabulary: predict its rows (FVT's where the hypernetwork has no
    spelling: special and missing tokens), run the frozen base model on them, and score ALM (and CE), and the
    auxiliary loss keeping the rows of the tokens the base shares near the base rows (`identity`)."""
    embedding, head = on_predicted_rows(student)
    width = rows.shape[1] if tied else rows.shape[1] // 2

    def forward(vocabulary: dict, batch: Batch, teacher: TeacherView, names: list[str],
                counts_only: bool) -> dict[str, LossOutput]:
        table = vocabulary["fixed"]
        if not counts_only:
            ids, predicted = predict_rows(hypernet, rows, vocabulary["pieces"])
            table = table.index_put((ids,), predicted)
        embedding.rows = table[:, :width]
        head.rows = table if tied else table[:, width:]
        view = student_view(student, batch, vocabulary["size"], vocabulary["boundary"], CHUNK_SIZE, counts_only)
        outputs = {"alm": alm(view, teacher, batch.alignment)}
        if "sft" in names:
            outputs["sft"] = LossOutput((sft_mean(view.token_logprobs, view.loss_mask),))
        if "identity" in names:
            targets, sources = vocabulary["shared"]
            error = ((table[targets] - rows[sources]) / hypernet.std).pow(2).mean(-1)
            outputs["identity"] = LossOutput((Mean(error.mean() if len(targets) else error.sum(), len(targets)),))
        return outputs

    return forward


def sampled_vocabulary(base: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase, host_rows: torch.Tensor,
                       device: torch.device, params: HypernetParams) -> dict:
    """What one step's forward needs about its vocabulary, on `device`: its size, each token's pieces, the rows the
    hypernetwork does not predict (FVT's: special and missing tokens), the tokens it shares with the base (target
    ids, base ids) and its word-start mask. `host_rows`: the base rows on the CPU, where FVT's per-token copies
    run (kept there once, not copied off the device every step)."""
    mapping = vocabulary_map(base, tokenizer)
    pairs = [(index, source) for index, source in mapping.exact.items() if index not in mapping.target_specials]
    shared = torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2)
    return {"size": len(tokenizer), "pieces": token_pieces(mapping, params.max_pieces),
            "shared": (shared[:, 0], shared[:, 1]),
            "fixed": fvt_rows(base, tokenizer, host_rows, params.seed, mapping)[0].to(device),
            "boundary": boundary_mask(tokenizer, len(tokenizer)).to(device)}


def sampled_batch(tokenizer: PreTrainedTokenizerBase, records: list[dict], teachers: list[Encoded],
                  teacher_boundary: torch.Tensor, boundary: torch.Tensor) -> Batch:
    """The records in the sampled tokenizer, aligned with the base tokenizer's encodings of them."""
    table = vocab_bytes(tokenizer)
    students = [encode_example(tokenizer, record["question"], record["answer"], table) for record in records]
    return make_batch(students, teachers, {"teacher": teacher_boundary.cpu(), "student": boundary.cpu()})


def tokenizer_pool(records: list[dict], test_records: list[dict], params: HypernetParams, directory: Path,
                   key: str) -> tuple[dict[str, Tokenizer], Tokenizer]:
    """The trained pool tokenizers (name -> tokenizer) and the held-out one, trained once per `key` (the texts, the
    pool's params and the code) and kept in `directory`: HF's Unigram trainer gives slightly different scores (and so
    ids and splits) from run to run, so a resumed run, or one with other training params, reads the tokenizers
    already trained instead of training them again. Always read back from `directory` (a score's JSON round trip
    may move its last bit), so the first run trains on exactly what a rerun reads."""
    marker = directory / "fingerprint"
    if not (marker.exists() and marker.read_text() == key):
        texts = _texts(records)
        trained = {f"{kind}-{size}": train_backend(kind, size, texts)
                   for kind in params.pool_kinds for size in params.pool_vocab_sizes}
        trained[HELDOUT_BACKEND] = train_backend("bpe", params.heldout_vocab_size, _texts(test_records))
        with atomic_path(directory) as temporary:
            temporary.mkdir(parents=True)
            for name, backend in trained.items():
                backend.save(str(temporary / f"{name}.json"))
            (temporary / marker.name).write_text(key)
    saved = {path.stem: Tokenizer.from_file(str(path)) for path in sorted(directory.glob("*.json"))}
    return {name: backend for name, backend in saved.items() if name != HELDOUT_BACKEND}, saved[HELDOUT_BACKEND]


def train_hypernet(prepared_dir: Path, base_dir: Path, out_dir: Path, history_path: Path, params: HypernetParams,
                   runtime: Runtime, checkpoint_dir: Path) -> HypernetCard:
    """Train the hypernetwork for the model in `base_dir` and save it at `out_dir`; a finished output of the same
    configuration is kept as it is. Each phase checkpoints under `checkpoint_dir/<phase>` every `checkpoint_every`
    steps and at its end, so a rerun resumes where a stop or a crash left it; SIGTERM / SIGINT stop it after the
    current step, with a checkpoint. The tokenizer pool is kept in `checkpoint_dir/pool`."""
    records = read_jsonl(Path(prepared_dir) / "train.jsonl")
    test_records = read_jsonl(Path(prepared_dir) / "test.jsonl")
    base_card = ModelCard.of(base_dir)
    identity = {"params": params.model_dump(), "base": model_identity(base_dir),
                "records": fingerprint(records), "test": fingerprint(test_records), "code": code_version(__file__)}
    key = fingerprint(identity)
    try:
        finished: HypernetCard | None = HypernetCard.read(out_dir / CARD)
    except ContractError:
        finished = None
    if finished is not None and finished.fingerprint == key:
        print(f"hypernet: {out_dir} is up to date", file=sys.stderr)
        return finished

    torch.manual_seed(params.seed)
    base_tokenizer = load_tokenizer(base_dir)
    pool_key = fingerprint({part: identity[part] for part in ("records", "test", "code")}
                           | {"pool": [params.pool_kinds, params.pool_vocab_sizes, params.heldout_vocab_size]})
    trained, heldout = tokenizer_pool(records, test_records, params, checkpoint_dir / "pool", pool_key)
    pool = {"base": learned_tokens(base_tokenizer), **trained}

    device = runtime.device
    student = load_model(base_dir, torch.float32).to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    tied = is_tied(student)
    rows = base_rows(input_embeddings(student).detach(), None if tied else output_embeddings(student).detach())
    rows = rows.float().clone()
    mean, std = standardisation(rows, len(base_tokenizer))
    hypernet = Hypernet(rows.shape[1], params.layers, params.heads, params.max_pieces, mean, std).to(device)

    def checkpoint(phase: str) -> Callable[[torch.optim.Optimizer], Checkpoint]:
        return lambda optimizer: Checkpoint(checkpoint_dir / phase, identity, hypernet, optimizer, Ranks())

    history = identity_warmup(hypernet, rows, identity_spellings(base_tokenizer, params.max_pieces, params.seed),
                              params, checkpoint("identity"))
    identity_error = history[-1]["identity_error"] if history else None

    base_table = vocab_bytes(base_tokenizer)
    teachers = [encode_example(base_tokenizer, r["question"], r["answer"], base_table) for r in records]
    usable = [index for index, encoded in enumerate(teachers) if len(encoded.input_ids) <= params.max_length]
    if params.steps and not usable:
        raise ValueError(f"hypernet: every training example is longer than max_length={params.max_length}; raise it")
    teacher = LiveTeacher(Teacher.load(base_dir, runtime.inference_dtype, device), teachers, TeacherTruncation(),
                          1.0, CHUNK_SIZE)
    alm = AlmLoss(params.alm, LossSetup(base_dir, base_dir, same_tokenizer=False, cache_dir=default_cache_dir()))
    forward = hypernet_forward(hypernet, student, rows, alm, tied)
    vocabulary: dict = {}
    module = TrainingModule(student, torch.nn.ModuleDict({"hypernet": hypernet}),
                            lambda *args: forward(vocabulary, *args))
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=params.learning_rate, weight_decay=0.0)
    engine = Engine(module, optimizer, runtime, Ranks(), params.max_grad_norm)
    state = checkpoint("alm")(optimizer)
    done, saved = state.resume() if params.steps else (0, [])
    if done:
        history = saved
    weights: dict[str, float] = {**{name: 1.0 for name in params.loss}, "identity": params.identity_weight}
    host_rows = rows.cpu()
    with safe_points():  # SIGTERM / SIGINT: finish the step, checkpoint, stop
        for step in tqdm(range(done, params.steps), desc="hypernet (alm)", unit="step", initial=done,
                         total=params.steps):
            started = time.perf_counter()
            rng = random.Random(f"{params.seed}-alm-{step}")  # per step: a resumed run draws the same tokenizers
            name = rng.choice(sorted(pool))
            tokenizer = with_chat_format(sub_vocabulary(pool[name], rng.uniform(params.sub_vocabulary_min, 1.0), rng),
                                         base_tokenizer)
            vocabulary.update(sampled_vocabulary(base_tokenizer, tokenizer, host_rows, device, params))
            indices = [usable[i] for i in batch_indices(step, params.batch_size, len(usable), len(usable), params.seed)]
            batch = sampled_batch(tokenizer, [records[i] for i in indices], teacher.examples(indices)[0],
                                  teacher.teacher.boundary, vocabulary["boundary"]).to(device)
            rate = learning_rate(step, params.steps, params.learning_rate, min(params.warmup_steps, params.steps))
            result = engine.step([batch], [teacher.view(batch)], weights, rate, f"hypernet step {step}")
            history.append({"step": step + 1, "phase": "alm", "loss": result.loss, "alm_loss": result.values["alm"],
                            "identity_error": result.values.get("identity"), "tokenizer": name,
                            "vocab_size": len(tokenizer), "learning_rate": rate, "grad_norm": result.grad_norm,
                            "seconds": time.perf_counter() - started})
            done = step + 1
            state.at_step_end(done, history, due=_checkpoint_due(done, params.steps, params))

    losses = [entry["loss"] for entry in history if entry["phase"] == "alm"]
    alm_seconds = [entry["seconds"] for entry in history if entry["phase"] == "alm"]
    training = HypernetTraining(identity_steps=params.identity_steps, identity_error=identity_error,
                                steps=params.steps, first_loss=losses[0] if losses else None,
                                final_loss=losses[-1] if losses else None,
                                median_seconds_per_step=median(alm_seconds) if alm_seconds else None)
    card = HypernetCard(base=ModelRef(name=base_card.name, tokenizer_sha256=base_card.tokenizer_sha256),
                        width=rows.shape[1], tied=tied, layers=params.layers, heads=params.heads,
                        max_pieces=params.max_pieces, pool=sorted(pool),
                        heldout=f"bpe-{params.heldout_vocab_size} (test split)", fingerprint=key, training=training)
    with atomic_path(out_dir) as temporary:
        temporary.mkdir(parents=True)
        save_hypernet(hypernet.cpu(), temporary)
        for name, backend in pool.items():
            save_tokenizer(with_chat_format(backend, base_tokenizer), temporary / "pool" / name)
        save_tokenizer(with_chat_format(heldout, base_tokenizer), temporary / HYPERNET_HELDOUT.name)
        card.write(temporary / CARD)
    write_text(history_path, history_csv(history, HISTORY_COLUMNS))
    return card


def hypernet_metrics(card: HypernetCard) -> HypernetMetrics:
    return HypernetMetrics(**card.training.model_dump())
