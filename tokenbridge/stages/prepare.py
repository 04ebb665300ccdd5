"""Stage `prepare`: GSM-style train/test records, tokenized per model on common byte spans.

Inputs: `params.prepare`, the `models` stage's directories. Outputs (`data/prepared/`):
`train.jsonl`, `test.jsonl` (GSM8K format: question, answer ending `#### N`), `<split>.<role>.jsonl`
(per example: input_ids, common byte spans, loss mask; see `tokenbridge.data.chat`) and `manifest.json`.
Examples longer than `max_length` tokens for either model are dropped from every file alike, and so are examples
one of the models cannot read byte for byte (its chat template rewrites the content, or its tokenizer normalises
it: `tokenbridge.data.chat.UnalignableExample`); the manifest counts both.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenbridge.config import PrepareParams
from tokenbridge.contracts import MANIFEST, ModelCard, ModelRef, PerRole, PreparedManifest, Splits, SplitSummary
from tokenbridge.data.chat import Encoded, UnalignableExample, encode_example
from tokenbridge.data.gsm import generate_gsm_symbolic, read_gsm_jsonl
from tokenbridge.io import sha256_file, write_jsonl
from tokenbridge.models import load_tokenizer
from tokenbridge.token_bytes import vocab_bytes

ROLES = ("teacher", "student")


def load_records(params: PrepareParams) -> tuple[list[dict], list[dict]]:
    if params.source == "jsonl":
        assert params.train_jsonl and params.test_jsonl  # PrepareParams requires both for a jsonl source
        return (read_gsm_jsonl(Path(params.train_jsonl), params.n_train),
                read_gsm_jsonl(Path(params.test_jsonl), params.n_test))
    return generate_gsm_symbolic(params.n_train, params.n_test, params.test_template_fraction, params.seed)


def run_prepare(model_dirs: dict[str, Path], out_dir: Path, params: PrepareParams) -> PreparedManifest:
    tokenizers = {role: load_tokenizer(model_dirs[role]) for role in ROLES}
    tables = {role: vocab_bytes(tokenizer) for role, tokenizer in tokenizers.items()}
    splits = dict(zip(("train", "test"), load_records(params)))
    summaries = {}
    for split, records in splits.items():
        kept: list[dict] = []
        encoded: dict[str, list[Encoded]] = {role: [] for role in ROLES}
        unalignable: list[str] = []
        for record in records:
            try:
                pair = {role: encode_example(tokenizers[role], record["question"], record["answer"], tables[role])
                        for role in ROLES}
            except UnalignableExample as error:
                unalignable.append(str(error))
                continue
            if all(len(pair[role].input_ids) <= params.max_length for role in ROLES):
                kept.append(record)
                for role in ROLES:
                    encoded[role].append(pair[role])
        if unalignable:
            print(f"prepare: skipped {len(unalignable)} {split} example(s) a model cannot read byte for byte; the "
                  f"first: {unalignable[0]}", file=sys.stderr)  # a skip decision: shown under dvc too
        if not kept:
            raise ValueError(f"prepare: no {split} example is left ({len(unalignable)} cannot be aligned, the rest are "
                             f"longer than max_length={params.max_length}): raise max_length, or use models whose chat "
                             "templates keep the content verbatim")
        write_jsonl(out_dir / f"{split}.jsonl", kept)
        for role in ROLES:
            write_jsonl(out_dir / f"{split}.{role}.jsonl",
                        ({"index": n, **example.to_json()} for n, example in enumerate(encoded[role])))
        summaries[split] = SplitSummary(
            examples=len(kept), dropped_too_long=len(records) - len(kept) - len(unalignable),
            dropped_unalignable=len(unalignable),
            tokens=PerRole[int](**{role: sum(len(example.input_ids) for example in encoded[role]) for role in ROLES}),
            sha256=PerRole[str](**{role: sha256_file(out_dir / f"{split}.{role}.jsonl") for role in ROLES}))
    cards = {role: ModelCard.of(model_dirs[role]) for role in ROLES}
    manifest = PreparedManifest(source=params.source, splits=Splits(**summaries), models=PerRole[ModelRef](
        **{role: ModelRef(name=card.name, tokenizer_sha256=card.tokenizer_sha256) for role, card in cards.items()}))
    manifest.write(out_dir / MANIFEST)
    return manifest
