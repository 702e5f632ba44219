"""Run directory: atomic writes, manifests and the skip rule."""

import json
import os
import subprocess
import sys
import time

from openmill.rundir import RunDir, atomic_dir, atomic_write_json, fingerprint, sha256_path


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    try:
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert (final / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_writers_half_folder_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: the folder below looks like what a SIGKILLed save leaves
    half = tmp_path / f".step_000008.tmp-{dead.pid}"
    (half / "model.safetensors").parent.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".step_000012.tmp-{os.getpid()}"  # a living writer's folder stays
    mine.mkdir()
    with atomic_dir(tmp_path / "step_000016") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "step_000016"]


def test_manifest_and_skip(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    run = RunDir(tmp_path / "run")
    out = run.stage("s") / "o.txt"
    out.write_text("x")
    fp = fingerprint({"k": 1}, [src])
    m = run.write_manifest("s", config={"k": 1}, fp=fp, inputs=[src], outputs=[out], metrics={"m": 2}, started=time.time())
    assert m["outputs"][0] == {"path": "s/o.txt", "sha256": sha256_path(out)}
    assert json.loads((run.root / "s" / "manifest.json").read_text())["metrics"] == {"m": 2}
    assert run.is_up_to_date("s", fp)
    assert not run.is_up_to_date("s", fingerprint({"k": 2}, [src]))  # config changed
    src.write_text("hello!")
    assert not run.is_up_to_date("s", fingerprint({"k": 1}, [src]))  # input changed
    out.unlink()
    assert not run.is_up_to_date("s", fp)  # output gone


def test_directory_hash_sees_content_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("1")
    h1 = sha256_path(d)
    (d / "a").write_text("2")
    h2 = sha256_path(d)
    (d / "a").rename(d / "b")
    assert len({h1, h2, sha256_path(d)}) == 3


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": "中"})
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"a": "中"}
