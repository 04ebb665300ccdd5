"""Stage `prepare`: GSM-style train/test records, tokenized per model on common byte spans.

Inputs: `params.prepare`, the `models` stage's directories. Outputs (`data/prepared/`):
`train.jsonl`, `test.jsonl` (GSM8K format: question, answer ending `#### N`), `<split>.<role>.jsonl`
(per example: input_ids, common byte spans, loss mask; see `tokenbridge.data.chat`) and `manifest.json`.
Examples longer than `max_length` tokens for either model are dropped from every file alike.
"""

from __future__ import annotations

from pathlib import Path

from tokenbridge.config import PrepareParams
from tokenbridge.contracts import MANIFEST, ModelCard, ModelRef, PerRole, PreparedManifest, Splits, SplitSummary
from tokenbridge.data.chat import encode_example
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
        encoded = {role: [encode_example(tokenizers[role], r["question"], r["answer"], tables[role]) for r in records]
                   for role in ROLES}
        keep = [i for i in range(len(records))
                if all(len(encoded[role][i].input_ids) <= params.max_length for role in ROLES)]
        if not keep:
            raise ValueError(f"prepare: every {split} example is longer than max_length={params.max_length}; raise it")
        write_jsonl(out_dir / f"{split}.jsonl", (records[i] for i in keep))
        for role in ROLES:
            write_jsonl(out_dir / f"{split}.{role}.jsonl",
                        ({"index": n, **encoded[role][i].to_json()} for n, i in enumerate(keep)))
        summaries[split] = SplitSummary(
            examples=len(keep), dropped_too_long=len(records) - len(keep),
            tokens=PerRole[int](**{role: sum(len(encoded[role][i].input_ids) for i in keep) for role in ROLES}),
            sha256=PerRole[str](**{role: sha256_file(out_dir / f"{split}.{role}.jsonl") for role in ROLES}))
    cards = {role: ModelCard.of(model_dirs[role]) for role in ROLES}
    manifest = PreparedManifest(source=params.source, splits=Splits(**summaries), models=PerRole[ModelRef](
        **{role: ModelRef(name=card.name, tokenizer_sha256=card.tokenizer_sha256) for role, card in cards.items()}))
    manifest.write(out_dir / MANIFEST)
    return manifest
