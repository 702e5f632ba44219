"""Pretraining: exact resume after a crash, corrupt-checkpoint fallback, schedules, parallel parity."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from openmill.config import PretrainConfig, RecipeError, load_recipe
from openmill.data.shards import TokenShards
from openmill.stages import preflight, run_recipe
from openmill.train import engine as engine_mod
from openmill.train.metrics import read_metrics
from openmill.train.pretrain import Validation, window_starts
from openmill.train.schedule import lr_at

from .conftest import REPO

TINY = REPO / "recipes" / "tiny.yaml"
SMALL = [
    "stages=[tokenizer,tokenize,pretrain,generate]",  # these tests read the raw corpus, not curated output
    "tokenizer.vocab_size=1024",
    "tokenizer.max_train_bytes=600000",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "pretrain.seq_len=32",
    "pretrain.batch_size=8",
    "pretrain.grad_accum=2",
    "pretrain.steps=12",
    "pretrain.warmup_steps=2",
    "pretrain.log_every=1",
    "pretrain.eval_every=6",
    "pretrain.eval_tokens=256",
    "pretrain.checkpoint_every=4",
    "pretrain.keep_checkpoints=3",
    "pretrain.tensorboard=false",
    "pretrain.optimizer=adamw",  # tiny.yaml trains with muon, which fsdp refuses; muon has tests/test_muon.py
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with tokenizer and token shards of the embedded corpus (shared by the tests)."""
    root = tmp_path_factory.mktemp("prepared") / "run"
    recipe = load_recipe(TINY, SMALL + [f"run_dir={root}"])
    run_recipe(recipe, ["tokenizer", "tokenize"])
    return root


def fresh_run(prepared, tmp_path, extra=()):
    """A copy of the prepared run (tokenizer + tokens) with no pretraining yet."""
    root = tmp_path / "run"
    shutil.copytree(prepared, root)
    return load_recipe(TINY, SMALL + [f"run_dir={root}", *extra]), root


def losses(root):
    return {r["step"]: r["loss"] for r in read_metrics(root / "pretrain" / "metrics.jsonl") if "loss" in r}


def crash_pretrain_at_step_10(recipe, monkeypatch):
    """Run the pretrain stage and kill it (an exception out of the step) as step 10 starts."""
    real_step = engine_mod.Trainer.train_step

    def crash_at_step_10(self):
        if self.state.step == 9:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self)

    monkeypatch.setattr(engine_mod.Trainer, "train_step", crash_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, ["pretrain"])
    monkeypatch.setattr(engine_mod.Trainer, "train_step", real_step)


def test_resume_is_bit_exact_after_crash_and_skips_corrupt_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    whole, whole_root = fresh_run(prepared, tmp_path / "a")
    run_recipe(whole, ["pretrain"])
    reference = losses(whole_root)
    assert sorted(reference) == list(range(1, 13))

    crashed, root = fresh_run(prepared, tmp_path / "b")
    crash_pretrain_at_step_10(crashed, monkeypatch)
    ckpts = root / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004", "step_000008"]

    # Corrupt the newest checkpoint: the run must notice and resume from step 4.
    weights = ckpts / "step_000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    run_recipe(crashed, ["pretrain"])
    printed = capsys.readouterr().out
    assert "step_000008 is corrupt (model.safetensors checksum mismatch)" in printed
    assert "resuming from" in printed and "step_000004 (step 4)" in printed
    resumed = losses(root)
    assert resumed == reference  # every step, bit for bit


def test_stage_skipped_when_unchanged_and_rerun_with_force(prepared, tmp_path):
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.steps=2", "pretrain.checkpoint_every=2"])
    run_recipe(recipe, ["pretrain"])
    messages = []
    run_recipe(recipe, ["pretrain"], log=messages.append)
    assert any("[pretrain] up to date, skipped" in m for m in messages)
    manifest = json.loads((root / "pretrain" / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["outputs"][0]["path"] == "pretrain/final"
    messages.clear()
    run_recipe(recipe, ["pretrain"], force=True, log=messages.append)
    assert any("[pretrain] running" in m for m in messages)


def test_changed_recipe_does_not_resume_foreign_checkpoints(prepared, tmp_path, capsys):
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.steps=4"])
    run_recipe(recipe, ["pretrain"])
    changed = load_recipe(TINY, SMALL + [f"run_dir={root}", "pretrain.steps=4", "pretrain.lr=1e-3"])
    capsys.readouterr()
    run_recipe(changed, ["pretrain"])
    printed = capsys.readouterr().out
    assert "the recipe changed" in printed and "resuming from" not in printed


def test_bookkeeping_changes_keep_the_checkpoints(prepared, tmp_path, capsys):
    """Only what changes the trained weights makes checkpoints foreign: not logging, saving, threads or
    how processes share the model (checkpoints hold whole weights)."""
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.steps=4"])
    run_recipe(recipe, ["pretrain"])
    changed = ["pretrain.steps=4", "pretrain.log_every=2", "pretrain.keep_checkpoints=4", "pretrain.threads=1", "pretrain.parallel=fsdp"]
    capsys.readouterr()
    run_recipe(load_recipe(TINY, SMALL + [f"run_dir={root}", *changed]), ["pretrain"], force=True)
    printed = capsys.readouterr().out
    assert "the recipe changed" not in printed and "step_000004 (step 4)" in printed
    # Checkpoints hold tensors and plain values only, so resuming loads them with weights_only=True.
    for pt in (root / "pretrain" / "checkpoints").glob("*/*.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(pt) == [], pt


def test_extending_a_wsd_run_equals_training_the_longer_run_from_the_start(prepared, tmp_path, capsys):
    """The 4-step run's last step decays; the 8-step run's decay starts at step 6. The extension
    resumes from the step-2 checkpoint (before both decays) and drops step 4's, so every later
    step is the longer run's, bit for bit."""
    wsd = ["pretrain.schedule=wsd", "pretrain.checkpoint_every=2", "pretrain.phases=[]"]
    whole, whole_root = fresh_run(prepared, tmp_path / "whole", ["pretrain.steps=8", *wsd])
    run_recipe(whole, ["pretrain"])
    short, root = fresh_run(prepared, tmp_path / "short", ["pretrain.steps=4", *wsd])
    run_recipe(short, ["pretrain"])
    capsys.readouterr()
    run_recipe(load_recipe(TINY, SMALL + [f"run_dir={root}", "pretrain.steps=8", *wsd]), ["pretrain"])
    printed = capsys.readouterr().out
    assert "steps changed from 4 to 8 under wsd" in printed and "step_000002 (step 2)" in printed
    assert losses(root) == losses(whole_root)


def test_a_torn_newest_checkpoint_does_not_make_the_older_ones_foreign(prepared, tmp_path, monkeypatch, capsys):
    crashed, root = fresh_run(prepared, tmp_path)
    crash_pretrain_at_step_10(crashed, monkeypatch)
    (root / "pretrain" / "checkpoints" / "step_000008" / "meta.json").unlink()
    capsys.readouterr()
    run_recipe(crashed, ["pretrain"])
    printed = capsys.readouterr().out
    assert "the recipe changed" not in printed
    assert "step_000008 is corrupt (meta.json missing)" in printed and "step_000004 (step 4)" in printed


def test_a_domain_weighted_only_by_a_phase_is_trained(prepared, tmp_path):
    phases = "pretrain.phases=[{name: prose, steps: 6}, {name: code, steps: 6, mixture: {code: 1.0}}]"
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.mixture={en: 1.0}", phases])
    run_recipe(recipe, ["pretrain"])
    last = [r for r in read_metrics(root / "pretrain" / "metrics.jsonl") if "seen/code" in r][-1]
    assert last["seen/en"] == 6 * 8 * 32 and last["seen/code"] == 6 * 8 * 32


def test_preflight_checks_each_phase_window_against_the_model(prepared, tmp_path):
    phases = "pretrain.phases=[{name: short, steps: 6}, {name: long, steps: 6, seq_len: 128}]"
    recipe, _ = fresh_run(prepared, tmp_path, [phases])
    with pytest.raises(RecipeError, match=r"^pretrain.phases.long.seq_len: 128 exceeds model.max_seq_len 64$"):
        preflight(recipe)


def test_schedules():
    cos = PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == 1.0 and lr_at(99, cos) == pytest.approx(0.1)  # the last trained step: the floor
    wsd = PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(80, wsd) == pytest.approx(0.95) and lr_at(89, wsd) == pytest.approx(0.5)
    assert lr_at(99, wsd) == 0.0  # the last trained step
    short = PretrainConfig(steps=4, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, short) for s in range(4)] == [1.0, 1.0, 1.0, 0.0]  # a short run decays too


def _torchrun(root, nproc, parallel, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "openmill.cli", "pretrain", str(TINY),
        *[f"--set={s}" for s in SMALL + [f"run_dir={root}", "pretrain.steps=6", f"pretrain.parallel={parallel}"]],
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(prepared, tmp_path, parallel):
    """2 CPU processes on gloo (same global batch) follow the single-process loss trajectory."""
    single, single_root = fresh_run(prepared, tmp_path / "one", ["pretrain.steps=6"])
    run_recipe(single, ["pretrain"])
    two_root = tmp_path / "two" / "run"
    shutil.copytree(prepared, two_root)
    _torchrun(two_root, 2, parallel, tmp_path)
    a, b = losses(single_root), losses(two_root)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])
    assert torch.tensor(list(a.values())).isfinite().all()


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_trajectory(prepared, tmp_path):
    """pretrain.compile compiles each block (train/parallel.py); losses match eager to float tolerance."""
    eager, eager_root = fresh_run(prepared, tmp_path / "eager", ["pretrain.steps=4"])
    run_recipe(eager, ["pretrain"])
    compiled, compiled_root = fresh_run(prepared, tmp_path / "compiled", ["pretrain.steps=4", "pretrain.compile=true"])
    run_recipe(compiled, ["pretrain"])
    a, b = losses(eager_root), losses(compiled_root)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])


def test_a_checkpoint_from_before_the_tensor_rng_key_still_resumes(tmp_path):
    """Older trainer.pt files hold numpy's RNG key as an array: allowed, and nothing else is."""
    import numpy as np

    from openmill.train.checkpoint import _NUMPY_ARRAY_GLOBALS, rng_state, set_rng_state

    np.random.seed(7)
    old_style = {**rng_state(), "numpy": np.random.get_state()}
    expected = np.random.random()
    torch.save({"rng": old_style}, tmp_path / "trainer.pt")
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        loaded = torch.load(tmp_path / "trainer.pt", weights_only=True)
    set_rng_state(loaded["rng"])
    assert np.random.random() == expected


def test_validation_windows_spread_over_the_whole_split(prepared):
    """The windows sample the split from its first token to its last, without overlapping."""
    shards = TokenShards(prepared / "tokens" / "zh" / "valid")
    n_targets, length = shards.n_tokens - 1, 32
    validation = Validation({"zh": shards}, np.ones(1024, dtype=np.int64), length, 256, "cpu")
    starts = window_starts(n_targets, length, 256 // length)
    assert starts[0] == 0 and starts[-1] == n_targets - length  # the last window ends at the split's end
    assert all(b - a >= length for a, b in zip(starts, starts[1:]))
    assert n_targets > 4 * 256  # so the spread differs from reading the first 256 tokens
    expected = np.stack([shards.read(s, length + 1) for s in starts])
    assert torch.equal(validation.rows["zh"], torch.from_numpy(expected))
    assert window_starts(100, 10, 10) == [i * 10 for i in range(10)]  # exactly filled: back to back
    assert window_starts(5, 5, 1) == [0]
