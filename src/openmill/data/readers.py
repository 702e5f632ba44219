"""Document readers: every stage that reads text goes through `read_documents`.

Formats by file name: `.jsonl` (optionally `.gz`), one JSON object a line holding a text field;
`.txt`, the whole file is one document. Documents stream: memory does not grow with the file.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class Document:
    text: str
    id: str  # "<file>:<line>" unless the record carries its own id
    source: str  # the file it came from


def _open_text(path: Path) -> IO[str]:
    # errors="strict": a non-UTF-8 byte is an error that names the file, never a silent U+FFFD.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.removesuffix(".gz")
    if name.endswith(".txt"):
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
        if text.strip():
            yield Document(text=text, id=str(path), source=str(path))
        return
    if not name.endswith(".jsonl"):
        raise DataError(f"{path}: unknown format; expected .jsonl, .jsonl.gz, .txt or .txt.gz")
    with _open_text(path) as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 (byte {e.start} of the decoded chunk)") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: expected a string field {text_field!r}")
            doc_id = record.get("id")
            yield Document(text=text, id=str(doc_id) if doc_id is not None else f"{path}:{lineno}", source=str(path))


def check_corpus(files: list[Path], text_field: str, where: str) -> int:
    """Fail early, before any training: every file exists, decodes, and the set holds some text.

    Returns the number of documents. `where` names the recipe field, e.g. "data.domains.en.train".
    """
    if not files:
        raise DataError(f"{where}: no files listed")
    count = 0
    for path in files:
        n = sum(1 for d in read_documents(path, text_field) if d.text.strip())
        if n == 0:
            raise DataError(f"{path}: empty corpus (no non-empty documents) in {where}")
        count += n
    return count
