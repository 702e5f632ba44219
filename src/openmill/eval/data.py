"""Records of a task from local files: JSON lines, a JSON array, CSV with a header, fixed groups of
lines (HellaSwag's text release), or plain text cut into documents. Compressed files (.bz2, .gz,
.xz) and members of a .zip are read in place. A record that does not parse fails as file:line."""

from __future__ import annotations

import bz2
import csv
import fnmatch
import glob
import gzip
import io
import lzma
import re
import zipfile
from pathlib import Path

from openmill.data.readers import DataError
from openmill.data.records import parse_json_records
from openmill.eval.tasks import DataSpec, TaskError

_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}


def _format(spec: DataSpec, name: str) -> str:
    if spec.format:
        return spec.format
    suffixes = [s for s in Path(name).suffixes if s not in _OPENERS]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "text"}.get(ext, "jsonl")


def _texts(path: Path, member: str | None) -> list[tuple[str, str]]:
    """(name for messages, decoded text) of each file the spec names."""
    if member is not None:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if fnmatch.fnmatch(n, member))
            if not names:
                raise TaskError(f"{path}: no member matches {member!r}")
            return [(f"{path}!{n}", z.read(n).decode("utf-8-sig")) for n in names]
    opener = _OPENERS.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8-sig") as f:
        return [(str(path), f.read())]


def _parse(text: str, where: str, fmt: str, spec: DataSpec) -> list[dict]:
    records = []
    if fmt in ("jsonl", "json"):
        try:
            records = parse_json_records(text, where, lines=fmt == "jsonl", objects=True)
        except DataError as e:
            raise TaskError(str(e)) from None
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        for rec in reader:
            if None in rec or any(v is None for v in rec.values()):
                raise TaskError(f"{where}:{reader.line_num}: expected {len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)})")
            records.append(rec)
    elif fmt == "lines":
        if not spec.fields:
            raise TaskError(f"{where}: format lines needs data.fields (the names of one record's lines)")
        lines = text.splitlines()
        k = len(spec.fields)
        if len(lines) % k:
            raise TaskError(f"{where}:{len(lines)}: {len(lines)} lines is not a multiple of {k} (data.fields)")
        records = [dict(zip(spec.fields, lines[i : i + k])) for i in range(0, len(lines), k)]
    elif fmt == "text":
        if spec.split_on is None:
            return [{"text": text}]
        starts = re.compile(spec.split_on)
        docs: list[list[str]] = []
        for line in text.splitlines(keepends=True):
            if starts.match(line) or not docs:
                docs.append([])
            docs[-1].append(line)
        records = [{"text": "".join(d)} for d in docs if "".join(d).strip()]
    return records


def read_records(spec: DataSpec, path: Path, task: str) -> list[dict]:
    """Every record of a data spec (path already resolved), in file order."""
    paths = sorted(Path(p) for p in glob.glob(str(path))) if any(c in str(path) for c in "*?[") else [path]
    if not paths or not all(p.is_file() for p in paths):
        raise TaskError(f"task {task}: data file not found: {path}")
    records = []
    for p in paths:
        for where, text in _texts(p, spec.member):
            recs = _parse(text, where, _format(spec, spec.member or p.name), spec)
            if spec.file_field:
                stem = Path(where.split("!")[-1]).name.split(".")[0].removesuffix(spec.strip_suffix)
                for r in recs:
                    r[spec.file_field] = stem
            records.extend(recs)
    if spec.labels is not None:
        label_path = path.parent / spec.labels
        labels = label_path.read_text(encoding="utf-8").split()
        if len(labels) != len(records):
            raise TaskError(f"{label_path}: {len(labels)} labels for {len(records)} records")
        for r, label in zip(records, labels):
            r["label"] = label
    if not records:
        raise TaskError(f"task {task}: {path}: no records")
    return records
