"""The `curate` stage: raw documents of every domain -> clean shards, rejects, report.

    run_curate(recipe, out_dir) -> (outputs, metrics)      # out_dir = <run>/curate

Three phases, each resumable at shard granularity (a killed run redoes at most one shard per
worker):
  1. filter  (parallel over chunks)      — read, normalize, filter, sign; work/filter/...
  2. dedup   (one process, global)       — exact + MinHash-LSH over all kept docs; work/dedup.npz
  3. write   (parallel over chunks)      — <domain>/<split>/part-XXXXX.jsonl.gz, rejects/...
then the report (report.json, report.md, plots/*.png). The work/ folder is stamped with a key of
the curate config, seed and input files (path, size, mtime): a rerun with anything changed starts
afresh; with nothing changed it resumes. work/ is removed on success (unless keep_work).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from openmill.data.curate.config import CurateConfig
from openmill.data.curate.dedup import REASONS, deduplicate
from openmill.data.curate.doc import DocView
from openmill.data.curate.executor import make_executor
from openmill.data.curate.minhash import jaccard, shingles
from openmill.data.curate.report import build_report
from openmill.data.curate.shards import FileTask, PartTask, read_gzip_jsonl, write_part
from openmill.data.readers import expand_paths
from openmill.rundir import atomic_write_bytes

SPLITS = ("train", "valid")
RESERVED = ("rejects", "work", "plots")  # folders of the stage next to the domain folders


def _file_tasks(recipe, work: Path) -> list[FileTask]:
    cfg: CurateConfig = recipe.curate
    tasks = []
    for domain, spec in recipe.data.domains.items():
        rules = cfg.rules_for(domain)
        for split in SPLITS:
            for i, path in enumerate(expand_paths(list(getattr(spec, split)))):
                tasks.append(
                    FileTask(
                        domain=domain,
                        split=split,
                        path=str(path),
                        file_index=i,
                        text_field=spec.text_field,
                        id_field=rules.id_field,
                        rules=rules,
                        dedup=cfg.dedup,
                        seed=recipe.seed,
                        docs_per_shard=cfg.docs_per_shard,
                        strict=cfg.strict,
                        max_record_bytes=cfg.max_record_bytes,
                        rejects_text_chars=cfg.rejects_text_chars,
                        work=str(work / "filter" / domain / split),
                    )
                )
    return tasks


# How the work is run, not what it produces: a resumed run may change them (and the outputs do not).
_RUN_ONLY = {"workers", "executor", "ray_address", "keep_work", "plots"}


def _run_key(recipe, tasks: list[FileTask]) -> str:
    rules = recipe.curate.model_dump(mode="json", exclude=_RUN_ONLY)
    h = hashlib.sha256(json.dumps(rules, sort_keys=True).encode())
    h.update(f"seed={recipe.seed}\n".encode())
    for t in tasks:
        st = os.stat(t.path)
        h.update(f"{t.domain}\0{t.split}\0{t.path}\0{t.text_field}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _prepare(out_dir: Path, key: str) -> Path:
    """work/ for this key; anything left by a run with another key (outputs included) is cleared."""
    work = out_dir / "work"
    stamp = work / "KEY"
    if not (stamp.is_file() and stamp.read_text().strip() == key):
        for child in out_dir.iterdir() if out_dir.exists() else []:
            if child.name != "manifest.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stamp, key.encode())
    return work


def _chunks(tasks: list[FileTask]) -> list[tuple[FileTask, Path]]:
    """Every phase-1 chunk, in canonical order: train before valid, then domain, file, chunk."""
    out = []
    for split in SPLITS:
        for t in tasks:
            if t.split != split:
                continue
            stems = sorted(Path(t.work).glob(f"f{t.file_index:05d}-c*.stats.json"))
            out.extend((t, s.with_name(s.name.removesuffix(".stats.json"))) for s in stems)
    return out


def _load_index(chunks, domain_ids):
    exact, bands, valid, dom, owner = [], [], [], [], []
    for k, (t, stem) in enumerate(chunks):
        z = np.load(stem.with_name(stem.name + ".dedup.npz"))
        m = len(z["exact"])
        exact.append(z["exact"])
        bands.append(z["bands"])
        valid.append(np.full(m, t.split == "valid"))
        dom.append(np.full(m, domain_ids[t.domain], dtype=np.int64))
        owner.append(np.stack([np.full(m, k), np.arange(m)], axis=1))
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)
    return (
        cat(exact, (0,)).astype(np.uint64),
        cat(bands, (0, 1)).astype(np.uint64),
        cat(valid, (0,)).astype(bool),
        cat(dom, (0,)).astype(np.int64),
        cat(owner, (0, 2)).astype(np.int64),
    )


def _similarity_fn(chunks, owner, cfg: CurateConfig):
    """Scores candidate pairs: true shingle Jaccard (texts re-read from the chunks) or signature agreement."""
    d = cfg.dedup

    def score(pairs: np.ndarray) -> np.ndarray:
        need = np.unique(pairs)
        by_chunk: dict[int, list[int]] = {}
        for g in need:
            by_chunk.setdefault(int(owner[g, 0]), []).append(int(g))
        data: dict[int, np.ndarray] = {}
        for k, gs in by_chunk.items():
            _, stem = chunks[k]
            if d.verify == "exact":
                docs = read_gzip_jsonl(stem.with_name(stem.name + ".kept.jsonl.gz"))
                for g in gs:
                    data[g] = shingles(DocView(docs[owner[g, 1]]["text"]), d.shingle_words, d.shingle_cjk_chars)
            else:
                sigs = np.load(stem.with_name(stem.name + ".dedup.npz"))["signatures"]
                for g in gs:
                    data[g] = sigs[owner[g, 1]]
        if d.verify == "exact":
            return np.array([jaccard(data[i], data[j]) for i, j in pairs])
        return np.array([float(np.mean(data[i] == data[j])) for i, j in pairs])

    return score


def _dedup(work: Path, chunks, recipe) -> dict:
    """Phase 2; returns its summary. Cached in work/dedup.npz (the marker)."""
    path = work / "dedup.npz"
    domain_ids = {d: i for i, d in enumerate(recipe.data.domains)}
    exact, bands, valid, dom, owner = _load_index(chunks, domain_ids)
    if path.is_file():
        z = np.load(path)
        reason, dup_of, summary = z["reason"], z["duplicate_of"], json.loads(str(z["summary"]))
    else:
        res = deduplicate(exact, bands, valid, dom, recipe.curate.dedup, _similarity_fn(chunks, owner, recipe.curate))
        reason, dup_of = res.reason, res.duplicate_of
        summary = {
            "candidate_pairs": res.candidate_pairs,
            "confirmed_pairs": res.confirmed_pairs,
            "valid_duplicates_train_kept": res.contaminated_kept,
        }
        import io

        buf = io.BytesIO()
        np.savez(buf, reason=reason, duplicate_of=dup_of, summary=np.array(json.dumps(summary)))
        atomic_write_bytes(path, buf.getvalue())
    return {"reason": reason, "duplicate_of": dup_of, "owner": owner, "summary": summary}


def _part_tasks(out_dir: Path, work: Path, chunks, dd, cfg: CurateConfig) -> list[PartTask]:
    reason, dup_of, owner = dd["reason"], dd["duplicate_of"], dd["owner"]
    ids_cache: dict[int, list[str]] = {}

    def doc_id(g: int) -> str:
        k = int(owner[g, 0])
        if k not in ids_cache:
            _, stem = chunks[k]
            ids_cache[k] = [r["id"] for r in read_gzip_jsonl(stem.with_name(stem.name + ".kept.jsonl.gz"))]
        return ids_cache[k][int(owner[g, 1])]

    dropped_by_chunk: dict[int, dict[int, tuple[str, str]]] = {}
    for g in np.flatnonzero(reason):
        dropped_by_chunk.setdefault(int(owner[g, 0]), {})[int(owner[g, 1])] = (
            REASONS[int(reason[g])],
            doc_id(int(dup_of[g])),
        )
    tasks, counters = [], {}
    for k, (t, stem) in enumerate(chunks):
        part = counters.get((t.domain, t.split), 0)
        counters[(t.domain, t.split)] = part + 1
        name = f"part-{part:05d}.jsonl.gz"
        tasks.append(
            PartTask(
                chunk_stem=str(stem),
                out_part=str(out_dir / t.domain / t.split / name),
                rejects_part=str(out_dir / "rejects" / t.domain / t.split / name),
                marker=str(work / "parts" / t.domain / t.split / f"{name}.done"),
                dropped=dropped_by_chunk.get(k, {}),
                rejects_text_chars=cfg.rejects_text_chars,
            )
        )
    return tasks


def run_curate(recipe, out_dir: Path) -> tuple[list[Path], dict]:
    """Curate every domain and split of `recipe.data` into `out_dir` (= <run>/curate); see module doc."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg: CurateConfig = recipe.curate
    for name in recipe.data.domains:
        if name in RESERVED or name.startswith("."):
            raise ValueError(f"data.domains.{name}: reserved by the curate stage's output layout; rename the domain")
    tasks = _file_tasks(recipe, out_dir / "work")
    work = _prepare(out_dir, _run_key(recipe, tasks))
    with make_executor(cfg) as ex:
        ex.filter_files(tasks)
        chunks = _chunks(tasks)
        dd = _dedup(work, chunks, recipe)
        parts = _part_tasks(out_dir, work, chunks, dd, cfg)
        ex.run(write_part, parts, "curate: write")
    metrics = build_report(out_dir, recipe, chunks, dd, plots=cfg.plots)
    outputs = [out_dir / d for d in recipe.data.domains] + [
        out_dir / "rejects",
        out_dir / "report.json",
        out_dir / "report.md",
    ]
    if (out_dir / "plots").is_dir():
        outputs.append(out_dir / "plots")
    for stray in out_dir.rglob(".*.tmp-*"):  # half-written files of a killed run (atomic_write's temp names)
        stray.unlink(missing_ok=True)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return [p for p in outputs if p.exists()], metrics
