"""Run directory: atomic writes, per-stage manifests, and the skip-if-unchanged rule.

Layout (see docs/DESIGN.md): runs/<name>/recipe.yaml and one folder per stage, each with a
manifest.json written last, when the stage has completed. A stage is skipped when its manifest
records the same fingerprint (its config sections + the sha256 of every input file) and all its
recorded outputs still exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import openmill

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative name, file hash) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final`.

    A folder cannot replace another in one rename, so the old `final` is first renamed aside: a
    reader sees the old folder or the new one, never a mix, though a crash between the two renames
    leaves no `final` (the next write clears the leftovers; a stage whose output is missing reruns).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def _remove_leftovers(parent: Path) -> None:
    """Delete the temporary folders of writers that died mid-write (a killed run's half checkpoint
    would otherwise stay on disk for good); a living process's folder is left alone."""
    for path in parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def code_version() -> str:
    """openmill's version plus the git commit when running from a checkout."""
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{openmill.__version__}+{commit}" if commit else openmill.__version__


def fingerprint(config: Any, inputs: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for p in sorted(str(p) for p in inputs):
        h.update(f"{p}\0{sha256_path(Path(p))}\n".encode())
    return h.hexdigest()


class RunDir:
    """The folder of one run; stages read and write only inside it (plus their declared inputs)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manifest(self, stage: str) -> dict | None:
        path = self.root / stage / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def is_up_to_date(self, stage: str, fp: str) -> bool:
        m = self.manifest(stage)
        if m is None or m.get("fingerprint") != fp:
            return False
        return all((self.root / o["path"]).exists() for o in m.get("outputs", []))

    def write_manifest(
        self,
        folder: str,
        *,
        stage: str | None = None,
        config: Any,
        fp: str,
        inputs: list[Path],
        outputs: list[Path],
        metrics: dict,
        started: float,
    ) -> dict:
        """Record what the stage did. Outputs are hashed here, once, so the release can cite them."""
        manifest = {
            "stage": stage or folder,
            "fingerprint": fp,
            "code_version": code_version(),
            "config": config,
            "inputs": [{"path": str(p), "sha256": sha256_path(Path(p))} for p in inputs],
            "outputs": [
                {"path": str(Path(p).relative_to(self.root)), "sha256": sha256_path(Path(p))} for p in outputs
            ],
            "metrics": metrics,
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "ended": datetime.now(timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 3),
        }
        atomic_write_json(self.root / folder / MANIFEST, manifest)
        return manifest
