"""HeuriMentor's Adaptive Training Engine: the hooks that tie the data unit (data/dmu.py), the
monitor (train/monitor.py) and live control (train/control.py) into the training loop.

At each step boundary: phase changes on budget, live control, SIGTERM (a pending spike's response,
a checkpoint, then a clean exit). At log steps: the monitor's per-source losses and spike verdict;
a spike gets the configured response (none / skip_update / rewind / downweight). After each
validation: the mixture policy and the plateau test (which may end a phase). Before each
checkpoint: the weight trajectory.
Every decision is an event: one `{"step", "event", ...}` line in metrics.jsonl and a log line.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from openmill.config import PretrainConfig
from openmill.data.dmu import DataManagementUnit
from openmill.train.control import ControlError, ControlFile, control_path, validate
from openmill.train.engine import Trainer, TrainingHooks
from openmill.train.monitor import TrainingMonitor
from openmill.train.parallel import World

# The shell's status for a process ended by SIGTERM: schedulers and wrappers (Slurm requeue, torchrun's
# restarts, `make`) see an unfinished run, not a success, although its state is safely checkpointed.
EXIT_STOPPED = 128 + signal.SIGTERM


class HeuriMentor(TrainingHooks):
    def __init__(self, cfg: PretrainConfig, dmu: DataManagementUnit, monitor: TrainingMonitor, world: World, run_dir: Path, log=print):
        self.cfg, self.dmu, self.monitor, self.world = cfg, dmu, monitor, world
        # Every process takes the same decisions; one of them tells (as the Trainer's log does).
        self.log = log if world.is_main else (lambda *a, **k: None)
        self.control = ControlFile(control_path(run_dir))
        self.rewinds = 0  # per process, not checkpointed: a rewind must not undo its own count
        self.stop_requested = False
        self.skipped: list[int] = []  # steps whose update skip_update dropped, logged at the next log step
        self.eval_hook = _load_hook(cfg.monitor.eval_hook) if cfg.monitor.eval_hook else None
        self.wall_start = time.perf_counter()

    # ------------------------------------------------------------------------ lifetime helpers

    @contextlib.contextmanager
    def sigterm_checkpoints(self):
        """While training: SIGTERM asks for a checkpoint at the next step boundary, then exit EXIT_STOPPED."""
        def ask_to_stop(signum, frame):
            self.stop_requested = True

        try:
            previous = signal.signal(signal.SIGTERM, ask_to_stop)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def event(self, trainer: Trainer, step: int, record: dict) -> None:
        trainer.metrics.log(step, **record)
        details = ", ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "event")
        self.log(f"[heurimentor] step {step}: {record['event']} ({details})")

    # Control state survives restarts: the same file is not applied twice.
    def state_dict(self) -> dict:
        return {"control_hash": self.control.applied_hash}

    def load_state_dict(self, state: dict) -> None:
        self.control.applied_hash = state.get("control_hash")

    # --------------------------------------------------------------------------------- hooks

    def lr(self, step: int, cfg: PretrainConfig) -> float:
        return self.dmu.lr(step)

    def capture(self, tags: torch.Tensor):
        return self.monitor.capture(tags)

    def allow_update(self, step: int, loss: torch.Tensor) -> bool:
        # The verdict is on the global batch (observe is collective): every process skips alike.
        flag = self.monitor.observe(step, loss)
        if self.cfg.monitor.spike.response != "skip_update":
            return True
        if bool(flag):  # the one host sync per step this response costs
            self.skipped.append(step)
            return False
        return True

    def at_boundary(self, trainer: Trainer) -> None:
        step = trainer.state.step
        for record in self.dmu.begin_step(step):
            self.event(trainer, step, record)
        # Several processes must agree on the step: they look only after log steps, where rank 0's
        # reading is broadcast (a collective per step would cost more than the monitor may).
        if self.world.size > 1 and step % self.cfg.log_every:
            return
        polled = self.control.poll() if self.world.is_main else None
        stop = self.stop_requested
        if self.world.size > 1:
            box = [polled]
            dist.broadcast_object_list(box, src=0)
            polled = box[0]
            if polled is not None:
                self.control.applied_hash = polled[0]
            flag = torch.tensor(int(stop))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag)
        if polled is not None:
            self._apply_control(trainer, step, polled[1])
        if stop:
            # A spike observed since the last log step is acted on first (with one process the
            # boundary is checked every step), so the checkpoint holds what the response leaves: a
            # rewind's weights and skipped window, a down-weighted mixture. Saved as it is, the
            # spiked update would be a good restart point and the spike forgotten.
            self._read_monitor(trainer, step)
            trainer.save()
            saved = trainer.state.step  # earlier than `step` after a rewind
            self.event(trainer, saved, {"event": "sigterm", "checkpoint": f"step_{saved:06d}"})
            self.log(f"{trainer.out_dir.name}: stopped by SIGTERM at step {saved}; rerun the same command to resume")
            raise SystemExit(EXIT_STOPPED)

    def _apply_control(self, trainer: Trainer, step: int, settings: dict) -> None:
        try:
            if "__error__" in settings:
                raise ControlError(f"{self.control.path}: {settings['__error__']}")
            weights, lr_scale = validate(settings, self.dmu.state["base"])
        except ControlError as e:
            self.event(trainer, step, {"event": "control_refused", "reason": str(e)})
            return
        if weights is not None:
            self.dmu.set_base(weights)
        if lr_scale is not None:
            self.dmu.state["lr_scale"] = lr_scale
        self.event(trainer, step, {"event": "control", "settings": settings, "weights": self.dmu.weights})

    def _read_monitor(self, trainer: Trainer, step: int) -> dict:
        """The monitor's reading since the last one; its skipped updates are logged and its spike
        gets the configured response (which may rewind the trainer)."""
        read = self.monitor.read()
        for skipped in self.skipped:
            self.event(trainer, skipped + 1, {"event": "skip_update", "reason": "loss spike"})
        self.skipped.clear()
        if read["spike"] is not None:
            self._spike(trainer, step, read["spike"])
        return read

    def at_log(self, trainer: Trainer, step: int) -> dict:
        read = self._read_monitor(trainer, step)
        if trainer.state.step != step:  # rewound
            return {}
        out = {f"train/{s}/loss": v for s, v in read["train_loss"].items()}
        out.update({f"mix/{s}": w for s, w in self.dmu.weights.items()})
        out.update({f"seen/{s}": n for s, n in self.dmu.state["seen"].items()})
        out.update(phase=self.dmu.state["phase"], lr_scale=self.dmu.state["lr_scale"])
        out["monitor_fraction"] = self.monitor.host_seconds / max(1e-9, time.perf_counter() - self.wall_start)
        return out

    def _spike(self, trainer: Trainer, step: int, spike: dict) -> None:
        response = self.cfg.monitor.spike.response
        details = {k: v for k, v in spike.items() if k != "step"}
        # spike_step counts like the logged steps (1 = the first batch); spike["step"] is the batch index.
        self.event(trainer, step, {"event": "spike", "spike_step": spike["step"] + 1, **details, "response": response})
        if response in ("none", "skip_update"):
            return
        if self.rewinds >= self.cfg.monitor.spike.max_rewinds:
            raise RuntimeError(f"loss spike at step {spike['step'] + 1} after {self.rewinds} rewinds; stopping (monitor.spike.max_rewinds)")
        if not trainer.resume(at_most=spike["step"]):
            self.event(trainer, step, {"event": "rewind_impossible", "reason": "no checkpoint before the spike"})
            return
        self.rewinds += 1
        back = trainer.state.step
        lo, hi = self.dmu.skip_window(back, spike["step"], self.cfg.monitor.spike.skip_batches)
        record = {"event": "rewind", "to_step": back, "skipped_data_steps": [lo, hi]}
        if response == "downweight" and spike["source"] is not None:
            source = spike["source"]
            base = self.dmu.state["base"]
            self.dmu.set_base({source: base[source] * self.cfg.monitor.spike.downweight_factor})
            record.update(downweighted=source, weights=self.dmu.weights)
        self.event(trainer, back, record)

    def after_eval(self, trainer: Trainer, step: int, results: dict[str, float]) -> None:
        val = {s: results[f"val/{s}/loss"] for s in self.dmu.sources if f"val/{s}/loss" in results}
        moved = self.dmu.after_eval(val)
        if moved is not None:
            self.event(trainer, step, moved)
        plateau = self.monitor.plateau(val)
        if plateau is not None:
            self.event(trainer, step, {**plateau, "phase": self.dmu.phase.name})
            if self.dmu.phase.end_on_plateau and self.dmu.state["phase"] < len(self.dmu.phases) - 1:
                self.event(trainer, step, self.dmu.next_phase(step, "plateau"))
        if self.eval_hook is not None:
            trainer.model.eval()
            with torch.no_grad():
                scores = self.eval_hook(trainer.model, step)
            trainer.model.train()
            trainer.metrics.log(step, **{f"eval/{k}": v for k, v in scores.items()})

    def before_save(self, trainer: Trainer, step: int) -> None:
        if self.cfg.monitor.weight_trajectory:
            trajectory = self.monitor.weight_trajectory(trainer.model, trainer.state.tokens)
            trainer.metrics.log(step, weight_std=trajectory["std"], frechet_per_btok=trajectory["frechet_per_btok"])


def _load_hook(dotted: str):
    module, _, name = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"pretrain.monitor.eval_hook: cannot load {dotted!r} ({e})") from None


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
