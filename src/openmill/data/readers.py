"""Document readers: every stage that reads text goes through this module.

Formats, chosen by file name:
  `.jsonl`  one JSON object a line holding a text field (and optionally an id field);
  `.txt`    the whole file is one document;
  `.parquet` one row per document (columns named by the text and id fields);
each of `.jsonl` and `.txt` optionally compressed: `.gz`, `.zst`, `.xz`.
`expand_paths` turns directories (recursive) and globs into a sorted list of such files.

Documents stream: memory holds one record (and one parquet batch) at a time, never the file.
Lines are split on raw bytes and decoded one by one, so a bad byte, a broken JSON line or a
gigantic record costs that record only. `iter_records` yields a `BadRecord` for each such line
(the curate stage counts them and writes them to its rejects); `read_documents` raises a
`DataError` naming file and line (strict, the default) or skips them (`strict=False`).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".jsonl", ".txt")
COMPRESSIONS = ("", ".gz", ".zst", ".xz")
SUFFIXES = tuple(s + c for s in TEXT_SUFFIXES for c in COMPRESSIONS) + (".parquet",)


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class Document:
    text: str
    id: str  # "<file>:<line>" unless the record carries its own id
    source: str  # the file it came from
    line: int = 0  # 1-based line (jsonl) or row (parquet) in `source`; 0 for a whole-file .txt
    origin: str | None = None  # the record's own "source" field, when it has one (e.g. a dataset name)


@dataclass(frozen=True)
class BadRecord:
    """A line or file that cannot become a document; `reason` is a slug, `message` one line for people."""

    source: str
    line: int
    reason: str  # bad_utf8 | bad_json | not_an_object | missing_text_field | too_large | empty_file | corrupt_file
    message: str
    raw: str = ""  # the first bytes of the offending line, decoded with replacement, for the rejects file
    nbytes: int = 0  # size of the offending line or file, so reports can count the bytes that were dropped


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFile(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdFile(io.RawIOBase):
    """A .zst file as bytes, frame after frame; raises EOFError when the file ends inside a frame.

    zstandard's own stream_reader ends quietly at a cut frame, which would drop the rest of the
    file's documents without a trace (gzip and lzma raise EOFError there).
    """

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, "rb")
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._inside_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._file.read(1 << 17)
            if not data:
                if self._inside_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated?)")
                return 0
            self._out = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            parts.append(self._frame.decompress(data))
            self._inside_frame = not self._frame.eof
            if self._inside_frame:
                break
            data = self._frame.unused_data  # the next frame's first bytes, if any
            self._frame = self._new_frame()
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()
        super().close()


def _base_name(path: Path) -> str:
    name = path.name
    for c in COMPRESSIONS[1:]:
        if name.endswith(c):
            return name[: -len(c)]
    return name


def _preview(raw: bytes, n: int = 200) -> str:
    return raw[:n].decode("utf-8", errors="replace")


def _lines(f: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line number, bytes, size without the newline) per line, holding at most `max_bytes` + 2 of it.

    A line longer than `max_bytes` (its newline not counted) comes back cut to its first 256 bytes,
    with its full size.
    """
    lineno = 0
    while True:
        line = f.readline(max_bytes + 2)  # the content, its newline, and one byte to see a longer line
        if not line:
            return
        lineno += 1
        newline = line.endswith(b"\n")
        size = len(line) - newline
        if size > max_bytes:
            while not newline:  # drain the rest of the gigantic line without keeping it
                rest = f.readline(1 << 20)
                newline = not rest or rest.endswith(b"\n")
                size += len(rest) - rest.endswith(b"\n")
            line = line[:256]
        yield lineno, line, size


def _jsonl(path: Path, text_field: str, id_field: str, max_bytes: int) -> Iterator[Document | BadRecord]:
    src = str(path)
    with _open_binary(path) as f:
        for lineno, raw, size in _lines(f, max_bytes):
            if size > max_bytes:
                msg = f"{src}:{lineno}: line of {size} bytes, longer than max {max_bytes}"
                yield BadRecord(src, lineno, "too_large", msg, _preview(raw), size)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{src}:{lineno}: not valid UTF-8 (byte {e.start} of the line)"
                yield BadRecord(src, lineno, "bad_utf8", msg, _preview(raw), size)
                continue
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(src, lineno, "bad_json", f"{src}:{lineno}: not valid JSON ({e.msg})", _preview(raw), size)
                continue
            if not isinstance(record, dict):
                msg = f"{src}:{lineno}: expected a JSON object"
                yield BadRecord(src, lineno, "not_an_object", msg, _preview(raw), size)
                continue
            text = record.get(text_field)
            if not isinstance(text, str):
                msg = f"{src}:{lineno}: expected a string field {text_field!r}"
                yield BadRecord(src, lineno, "missing_text_field", msg, _preview(raw), size)
                continue
            if b"\\u" in raw and (at := _lone_surrogate_at(text)) is not None:
                msg = f"{src}:{lineno}: field {text_field!r} holds a lone UTF-16 surrogate (a \\u escape) at {at}"
                yield BadRecord(src, lineno, "bad_utf8", msg, _preview(raw), size)
                continue
            doc_id = record.get(id_field)
            origin = record.get("source")
            yield Document(
                text=text,
                id=str(doc_id) if doc_id is not None else f"{src}:{lineno}",
                source=src,
                line=lineno,
                origin=origin if isinstance(origin, str) else None,
            )


def _lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds half a UTF-16 surrogate pair, or None.

    Valid JSON may escape one ("\\ud800"); such a string cannot be written as UTF-8, so it would
    crash a later stage far from its file and line.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _txt(path: Path, max_bytes: int) -> Iterator[Document | BadRecord]:
    src = str(path)
    with _open_binary(path) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        yield BadRecord(src, 0, "too_large", f"{src}: larger than {max_bytes} bytes", _preview(raw), path.stat().st_size)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield BadRecord(src, 0, "bad_utf8", f"{src}: not valid UTF-8 at byte {e.start}", _preview(raw), len(raw))
        return
    text = text.removeprefix("\ufeff")
    if text.strip():
        yield Document(text=text, id=src, source=src)


def _parquet(path: Path, text_field: str, id_field: str, max_bytes: int) -> Iterator[Document | BadRecord]:
    import pyarrow.parquet as pq

    src = str(path)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        yield BadRecord(src, 0, "missing_text_field", f"{src}: no column {text_field!r}; columns: {', '.join(names)}")
        return
    # The same optional columns as a jsonl record's fields: an id, and the record's own "source".
    extra = [c for c in (id_field, "source") if c in names and c != text_field]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field, *dict.fromkeys(extra)]):
        texts = batch.column(text_field).to_pylist()
        none = [None] * len(texts)
        ids = batch.column(id_field).to_pylist() if id_field in extra else none
        origins = batch.column("source").to_pylist() if "source" in extra else none
        for text, doc_id, origin in zip(texts, ids, origins):
            row += 1
            if not isinstance(text, str):
                yield BadRecord(
                    src, row, "missing_text_field", f"{src}:{row}: expected a string in column {text_field!r}"
                )
                continue
            # Characters are at most bytes, so only a long text needs the exact (encoding) count.
            nbytes = len(text.encode("utf-8")) if len(text) > max_bytes // 4 else 0
            if nbytes > max_bytes:
                msg = f"{src}:{row}: text of {nbytes} bytes, longer than max {max_bytes}"
                yield BadRecord(src, row, "too_large", msg, text[:200], nbytes)
            else:
                yield Document(
                    text=text,
                    id=str(doc_id) if doc_id is not None else f"{src}:{row}",
                    source=src,
                    line=row,
                    origin=origin if isinstance(origin, str) else None,
                )


def _corrupt_file_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    import zstandard

    return (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, pyarrow.ArrowException)


def iter_records(
    path: str | Path, text_field: str = "text", id_field: str = "id", max_bytes: int = 64 << 20
) -> Iterator[Document | BadRecord]:
    """Every document of one file, and a `BadRecord` for every line that is not one.

    `max_bytes` bounds one record (a jsonl line, a whole .txt file): a longer one is a `too_large`
    BadRecord and is never held in memory whole. An empty file (no documents, no bad lines) yields
    one `empty_file` BadRecord, so nothing is skipped without a trace.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = _base_name(path)
    if path.name.endswith(".parquet"):
        records = _parquet(path, text_field, id_field, max_bytes)
    elif name.endswith(".jsonl"):
        records = _jsonl(path, text_field, id_field, max_bytes)
    elif name.endswith(".txt"):
        records = _txt(path, max_bytes)
    else:
        raise DataError(f"{path}: unknown format; expected one of {', '.join(SUFFIXES)}")
    empty = True
    try:
        for rec in records:
            empty = False
            yield rec
    except _corrupt_file_errors() as e:  # a truncated or corrupt compressed stream or parquet file
        yield BadRecord(str(path), 0, "corrupt_file", f"{path}: cannot be read to the end ({e})".replace("\n", " "))
        return
    if empty:
        yield BadRecord(str(path), 0, "empty_file", f"{path}: empty (no documents)")


def read_documents(
    path: str | Path,
    text_field: str = "text",
    id_field: str = "id",
    *,
    strict: bool = True,
    on_bad: Callable[[BadRecord], None] | None = None,
    max_bytes: int = 64 << 20,
) -> Iterator[Document]:
    """The documents of one file. Strict: a bad line raises DataError naming file and line.

    Lenient (`strict=False`): bad lines are skipped and handed to `on_bad` (to count or log them).
    An empty file yields nothing in either mode (`check_corpus` is what rejects empty corpora).
    """
    for rec in iter_records(path, text_field, id_field, max_bytes):
        if isinstance(rec, Document):
            yield rec
        elif rec.reason == "empty_file":
            continue
        elif strict:
            raise DataError(rec.message)
        elif on_bad is not None:
            on_bad(rec)


def expand_paths(patterns: list[str | Path]) -> list[Path]:
    """Files named by paths, directories (every supported file below, recursively) and globs; sorted, unique.

    A pattern that matches nothing is an error naming it: a typo must not silently shrink a corpus.
    """
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.exists():
            found = [p]
        elif glob.has_magic(str(pattern)):
            found = sorted(Path(f) for f in glob.glob(str(pattern), recursive=True) if Path(f).is_file())
        else:
            raise DataError(f"{pattern}: file not found")
        if not found:
            raise DataError(f"{pattern}: matches no {', '.join(SUFFIXES)} file")
        out.extend(found)
    seen: set[Path] = set()
    return [f for f in out if not (f in seen or seen.add(f))]


def check_corpus(files: list[Path], text_field: str, where: str, strict: bool = True) -> int:
    """Fail early, before any training: every file exists, decodes, and the set holds some text.

    Returns the number of documents. `where` names the recipe field, e.g. "data.domains.en.train".
    With `strict=False` (raw input of the curate stage, which counts and rejects bad lines itself)
    only missing files and a corpus with no document at all are errors.
    """
    if not files:
        raise DataError(f"{where}: no files listed")
    count = 0
    for path in expand_paths(files):
        n = sum(1 for d in read_documents(path, text_field, strict=strict) if d.text.strip())
        if n == 0 and strict:
            raise DataError(f"{path}: empty corpus (no non-empty documents) in {where}")
        count += n
    if count == 0:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: empty corpus (no non-empty documents) in {where}")
    return count
