"""The tokenize stage: every domain's train and valid documents to token shards (format in shards.py).

Documents stream from the readers and are cut into shards of at most `docs_per_shard` documents
and `max_shard_bytes` bytes of text, in file order. The cut depends only on the documents and those
two numbers, never on the number of workers, so the output is byte-identical for any worker count.

A shard is the unit of parallelism and of restart: a process pool tokenizes shards while the main
process reads ahead (at most 2 x workers shards of text in memory). Each shard's two files are
renamed into place and then a completion marker records what they hold, with the sha256 of the
shard's source text and of the tokenizer. A rerun after a crash re-reads the documents but skips
every shard whose marker matches, so a crash costs the shards in flight.

Workers are spawned, not forked (the parent may hold torch and tokenizer threads), so a script that
calls tokenize_corpus with workers > 1 needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from openmill.config import Recipe, TokenizeConfig
from openmill.data.readers import read_documents
from openmill.data.shards import INDEX, dtype_for_vocab, shard_name
from openmill.data.sources import document_files
from openmill.rundir import atomic_write_bytes, atomic_write_json, sha256_file
from openmill.tokenizer import Tokenizer

SPLITS = ("train", "valid")


@dataclass
class ShardJob:
    folder: Path
    index: int
    texts: list[str]
    source_sha256: str  # of the texts, length-prefixed: identifies the input of this shard
    tokenizer_sha256: str
    dtype: str

    def marker(self) -> Path:
        return self.folder / f"{shard_name(self.index)}.done.json"

    def is_done(self) -> dict | None:
        """The marker's stats if this exact shard (same text, tokenizer, dtype) is already on disk."""
        try:
            stats = json.loads(self.marker().read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        same = all(stats.get(k) == getattr(self, k) for k in ("source_sha256", "tokenizer_sha256", "dtype"))
        data = self.folder / stats.get("file", "")
        if not same or not data.is_file() or data.stat().st_size != stats["tokens"] * np.dtype(self.dtype).itemsize:
            return None
        return stats


def _shard_jobs(
    files: list[Path], text_field: str, folder: Path, cfg: TokenizeConfig, tokenizer_sha: str, dtype: str
) -> Iterator[ShardJob]:
    """Shards of documents in file order: a new shard after docs_per_shard docs or max_shard_bytes bytes."""
    texts, size, h, index = [], 0, hashlib.sha256(), 0
    for path in files:
        for doc in read_documents(path, text_field):
            raw = doc.text.encode("utf-8")  # an empty document stays: a lone EOS keeps documents aligned
            texts.append(doc.text)
            size += len(raw)
            h.update(len(raw).to_bytes(8, "little") + raw)
            if len(texts) >= cfg.docs_per_shard or size >= cfg.max_shard_bytes:
                yield ShardJob(folder, index, texts, h.hexdigest(), tokenizer_sha, dtype)
                texts, size, h, index = [], 0, hashlib.sha256(), index + 1
    if texts:
        yield ShardJob(folder, index, texts, h.hexdigest(), tokenizer_sha, dtype)


# The tokenizer of this process: loaded once per pool worker (or in the main process with 1 worker).
_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str, threads: bool) -> None:
    global _TOKENIZER
    if not threads:  # one process per core already; the library's own threads would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.load(tokenizer_path)


def _write_shard(job: ShardJob) -> dict:
    """Tokenize one shard and write it: data, offsets, then the completion marker."""
    tok = _TOKENIZER
    ids = tok.encode_batch(job.texts, eos=True)
    ends = np.cumsum([len(x) for x in ids], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=job.dtype, count=int(ends[-1]))
    name = shard_name(job.index)
    atomic_write_bytes(job.folder / f"{name}.bin", tokens.tobytes())
    buf = io.BytesIO()
    np.save(buf, ends)
    atomic_write_bytes(job.folder / f"{name}.idx.npy", buf.getvalue())
    stats = {
        "file": f"{name}.bin",
        "tokens": int(ends[-1]),
        "docs": len(job.texts),
        "bytes": sum(len(t.encode("utf-8")) for t in job.texts),
        "source_sha256": job.source_sha256,
        "tokenizer_sha256": job.tokenizer_sha256,
        "dtype": job.dtype,
    }
    atomic_write_json(job.marker(), stats)
    return stats


def _finish_folder(folder: Path, shards: list[dict], dtype: str) -> dict:
    """Write index.json and remove what an earlier, different run left (higher shards, temp files)."""
    keep = {f"{Path(s['file']).stem}{ext}" for s in shards for ext in (".bin", ".idx.npy", ".done.json")}
    for path in folder.iterdir():
        if path.name != INDEX and path.name not in keep and (path.name.startswith(("shard_", ".shard_"))):
            path.unlink()
    totals = {k: sum(s[k] for s in shards) for k in ("tokens", "docs", "bytes")}
    index = {
        "dtype": dtype,
        "shards": [{k: s[k] for k in ("file", "tokens", "docs", "bytes")} for s in shards],
        **totals,
    }
    atomic_write_json(folder / INDEX, index)
    return totals


def tokenize_corpus(recipe: Recipe, tokenizer_path: Path, out_dir: Path) -> tuple[list[Path], dict]:
    """The tokenize stage: out_dir/<domain>/<split>/ shards for every domain; returns (domain folders, metrics)."""
    cfg = recipe.tokenize
    tok = Tokenizer.load(tokenizer_path)
    dtype = dtype_for_vocab(tok.vocab_size).name
    tokenizer_sha = sha256_file(Path(tokenizer_path))
    out_dir = Path(out_dir)
    folders = {(d, s): out_dir / d / s for d in recipe.data.domains for s in SPLITS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX).unlink(missing_ok=True)  # the folder is incomplete until index.json is rewritten

    def all_jobs() -> Iterator[tuple[tuple[str, str], ShardJob]]:
        for (domain, split), folder in folders.items():
            files, text_field = document_files(recipe, domain, split)
            for job in _shard_jobs(files, text_field, folder, cfg, tokenizer_sha, dtype):
                yield (domain, split), job

    results: dict[tuple[str, str], dict[int, dict]] = {key: {} for key in folders}
    resumed = {key: 0 for key in folders}
    pool = None
    if cfg.workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold torch/tokenizer threads
        pool = ProcessPoolExecutor(
            cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(str(tokenizer_path), False)
        )
    else:
        _init_worker(str(tokenizer_path), True)

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[docs]:,} docs"),
        TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(), console=Console(stderr=True),
    )  # fmt: skip
    tasks = {key: progress.add_task(f"tokenize {key[0]}/{key[1]}", total=None, docs=0, tokens=0) for key in folders}

    def record(key, index: int, stats: dict) -> None:
        results[key][index] = stats
        t = progress.tasks[tasks[key]]
        progress.update(tasks[key], docs=t.fields["docs"] + stats["docs"], tokens=t.fields["tokens"] + stats["tokens"])

    try:
        with progress:
            in_flight: dict[Future, tuple] = {}
            for key, job in all_jobs():
                done = job.is_done()
                if done is not None:
                    resumed[key] += 1
                    record(key, job.index, done)
                    continue
                if pool is None:
                    record(key, job.index, _write_shard(job))
                    continue
                in_flight[pool.submit(_write_shard, job)] = (key, job.index)
                while len(in_flight) >= 2 * cfg.workers:  # bounded read-ahead: memory does not grow
                    finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for f in finished:
                        record(*in_flight.pop(f), f.result())
            for f in list(in_flight):
                record(*in_flight.pop(f), f.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    metrics: dict = {"dtype": dtype, "vocab_size": tok.vocab_size, "domains": {}}
    for (domain, split), folder in folders.items():
        shards = [results[(domain, split)][i] for i in sorted(results[(domain, split)])]
        totals = _finish_folder(folder, shards, dtype)
        text_tokens = totals["tokens"] - totals["docs"]  # without the EOS after each document
        metrics["domains"].setdefault(domain, {})[split] = {
            **totals,
            "bytes_per_token": round(totals["bytes"] / max(1, text_tokens), 4),
            "shards": len(shards),
            "resumed_shards": resumed[(domain, split)],
        }
    metrics["tokens"] = sum(v["tokens"] for d in metrics["domains"].values() for v in d.values())
    return [out_dir / d for d in recipe.data.domains], metrics
