"""HeuriMentor: the underlearned rule and repetition caps, bit-exact resume after SIGKILL across
mixture changes and a phase transition, live control, a loss spike's response, 2 -> 1 process resume."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from openmill.cli import app
from openmill.config import load_recipe
from openmill.data.dmu import DataManagementUnit
from openmill.data.mixture import MixtureSampler
from openmill.data.shards import TokenShards
from openmill.stages import run_recipe
from openmill.train.heurimentor import HeuriMentor
from openmill.train.metrics import read_metrics

from .conftest import REPO
from .test_pretrain import SMALL, TINY, fresh_run, losses, prepared  # noqa: F401 (fixture)

TWO_PHASES = [
    "pretrain.steps=24",
    "pretrain.eval_every=4",
    "pretrain.checkpoint_every=8",
    "pretrain.threads=1",
    "pretrain.policy.kind=underlearned",
    "pretrain.phases=[{name: lm, steps: 12, mixture: {en: 1, zh: 1, code: 1}},"
    " {name: knowledge, steps: 12, mixture: {en: 1, zh: 3, code: 0.5}, lr: 1.0e-3, schedule: constant, warmup_steps: 0}]",
]


def records(root):
    return read_metrics(root / "pretrain" / "metrics.jsonl")


def events(root, kind):
    return [r for r in records(root) if r.get("event") == kind]


def test_underlearned_rule_and_repetition_cap(prepared):
    recipe = load_recipe(
        TINY,
        SMALL + [f"run_dir={prepared}", "pretrain.policy.kind=underlearned", "pretrain.policy.eta=4",
                 "pretrain.sources={code: {max_epochs: 0.002}}"],
    )  # fmt: skip
    train = {d: TokenShards(prepared / "tokens" / d / "train") for d in recipe.data.domains}
    dmu = DataManagementUnit(recipe.pretrain, recipe.domain_weights(recipe.pretrain.mixture), train, recipe.seed)
    base = dict(dmu.state["base"])
    assert dmu.after_eval({"en": 7.0, "zh": 7.0, "code": 7.0}) is None  # the phase's reference
    val = {"en": 5.0, "zh": 6.5, "code": 6.0}
    dmu.after_eval(val)
    gap = {s: math.log(val[s] / 7.0) for s in val}
    mean = sum(gap.values()) / 3
    target = {s: base[s] * math.exp(4 * (gap[s] - mean)) for s in val}
    clipped = {s: min(max(target[s], 0.5 * base[s]), 2.0 * base[s]) for s in val}
    expected = {s: v / sum(clipped.values()) for s, v in clipped.items()}
    assert dmu.weights == pytest.approx(expected, rel=1e-12)
    assert dmu.weights["zh"] > base["zh"] and dmu.weights["en"] < base["en"]  # slowest improver gains

    cap = 0.002 * train["code"].n_tokens
    step = 0
    while dmu.weights["code"] > 0:
        dmu.batch(step, 0, 1)
        step += 1
    assert cap <= dmu.state["seen"]["code"] < cap + 8 * 32  # at most one batch past the cap
    before = dmu.state["seen"]["code"]
    for s in range(step, step + 20):
        dmu.batch(s, 0, 1)
    assert dmu.state["seen"]["code"] == before  # never drawn again


def _cli(root, extra, threads=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "openmill.cli", "pretrain", str(TINY), *[f"--set={s}" for s in SMALL + [f"run_dir={root}", *extra]]]
    return cmd, env


def test_sigkill_resume_is_bit_exact_across_phases_and_mixture_changes(prepared, tmp_path):
    whole, whole_root = fresh_run(prepared, tmp_path / "a", TWO_PHASES)
    run_recipe(whole, ["pretrain"])
    assert events(whole_root, "phase") and len(events(whole_root, "reweight")) >= 4

    _, root = fresh_run(prepared, tmp_path / "b", TWO_PHASES)
    cmd, env = _cli(root, TWO_PHASES)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = root / "pretrain" / "checkpoints" / "step_000016"
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (root / "pretrain" / "final").exists()
    resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a = load_file(str(whole_root / "pretrain" / "final" / "model.safetensors"))
    b = load_file(str(root / "pretrain" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(root) == losses(whole_root)


def test_live_control_changes_the_realized_mixture_and_refuses_bad_values(prepared, tmp_path, monkeypatch):
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.steps=24", "pretrain.checkpoint_every=24", "pretrain.eval_every=24", "pretrain.phases=[]"])
    real = HeuriMentor.at_boundary
    outputs = []

    def operator(self, trainer):
        if trainer.state.step == 4:
            outputs.append(CliRunner().invoke(app, ["control", str(root), "--set", "data.weights.zh=0.8"]))
        if trainer.state.step == 12:
            outputs.append(CliRunner().invoke(app, ["control", str(root), "--set", "data.weights.zh=1.5"]))
        return real(self, trainer)

    monkeypatch.setattr(HeuriMentor, "at_boundary", operator)
    run_recipe(recipe, ["pretrain"])
    assert [o.exit_code for o in outputs] == [0, 0]
    (applied,) = events(root, "control")
    (refused,) = events(root, "control_refused")
    assert applied["step"] == 4 and applied["weights"]["zh"] == pytest.approx(0.8)
    assert refused["step"] == 12 and "data.weights.zh: expected a share in [0, 1], got 1.5" in refused["reason"]
    assert (root / "pretrain" / "final" / "model.safetensors").is_file()  # the run went on

    seen = {r["step"]: r for r in records(root) if "seen/zh" in r}
    rows = lambda s, lo, hi: (seen[hi][f"seen/{s}"] - seen[lo][f"seen/{s}"]) / 32  # noqa: E731
    share = lambda lo, hi: rows("zh", lo, hi) / sum(rows(s, lo, hi) for s in ("en", "zh", "code"))  # noqa: E731
    assert all(r["mix/zh"] == pytest.approx(1 / 2.6) for r in records(root) if r["step"] <= 4 and "mix/zh" in r)
    assert all(r["mix/zh"] == pytest.approx(0.8) for r in records(root) if r["step"] > 4 and "mix/zh" in r)
    # Realized rows (160 after the change: binomial sd 0.03); the refused value changed nothing.
    assert share(4, 24) == pytest.approx(0.8, abs=0.1)


def test_garbage_window_spike_is_flagged_and_the_source_downweighted(prepared, tmp_path, monkeypatch):
    extra = [
        "pretrain.steps=40", "pretrain.phases=[]", "pretrain.checkpoint_every=8", "pretrain.log_every=4", "pretrain.eval_every=40",
        "pretrain.schedule=constant", "pretrain.monitor.spike.min_steps=8", "pretrain.monitor.spike.response=downweight",
        "pretrain.monitor.spike.skip_batches=2", "pretrain.monitor.spike.sigmas=3",
    ]  # fmt: skip
    recipe, root = fresh_run(prepared, tmp_path, extra)
    real = MixtureSampler.batch
    garbage_steps = {26, 27}
    code = list(recipe.data.domains).index("code")

    def corrupted(self, step, *args, **kwargs):
        x, y, tags = real(self, step, *args, **kwargs)
        if step in garbage_steps:  # a corrupted window of the code source: random tokens
            g = torch.Generator().manual_seed(step)
            noise = torch.randint(0, 1024, (x.shape[0], x.shape[1] + 1), generator=g)
            return noise[:, :-1], noise[:, 1:], torch.full_like(tags, code)
        return x, y, tags

    monkeypatch.setattr(MixtureSampler, "batch", corrupted)
    run_recipe(recipe, ["pretrain"])
    (spike,) = events(root, "spike")
    assert spike["spike_step"] == 27 and spike["source"] == "code" and spike["response"] == "downweight"
    assert spike["batch_loss"] > spike["mean"] + 3 * spike["std"]
    (rewind,) = events(root, "rewind")
    assert rewind["to_step"] == 24 and rewind["downweighted"] == "code"
    assert rewind["skipped_data_steps"] == [24, 29]  # data steps 24..26 plus 2 more are never trained on
    before = recipe.domain_weights(recipe.pretrain.mixture)
    assert rewind["weights"]["code"] == pytest.approx(before["code"] * 0.5 / (1 - before["code"] * 0.5))
    assert max(losses(root).values()) < spike["batch_loss"]  # the logged curve has no spike left
    report = (root / "pretrain" / "report.md").read_text()
    assert "| spike |" in report and "| rewind |" in report
    assert (root / "pretrain" / "loss_per_source.png").stat().st_size > 1000


def test_resume_with_fewer_processes_continues_the_loss_curve(prepared, tmp_path, capsys):
    root = tmp_path / "two" / "run"
    shutil.copytree(prepared, root)
    extra = ["pretrain.steps=8", "pretrain.checkpoint_every=4", "pretrain.parallel=ddp"]
    cmd, env = _cli(root, extra)
    cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    two = losses(root)
    shutil.rmtree(root / "pretrain" / "checkpoints" / "step_000008")
    shutil.rmtree(root / "pretrain" / "final")
    one = load_recipe(TINY, SMALL + [f"run_dir={root}", *extra])
    capsys.readouterr()
    run_recipe(one, ["pretrain"], force=True)
    assert "step_000004 (step 4)" in capsys.readouterr().out
    resumed = losses(root)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5), (step, resumed[step], two[step])
