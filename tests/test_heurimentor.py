"""HeuriMentor: the underlearned rule and repetition caps, bit-exact resume after SIGKILL across
mixture changes and a phase transition, live control, each loss-spike response applied (skip the
update, rewind and skip the window, down-weight the source), a non-finite step skipped without
ending the run, a spike pending at SIGTERM acted on before its checkpoint, no checkpoint of
non-finite weights, a spike on one of 2 processes answered alike by both, a phase ended by a
plateau, no host reads in the per-step hooks, 2 -> 1 process resume."""

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

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
from openmill.train.control import control_path
from openmill.train.engine import Trainer
from openmill.train.heurimentor import HeuriMentor
from openmill.train.metrics import read_metrics
from openmill.train.monitor import TrainingMonitor

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
            # The CLI checks a setting as the job will and refuses it, leaving the file as it was ...
            for bad in ("data.weights.zh=1.5", "data.weights.cod=0.5"):
                outputs.append(CliRunner().invoke(app, ["control", str(root), "--set", bad]))
            # ... so a bad value reaches the job only from a hand-edited file.
            control_path(root).write_text("data.weights.zh: 1.5\n")
        return real(self, trainer)

    monkeypatch.setattr(HeuriMentor, "at_boundary", operator)
    run_recipe(recipe, ["pretrain"])
    assert [o.exit_code for o in outputs] == [0, 2, 2]
    assert "data.weights.zh: expected a share in [0, 1], got 1.5" in outputs[1].output
    assert "data.weights.cod: unknown source; choices: en, zh, code" in outputs[2].output
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


# 40 steps at a constant lr, logged every 4, checkpoints every 8; a spike is > mean + 3 std.
SPIKE_RUN = [
    "pretrain.steps=40", "pretrain.phases=[]", "pretrain.checkpoint_every=8", "pretrain.log_every=4", "pretrain.eval_every=40",
    "pretrain.schedule=constant", "pretrain.monitor.spike.min_steps=8", "pretrain.monitor.spike.sigmas=3",
]  # fmt: skip


def inject_garbage(monkeypatch, recipe, data_steps, requested=None):
    """A corrupted window of the code source: the batches of `data_steps` become random tokens.
    `requested` (a list) receives every data step the run draws."""
    real = MixtureSampler.batch
    code = list(recipe.data.domains).index("code")

    def corrupted(self, step, *args, **kwargs):
        if requested is not None:
            requested.append(step)
        x, y, tags = real(self, step, *args, **kwargs)
        if step in data_steps:
            g = torch.Generator().manual_seed(step)
            noise = torch.randint(0, 1024, (x.shape[0], x.shape[1] + 1), generator=g)
            return noise[:, :-1], noise[:, 1:], torch.full_like(tags, code)
        return x, y, tags

    monkeypatch.setattr(MixtureSampler, "batch", corrupted)


def record_state_at(monkeypatch, steps):
    """{batch index: [(weights, optimizer state) before the step, after the step], ...} for `steps`,
    one pair per time the batch index is trained (a rewind trains it again)."""
    real = Trainer.train_step
    seen: dict[int, list] = {}

    def snapshot(trainer):
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}, copy.deepcopy(trainer.optimizer.state_dict()["state"])

    def recording(self):
        step = self.state.step
        before = snapshot(self) if step in steps else None
        out = real(self)
        if before is not None:
            seen.setdefault(step, []).append((before, snapshot(self)))
        return out

    monkeypatch.setattr(Trainer, "train_step", recording)
    return seen


def same_state(a, b) -> bool:
    (wa, oa), (wb, ob) = a, b
    return all(torch.equal(wa[k], wb[k]) for k in wa) and oa.keys() == ob.keys() and all(
        torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i]
    )


def test_spike_skip_update_leaves_weights_and_optimizer_state_untouched(prepared, tmp_path, monkeypatch):
    recipe, root = fresh_run(prepared, tmp_path, SPIKE_RUN + ["pretrain.monitor.spike.response=skip_update"])
    inject_garbage(monkeypatch, recipe, {26})
    states = record_state_at(monkeypatch, {25, 26, 27})
    run_recipe(recipe, ["pretrain"])
    (spike,) = events(root, "spike")
    assert spike["spike_step"] == 27 and spike["response"] == "skip_update" and spike["source"] == "code"
    assert [e["step"] for e in events(root, "skip_update")] == [27]
    assert not events(root, "rewind")
    (before, after), = states[26]
    assert same_state(before, after)  # no update: weights and AdamW moments/step count as they were
    for step in (25, 27):  # the neighbours did update
        (before, after), = states[step]
        assert not same_state(before, after)
    assert max(losses(root)) == 40


def test_spike_rewind_resumes_from_the_checkpoint_and_never_sees_the_window_again(prepared, tmp_path, monkeypatch):
    extra = ["pretrain.monitor.spike.response=rewind", "pretrain.monitor.spike.skip_batches=2"]
    recipe, root = fresh_run(prepared, tmp_path, SPIKE_RUN + extra)
    requested = []
    inject_garbage(monkeypatch, recipe, {26, 27}, requested)
    states = record_state_at(monkeypatch, {24})
    run_recipe(recipe, ["pretrain"])
    (spike,) = events(root, "spike")
    assert spike["spike_step"] == 27 and spike["response"] == "rewind"
    (rewind,) = events(root, "rewind")
    assert rewind["to_step"] == 24 and rewind["skipped_data_steps"] == [24, 29] and "downweighted" not in rewind
    # The spike is read at log step 28 (data steps 0-27 trained); back at step 24, training goes on
    # with data step 29: the spike's window and the 2 batches after it are never drawn again.
    assert requested == list(range(28)) + list(range(29, 45))
    (first, _), (again, _) = states[24]
    assert same_state(first, again)  # step 24 restarts from the checkpoint's weights and optimizer state, bit for bit
    mix = {r["step"]: r["mix/code"] for r in records(root) if "mix/code" in r}
    assert len(set(mix.values())) == 1  # rewind alone leaves the mixture as it was
    assert sorted(losses(root)) == list(range(4, 41, 4))


def test_garbage_window_spike_is_flagged_and_the_source_downweighted(prepared, tmp_path, monkeypatch):
    extra = ["pretrain.monitor.spike.response=downweight", "pretrain.monitor.spike.skip_batches=2"]
    recipe, root = fresh_run(prepared, tmp_path, SPIKE_RUN + extra)
    inject_garbage(monkeypatch, recipe, {26, 27})
    run_recipe(recipe, ["pretrain"])
    (spike,) = events(root, "spike")
    assert spike["spike_step"] == 27 and spike["source"] == "code" and spike["response"] == "downweight"
    assert spike["batch_loss"] > spike["mean"] + 3 * spike["std"]
    (rewind,) = events(root, "rewind")
    assert rewind["to_step"] == 24 and rewind["downweighted"] == "code"
    assert rewind["skipped_data_steps"] == [24, 29]  # data steps 24..26 plus 2 more are never trained on
    before = recipe.domain_weights(recipe.pretrain.mixture)
    halved = before["code"] * 0.5 / (1 - before["code"] * 0.5)
    assert rewind["weights"]["code"] == pytest.approx(halved)
    # The logged mixture: code at its recipe weight up to the rewind, halved (renormalised) after it.
    mix = {r["step"]: r["mix/code"] for r in records(root) if "mix/code" in r}
    assert all(w == pytest.approx(before["code"]) for s, w in mix.items() if s <= 24)
    assert all(w == pytest.approx(halved) for s, w in mix.items() if s > 24) and max(mix) == 40
    assert max(losses(root).values()) < spike["batch_loss"]  # the logged curve has no spike left
    report = (root / "pretrain" / "report.md").read_text()
    assert "| spike |" in report and "| rewind |" in report
    assert (root / "pretrain" / "loss_per_source.png").stat().st_size > 1000


def blow_up_loss(monkeypatch, at_step, factor):
    """The loss of the batch trained at loop step `at_step` (0-based) is multiplied by `factor`
    (inf or nan: a numerical blow-up). Returns a function that ends the injection."""
    real_init = Trainer.__init__
    active = [True]

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        loss_fn = self.loss_fn

        def blown(model, inputs, targets, extra):
            loss = loss_fn(model, inputs, targets, extra)
            return loss * factor if active[0] and self.state.step == at_step else loss

        self.loss_fn = blown

    monkeypatch.setattr(Trainer, "__init__", init)

    def stop():
        active[0] = False

    return stop


@pytest.mark.parametrize("log_every", [1, 4])
def test_skip_update_drops_a_non_finite_step_and_the_run_goes_on(prepared, tmp_path, monkeypatch, log_every):
    extra = ["pretrain.phases=[]", f"pretrain.log_every={log_every}", "pretrain.monitor.spike.response=skip_update"]
    recipe, root = fresh_run(prepared, tmp_path, extra)
    blow_up_loss(monkeypatch, at_step=2, factor=float("inf"))
    lr_steps = []
    real_lr = HeuriMentor.lr
    monkeypatch.setattr(HeuriMentor, "lr", lambda self, step, cfg: lr_steps.append(step) or real_lr(self, step, cfg))
    run_recipe(recipe, ["pretrain"])
    assert [e["step"] for e in events(root, "skip_update")] == [3]
    assert (root / "pretrain" / "final" / "model.safetensors").is_file()  # the run finished
    # The dropped step's loss is no part of the curve: the other steps of its window are logged;
    # a window of the dropped step alone (log_every 1) logs no loss.
    logged = losses(root)
    assert sorted(logged) == [s for s in range(log_every, 13, log_every) if s != 3]
    assert all(math.isfinite(v) for v in logged.values())
    assert lr_steps == list(range(12))  # one learning rate per step, the one applied and logged
    # Nor of the spike test's history (an inf there would blind the test for `window` steps).
    trainer = torch.load(root / "pretrain" / "checkpoints" / "step_000012" / "trainer.pt", weights_only=False)
    assert trainer["extra"]["monitor"]["history"].isfinite().all()


def sigterm_at(monkeypatch, step):
    """SIGTERM arrives as step `step` (counted like the logged steps) has finished."""
    real_boundary = HeuriMentor.at_boundary

    def terminated(self, trainer):
        if trainer.state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler of sigterm_checkpoints asks for a stop
        return real_boundary(self, trainer)

    monkeypatch.setattr(HeuriMentor, "at_boundary", terminated)
    return lambda: monkeypatch.setattr(HeuriMentor, "at_boundary", real_boundary)


# One process checks for SIGTERM every step but reads spikes at log steps (every 4 here): the NaN
# update of step 6 is still unread when SIGTERM's checkpoint is due at step 6.
NAN_AT_STEP_6 = ["pretrain.phases=[]", "pretrain.log_every=4"]


def test_sigterm_with_a_spike_not_yet_read_checkpoints_the_response_not_the_spike(prepared, tmp_path, monkeypatch):
    recipe, root = fresh_run(prepared, tmp_path, NAN_AT_STEP_6 + ["pretrain.monitor.spike.response=rewind"])
    stop_blowing_up = blow_up_loss(monkeypatch, at_step=5, factor=float("nan"))
    no_more_sigterm = sigterm_at(monkeypatch, 6)
    with pytest.raises(SystemExit) as stopped:
        run_recipe(recipe, ["pretrain"])
    assert stopped.value.code == 143  # 128 + SIGTERM: an unfinished run to whatever launched it
    told = [e for e in records(root) if e.get("event") in ("spike", "rewind", "sigterm")]
    assert [e["event"] for e in told] == ["spike", "rewind", "sigterm"]
    spike, rewind, sigterm = told
    assert spike["spike_step"] == 6 and rewind["to_step"] == 4 and rewind["skipped_data_steps"] == [4, 6]
    assert sigterm["checkpoint"] == "step_000004"  # the rewound state, not step 6's NaN weights
    checkpoints = root / "pretrain" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004"]
    assert all(w.isfinite().all() for w in load_file(str(checkpoints / "step_000004" / "model.safetensors")).values())

    stop_blowing_up()
    no_more_sigterm()
    drawn = []
    inject_garbage(monkeypatch, recipe, set(), drawn)  # no garbage: records the data steps drawn
    run_recipe(recipe, ["pretrain"])
    assert drawn == list(range(6, 14))  # from step 4, past the skipped window (data steps 4-5)
    resumed = losses(root)
    assert max(resumed) == 12 and all(math.isfinite(v) for v in resumed.values())
    assert len(events(root, "rewind")) == 1  # the resumed run met no spike


def test_non_finite_weights_are_never_checkpointed(prepared, tmp_path, monkeypatch):
    recipe, root = fresh_run(prepared, tmp_path, NAN_AT_STEP_6 + ["pretrain.monitor.spike.response=none"])
    blow_up_loss(monkeypatch, at_step=5, factor=float("nan"))
    sigterm_at(monkeypatch, 6)
    with pytest.raises(FloatingPointError, match="weights are not finite at step 6"):
        run_recipe(recipe, ["pretrain"])
    assert events(root, "spike")[0]["spike_step"] == 6  # told, with nothing done about it ("none")
    assert sorted(p.name for p in (root / "pretrain" / "checkpoints").iterdir()) == ["step_000004"]


# Run by torchrun in the 2-process test: the batch of data step 5 spikes on rank 1 only (its loss
# x50, as after a corrupt read on one host); each rank writes down what it decided and holds.
ONE_RANK_SPIKE = """
import hashlib, json, os, sys
import torch
from openmill.config import load_recipe
from openmill.data.mixture import MixtureSampler
from openmill.stages import run_recipe
from openmill.train.engine import Trainer
from openmill.train.heurimentor import HeuriMentor

recipe_file, out, *overrides = sys.argv[1:]
rank = int(os.environ["RANK"])
drawn, skipped, run = [], [], {}

real_batch = MixtureSampler.batch
def batch(self, step, *args, **kwargs):
    drawn.append(step)
    return real_batch(self, step, *args, **kwargs)
MixtureSampler.batch = batch

real_init = Trainer.__init__
def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    run["trainer"], loss_fn = self, self.loss_fn
    def spiking(model, inputs, targets, extra):
        loss = loss_fn(model, inputs, targets, extra)
        return loss * 50.0 if rank == 1 and drawn[-1] == 5 else loss
    self.loss_fn = spiking
Trainer.__init__ = init

real_allow = HeuriMentor.allow_update
def allow_update(self, step, loss):
    run["mentor"] = self
    applied = real_allow(self, step, loss)
    if not applied:
        skipped.append(step)
    return applied
HeuriMentor.allow_update = allow_update

run_recipe(load_recipe(recipe_file, overrides), ["pretrain"])
weights = torch.cat([p.detach().flatten() for p in run["trainer"].raw.parameters()])
result = {"skipped": skipped, "drawn": drawn, "mixture": run["mentor"].dmu.weights,
          "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.parametrize("response", ["skip_update", "downweight"])
def test_a_spike_on_one_process_gets_the_same_response_on_every_process(prepared, tmp_path, response):
    root = tmp_path / "run"
    shutil.copytree(prepared, root)
    script = tmp_path / "one_rank_spike.py"
    script.write_text(ONE_RANK_SPIKE)
    overrides = SMALL + [
        f"run_dir={root}", "pretrain.parallel=ddp", "pretrain.steps=8", "pretrain.phases=[]",
        "pretrain.monitor.spike.min_steps=3", "pretrain.monitor.spike.window=4",
        f"pretrain.monitor.spike.response={response}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, str(script), str(TINY), str(tmp_path), *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # the same updates skipped, data drawn, mixture and final weights, bit for bit
    (spike,) = events(root, "spike")  # judged on the global batch: rank 1's x50 makes it x25.5
    assert spike["spike_step"] == 6 and spike["batch_loss"] > 20 * spike["mean"]
    if response == "skip_update":
        assert rank0["skipped"] == [5] and rank0["drawn"] == list(range(8))
    else:
        (rewind,) = events(root, "rewind")
        source = rewind["downweighted"]
        recipe = load_recipe(TINY, overrides)
        before = recipe.domain_weights(recipe.pretrain.mixture)
        assert rewind["to_step"] == 4 and rank0["mixture"] == pytest.approx(rewind["weights"])
        assert rank0["mixture"][source] < before[source]
        assert rank0["skipped"] == [] and rank0["drawn"] == list(range(10))  # steps 4-7 redone on data 6-9
    # Only the main process tells: each decision is printed once.
    assert out.stdout.count("[heurimentor] step 6: spike") == 1


@pytest.mark.parametrize("end_on_plateau", [True, False])
def test_a_phase_configured_to_end_on_plateau_ends_early(prepared, tmp_path, end_on_plateau):
    # The first phase's lr (1e-9) leaves the model as it is: the validation loss stalls, so the
    # plateau test (patience 1: one evaluation, every 4 steps) fires at step 8, deterministically.
    frozen = (
        "{name: frozen, steps: 16, mixture: {en: 1, zh: 1, code: 1}, lr: 1.0e-9, schedule: constant, warmup_steps: 0,"
        f" end_on_plateau: {str(end_on_plateau).lower()}}}"
    )
    after = "{name: next, steps: 8, mixture: {en: 1, zh: 1, code: 2}, lr: 1.0e-3, schedule: constant, warmup_steps: 0}"
    extra = [
        "pretrain.steps=24", "pretrain.eval_every=4", "pretrain.checkpoint_every=24", "pretrain.monitor.plateau.patience=1",
        f"pretrain.phases=[{frozen}, {after}]",
    ]  # fmt: skip
    recipe, root = fresh_run(prepared, tmp_path, extra)
    run_recipe(recipe, ["pretrain"])
    assert events(root, "plateau")[0]["step"] == 8
    (phase,) = events(root, "phase")
    ends = 8 if end_on_plateau else 16
    assert (phase["step"], phase["from"], phase["to"]) == (ends, "frozen", "next")
    assert phase["reason"] == ("plateau" if end_on_plateau else "budget")
    logged = [r for r in records(root) if "lr" in r]
    assert [r["step"] for r in logged] == list(range(1, 25))  # the run's total is unchanged
    for r in logged:  # step s trained batch s-1: the new phase's lr and mixture from batch `ends` on
        in_next = r["step"] > ends
        assert r["lr"] == pytest.approx(1.0e-3 if in_next else 1.0e-9) and r["phase"] == int(in_next)
        assert r["mix/code"] == pytest.approx(0.5 if in_next else 1 / 3)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("response", ["rewind", "skip_update"])
def test_the_monitor_reads_nothing_back_from_the_device_between_log_steps(prepared, tmp_path, monkeypatch, response):
    """Every per-step hook (the loss capture, the spike test, the step boundary) runs with the
    tensor-to-host conversions counted: none, except skip_update's one documented read per step."""
    recipe, root = fresh_run(prepared, tmp_path, ["pretrain.phases=[]", f"pretrain.monitor.spike.response={response}"])
    reads, inside = [], [False]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def guarded(method):
        def run(*args, **kwargs):
            inside[0] = True
            try:
                return method(*args, **kwargs)
            finally:
                inside[0] = False

        return run

    capture = TrainingMonitor.capture

    @contextlib.contextmanager
    def guarded_capture(self, tags):  # the monitor's work runs when the micro-batch's context closes
        context = capture(self, tags)
        context.__enter__()
        try:
            yield
        finally:
            guarded(context.__exit__)(None, None, None)

    monkeypatch.setattr(TrainingMonitor, "capture", guarded_capture)
    monkeypatch.setattr(HeuriMentor, "allow_update", guarded(HeuriMentor.allow_update))
    monkeypatch.setattr(HeuriMentor, "at_boundary", guarded(HeuriMentor.at_boundary))
    run_recipe(recipe, ["pretrain"])
    assert max(losses(root)) == 12
    assert reads == ([] if response == "rewind" else ["__bool__"] * 12)


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
