"""Atomic file writes, hashes and manifests: how stages hand data to each other without losing any."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    Works for files and directories, so an interrupted stage never leaves a half-written output. A write killed
    before its cleanup (kill -9) leaves its temporary behind: the next write of the same path removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")  # tempfile.mkdtemp's names for this prefix
    for leftover in path.parent.iterdir():
        if stale.fullmatch(leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield temporary
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary.parent, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: Path, records_path: Path) -> str:
    """sha256 of a large file, remembered in `records_path` by (path, size, mtime, ctime, inode), so each version of
    the file is hashed once. Any write to it, and restoring its mtime afterwards, change its ctime, so a changed
    file is hashed again."""
    records = read_json(records_path) if records_path.exists() else {}
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
    if key not in records:
        records[key] = sha256_file(path)
        write_json(records_path, records)
    return records[key]


def fingerprint(data: Any) -> str:
    """A stable short hash of JSON-able data: decides whether saved progress belongs to this configuration."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

