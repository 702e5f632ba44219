"""The two per-shard jobs of the curate stage, plain functions that any executor (process pool, Ray) runs.

`filter_chunk`: one chunk of `docs_per_shard` records of an input file (`file_chunks` cuts them)
through the domain pipeline, written to work/filter/<domain>/<split>/<file>-<chunk>.*:
  kept.jsonl.gz  the documents that passed, normalized (and masked)
  rejects.jsonl.gz  every record dropped by the reader or a filter, with file, line, filter, reason
  dedup.npz  exact hash, MinHash signature and LSH band keys of each kept document; signals
  stats.json  counters; written last, it is the chunk's completion marker
A rerun skips chunks whose marker exists (the records are still read to find the next chunk).
`filter_file` does a whole file in one call (a Ray task); the local executor reads files in the
main process and hands chunks to its workers, so even a single file uses every core.

`write_part`: one chunk's kept documents minus those dedup dropped -> the clean part, and the
chunk's rejects plus its dedup rejects -> the rejects part; a marker in work/ records completion.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openmill.data.curate.config import DedupConfig, Rules
from openmill.data.curate.doc import SIGNALS
from openmill.data.curate.minhash import MinHasher, band_keys, shingles
from openmill.data.curate.pipeline import DomainPipeline
from openmill.data.readers import BadRecord, DataError, iter_records
from openmill.rundir import atomic_write_bytes, atomic_write_json


def gzip_jsonl(records: list[dict]) -> bytes:
    """Deterministic gzip JSONL (mtime 0, no file name): identical input gives identical bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


def read_gzip_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()[:8], "little")


@dataclass
class FileTask:
    domain: str
    split: str
    path: str
    file_index: int  # position of the file within its domain and split
    text_field: str
    id_field: str
    rules: Rules
    dedup: DedupConfig
    seed: int
    docs_per_shard: int
    strict: bool
    max_record_bytes: int
    rejects_text_chars: int
    work: str  # work/filter/<domain>/<split>

    def chunk_stem(self, chunk: int) -> Path:
        return Path(self.work) / f"f{self.file_index:05d}-c{chunk:05d}"


def _done(stem: Path) -> bool:
    return stem.with_name(stem.name + ".stats.json").is_file()


@dataclass
class _Chunk:
    kept: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)
    sigs: list[np.ndarray] = field(default_factory=list)
    signals: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SIGNALS})
    signal_kept: list[bool] = field(default_factory=list)
    records: int = 0
    bytes_in: int = 0  # UTF-8 bytes of the texts of the records that are documents
    bad_bytes: int = 0  # raw bytes of the records that are not
    reader: dict[str, int] = field(default_factory=dict)


def _reject(task: FileTask, rec, filter_name: str, reason: str, text: str, message: str = "") -> dict:
    out = {
        "domain": task.domain,
        "split": task.split,
        "file": rec.source,
        "line": rec.line,
        "id": getattr(rec, "id", f"{rec.source}:{rec.line}"),
        "filter": filter_name,
        "reason": reason,
        "text": text[: task.rejects_text_chars],
    }
    if message:
        out["message"] = message
    return out


def _flush(task: FileTask, chunk_index: int, c: _Chunk, pipe: DomainPipeline) -> None:
    stem = task.chunk_stem(chunk_index)
    stem.parent.mkdir(parents=True, exist_ok=True)
    d = task.dedup
    sigs = np.stack(c.sigs) if c.sigs else np.zeros((0, d.num_perm), dtype=np.uint32)
    buf = io.BytesIO()
    np.savez(
        buf,
        exact=np.array(c.exact, dtype=np.uint64),
        kept_bytes=np.array([len(r["text"].encode("utf-8")) for r in c.kept], dtype=np.int64),
        signatures=sigs,
        bands=band_keys(sigs, d.bands, d.rows),
        signal_kept=np.array(c.signal_kept, dtype=bool),
        **{f"signal_{k}": np.array(v, dtype=np.float32) for k, v in c.signals.items()},
    )
    atomic_write_bytes(stem.with_name(stem.name + ".kept.jsonl.gz"), gzip_jsonl(c.kept))
    atomic_write_bytes(stem.with_name(stem.name + ".rejects.jsonl.gz"), gzip_jsonl(c.rejects))
    atomic_write_bytes(stem.with_name(stem.name + ".dedup.npz"), buf.getvalue())
    stats = {
        "records": c.records,
        "bytes_in": c.bytes_in,
        "bad_bytes": c.bad_bytes,
        "kept": len(c.kept),
        "reader": c.reader,
        "steps": {name: s.as_dict() for name, s in pipe.stats.items()},
        "pii_masked": dict(pipe.pii_masked),
    }
    atomic_write_json(stem.with_name(stem.name + ".stats.json"), stats)  # last: the completion marker


def file_chunks(task: FileTask) -> Iterator[tuple[int, list]]:
    """(chunk index, records) of one input file: `docs_per_shard` records a chunk, bad ones included."""
    chunk: list = []
    index = 0
    for rec in iter_records(task.path, task.text_field, task.id_field, task.max_record_bytes):
        chunk.append(rec)
        if len(chunk) == task.docs_per_shard:
            yield index, chunk
            chunk, index = [], index + 1
    if chunk or index == 0:
        yield index, chunk


def chunk_done(task: FileTask, chunk_index: int) -> bool:
    return _done(task.chunk_stem(chunk_index))


def filter_chunk(task: FileTask, chunk_index: int, records: list) -> int:
    """Phase 1 on one chunk: normalize, filter, sign, write its four files (stats last). Returns len(records)."""
    hasher = MinHasher(task.dedup.num_perm, task.seed)
    pipe = DomainPipeline(task.rules)
    c = _Chunk(records=len(records))
    d = task.dedup
    for rec in records:
        if isinstance(rec, BadRecord):
            if task.strict:
                raise DataError(rec.message)
            c.reader[rec.reason] = c.reader.get(rec.reason, 0) + 1
            c.bad_bytes += rec.nbytes
            c.rejects.append(_reject(task, rec, "reader", rec.reason, rec.raw, rec.message))
            continue
        c.bytes_in += len(rec.text.encode("utf-8"))
        out = pipe.process(rec.text)
        sig = out.signals
        for k in SIGNALS:
            c.signals[k].append(sig.get(k, np.nan))
        c.signal_kept.append(out.filter is None)
        if out.filter is not None:
            c.rejects.append(_reject(task, rec, out.filter, out.reason, rec.text))
            continue
        text = out.doc.text
        c.kept.append(
            {"id": rec.id, "source": rec.origin or rec.source, "text": text, "file": rec.source, "line": rec.line}
        )
        c.exact.append(exact_hash(text))
        c.sigs.append(hasher.signature(shingles(out.doc, d.shingle_words, d.shingle_cjk_chars)))
    _flush(task, chunk_index, c, pipe)
    return len(records)


def filter_file(task: FileTask) -> int:
    """Phase 1 on a whole input file (one Ray task); skips completed chunks. Returns the records read."""
    total = 0
    for index, records in file_chunks(task):
        total += len(records)
        if not chunk_done(task, index):
            filter_chunk(task, index, records)
    return total


@dataclass
class PartTask:
    chunk_stem: str  # work/filter/<domain>/<split>/<file>-<chunk>
    out_part: str  # <out>/<domain>/<split>/part-XXXXX.jsonl.gz
    rejects_part: str  # <out>/rejects/<domain>/<split>/part-XXXXX.jsonl.gz
    marker: str
    dropped: dict[int, tuple[str, str]]  # local index -> (reason, id of the kept duplicate)
    rejects_text_chars: int


def write_part(task: PartTask) -> None:
    if Path(task.marker).is_file():
        return
    stem = Path(task.chunk_stem)
    kept = read_gzip_jsonl(stem.with_name(stem.name + ".kept.jsonl.gz"))
    rejects = read_gzip_jsonl(stem.with_name(stem.name + ".rejects.jsonl.gz"))
    clean = []
    domain, split = stem.parent.parent.name, stem.parent.name
    for i, r in enumerate(kept):
        if i in task.dropped:
            reason, dup_of = task.dropped[i]
            rejects.append(
                {
                    "domain": domain,
                    "split": split,
                    "file": r["file"],
                    "line": r["line"],
                    "id": r["id"],
                    "filter": "dedup",
                    "reason": reason,
                    "duplicate_of": dup_of,
                    "text": r["text"][: task.rejects_text_chars],
                }
            )
        else:
            clean.append({"id": r["id"], "source": r["source"], "text": r["text"]})
    atomic_write_bytes(Path(task.rejects_part), gzip_jsonl(rejects))
    atomic_write_bytes(Path(task.out_part), gzip_jsonl(clean))
    atomic_write_json(Path(task.marker), {"docs": len(clean), "rejects": len(rejects)})
