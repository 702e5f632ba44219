"""HeuriMentor's Training State Monitor: per-source loss, spike and plateau detection, weight trajectory.

Per step everything stays on the device: per-token losses (from the fused loss, fused_loss.py)
are summed per source with index_add_, and the spike test (loss > mean + k std of the last
`window` step losses, or not finite) writes its verdict into small device tensors. Under torchrun
the step's numbers are summed over the processes first (one small all-reduce on the device), so
every process reaches the same verdict. The host reads them only at log steps (`read`), so the
monitor adds no host-device synchronisation to a step;
its own host time is measured and logged as `monitor_fraction` (share of wall time).

Plateau detection runs on validation results (host values already). The weight trajectory is
computed at checkpoints: per parameter type, the standard deviation of each layer's weights, and
the discrete Frechet distance between consecutive checkpoints' curves, per billion tokens between
them (Aquila2 report).
"""

from __future__ import annotations

import contextlib
import re
import time

import torch
import torch.distributed as dist

from openmill.fused_loss import record_token_losses
from openmill.train.heurimentor_config import MonitorConfig

LAYER_PARAM = re.compile(r"^layers\.(\d+)\.(.+)$")


class TrainingMonitor:
    def __init__(self, cfg: MonitorConfig, sources: list[str], device: torch.device):
        self.cfg, self.sources, self.device = cfg, sources, device
        n = len(sources)
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.src_loss, self.src_tokens = zeros(n), zeros(n)  # since the last read
        self.step_loss, self.step_tokens = zeros(n), zeros(n)  # of the current step
        self.history = zeros(cfg.spike.window)  # ring buffer of recent step losses
        self.filled = 0  # losses in the ring (host int: the step count is known without a sync)
        self.ema = zeros(n)  # per-source running mean of step losses (spike attribution)
        self.spike_step = torch.full((), -1, dtype=torch.long, device=device)  # first spike since read
        self.spike_loss, self.spike_mean, self.spike_std = zeros(()), zeros(()), zeros(())
        self.spike_ratio = zeros(n)  # per source: loss at the spike / its running mean
        self.last_flag = torch.zeros((), dtype=torch.bool, device=device)
        self.val_means: list[float] = []  # mean validation loss per evaluation (plateau test)
        self.trajectory: dict | None = None  # {"tokens": int, "std": {type: [per layer]}}
        self.host_seconds = 0.0

    # ------------------------------------------------------------------------------- per step

    @contextlib.contextmanager
    def capture(self, tags: torch.Tensor):
        sink: list[torch.Tensor] = []
        with record_token_losses(sink):
            yield
        t = time.perf_counter()
        tags = tags.to(self.device)
        for token_losses in sink:
            per_row = token_losses.view(len(tags), -1)
            self.step_loss.index_add_(0, tags, per_row.sum(1).float())
            self.step_tokens.index_add_(0, tags, torch.full_like(per_row[:, 0], per_row.shape[1], dtype=torch.float32))
        self.host_seconds += time.perf_counter() - t

    def observe(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Step `step` (0-based batch index) had mean loss `loss` on this process (device scalar);
        returns the spike flag.

        Collective under torchrun: the step's loss and per-source sums are first summed over the
        processes (one all-reduce of 1 + 2 x sources floats, on the device: no host sync), so every
        process judges the global batch against the same history and reaches the same verdict, the
        same attribution and the same statistics, and a run's verdicts do not depend on how many
        processes share its batch. A verdict on process-local numbers would let one process skip an
        update the others apply, or down-weight a source on some processes only."""
        t = time.perf_counter()
        spike, loss = self.cfg.spike, loss.detach().float()
        if dist.is_initialized():
            n_src = len(self.sources)
            summed = torch.cat([loss.reshape(1), self.step_loss, self.step_tokens])
            dist.all_reduce(summed)
            # The processes' batches are equal slices of the global one: their mean loss is its loss.
            loss = summed[0] / dist.get_world_size()
            self.step_loss.copy_(summed[1 : 1 + n_src])
            self.step_tokens.copy_(summed[1 + n_src :])
        n = min(self.filled, spike.window)
        finite = torch.isfinite(loss)
        if n >= spike.min_steps:
            recent = self.history[:n]
            mean, std = recent.mean(), recent.std()
            flag = (loss > mean + spike.sigmas * std) | ~finite
        else:  # too few losses to judge by: only the non-finite guard
            # A flagged loss enters the history as the mean so far: an inf kept there would make
            # every mean and std of the next `window` steps inf/nan and blind the spike test.
            mean, std = (self.history[:n].mean() if n else loss), torch.zeros_like(loss)
            flag = ~finite
        present = self.step_tokens > 0
        step_mean = self.step_loss / self.step_tokens.clamp(min=1)
        first = flag & (self.spike_step < 0)
        self.spike_step = torch.where(first, step, self.spike_step)
        self.spike_loss = torch.where(first, loss, self.spike_loss)
        self.spike_mean = torch.where(first, mean, self.spike_mean)
        self.spike_std = torch.where(first, std, self.spike_std)
        ratio = torch.where(present & (self.ema > 0), step_mean / self.ema.clamp(min=1e-6), torch.zeros_like(self.ema))
        self.spike_ratio = torch.where(first, ratio, self.spike_ratio)
        # A spike does not enter the statistics it is judged against.
        self.history[self.filled % spike.window] = torch.where(flag, mean, loss)
        self.filled += 1
        update = present & ~flag & torch.isfinite(step_mean)
        blended = torch.where(self.ema > 0, 0.9 * self.ema + 0.1 * step_mean, step_mean)
        self.ema = torch.where(update, blended, self.ema)
        self.src_loss += torch.where(update | (present & flag), self.step_loss, 0.0).nan_to_num(posinf=0.0)
        self.src_tokens += self.step_tokens
        self.step_loss.zero_()
        self.step_tokens.zero_()
        self.last_flag = flag
        self.host_seconds += time.perf_counter() - t
        return flag

    # ------------------------------------------------------------------------------ at log steps

    def read(self) -> dict:
        """Per-source train loss since the last read and the first spike in that span, then the
        accumulators restart. Not collective: `observe` already summed every step over the
        processes, so each process reads the same global numbers."""
        losses, tokens, spike = self.src_loss, self.src_tokens, self.spike_step
        out = {"train_loss": {s: float(l / t) for s, l, t in zip(self.sources, losses.tolist(), tokens.tolist()) if t > 0}}
        out["spike"] = None
        if int(spike) >= 0:
            ratios = dict(zip(self.sources, self.spike_ratio.tolist()))
            out["spike"] = {
                "step": int(spike),
                "batch_loss": float(self.spike_loss),
                "mean": float(self.spike_mean),
                "std": float(self.spike_std),
                "source": max(ratios, key=ratios.get) if any(v > 0 for v in ratios.values()) else None,
                "ratio": ratios,
            }
        self.src_loss.zero_()
        self.src_tokens.zero_()
        self.spike_step.fill_(-1)
        return out

    def plateau(self, val: dict[str, float]) -> dict | None:
        """After an evaluation with per-source validation loss `val`: a plateau event or None."""
        if not val:
            return None
        self.val_means.append(sum(val.values()) / len(val))
        p = self.cfg.plateau
        if len(self.val_means) <= p.patience:
            return None
        before, now = self.val_means[-p.patience - 1], self.val_means[-1]
        improvement = (before - now) / before
        if improvement >= p.min_rel_improvement:
            return None
        self.val_means = [now]  # one event per plateau, not one per evaluation after it
        return {"event": "plateau", "relative_improvement": improvement, "evaluations": p.patience}

    # ----------------------------------------------------------------------- weight trajectory

    def weight_trajectory(self, model: torch.nn.Module, tokens: int) -> dict:
        """Collective under FSDP. Per parameter type, per-layer weight std; Frechet distance to the
        previous checkpoint's curves per billion tokens."""
        curves: dict[str, dict[int, float]] = {}
        for name, p in model.named_parameters():
            name = name.removeprefix("module.").replace("_orig_mod.", "")
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            m = LAYER_PARAM.match(name)
            if m is None or full.dim() < 2:
                continue
            curves.setdefault(m.group(2), {})[int(m.group(1))] = float(full.detach().float().std())
        std = {k: [v[i] for i in sorted(v)] for k, v in curves.items()}
        out = {"std": std, "frechet_per_btok": {}}
        prev = self.trajectory
        if prev is not None and tokens > prev["tokens"]:
            btok = (tokens - prev["tokens"]) / 1e9
            for k, curve in std.items():
                if k in prev["std"]:
                    out["frechet_per_btok"][k] = frechet(prev["std"][k], curve) / btok
        self.trajectory = {"tokens": tokens, "std": std}
        return out

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "history": self.history.cpu(),
            "filled": self.filled,
            "ema": self.ema.cpu(),
            "val_means": list(self.val_means),
            "trajectory": self.trajectory,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(self.device)
        self.filled = state["filled"]
        self.ema = state["ema"].to(self.device)
        self.val_means = list(state["val_means"])
        self.trajectory = state["trajectory"]


def frechet(a: list[float], b: list[float]) -> float:
    """Discrete Frechet distance between the curves (i, a_i) and (j, b_j) (Eiter & Mannila)."""
    n, m = len(a), len(b)
    d = lambda i, j: ((i - j) ** 2 + (a[i] - b[j]) ** 2) ** 0.5  # noqa: E731
    ca = [[0.0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            cost = d(i, j)
            if i == 0 and j == 0:
                ca[i][j] = cost
            elif i == 0:
                ca[i][j] = max(ca[i][j - 1], cost)
            elif j == 0:
                ca[i][j] = max(ca[i - 1][j], cost)
            else:
                ca[i][j] = max(min(ca[i - 1][j], ca[i - 1][j - 1], ca[i][j - 1]), cost)
    return ca[-1][-1]
