"""HeuriMentor's Data Management Unit: phases, per-source repetition caps and mixture policies.

The DMU owns everything that decides *what* a step trains on: the current phase (mixture, batch
size, window length, learning-rate schedule), the mixture weights after policy, live control and
spike responses, the tokens each source has given (for repetition caps) and the data shift that
skips a bad data window after a rewind. All of it is plain JSON state in every checkpoint; the
batch itself stays a pure function of (seed, data step, weights) (data/mixture.py), so a resumed
run reproduces an uninterrupted one bit for bit.

The `underlearned` rule (docs/heurimentor.md), at every validation within a phase:

    gap_s    = ln L_s - ln R_s        L_s: source s's validation loss now; R_s: policy.reference[s],
                                      or L_s at the phase's first validation (improvement so far)
    target_s = base_s * exp(eta * (gap_s - mean over active sources of gap))
    w_s      = clip(target_s, min_ratio * base_s, max_ratio * base_s), renormalised to sum 1

`base` is the phase's mixture (after live control and spike down-weighting). Sources at their
repetition cap get weight 0 before the final renormalisation.
"""

from __future__ import annotations

import math

import numpy as np

from openmill.config import PretrainConfig
from openmill.data.mixture import MixtureSampler
from openmill.data.shards import TokenShards
from openmill.train.heurimentor_config import PhaseConfig
from openmill.train.schedule import lr_at


def _normalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("every source has weight 0 (repetition caps reached or all weights set to 0)")
    return {k: v / total for k, v in weights.items()}


def scaled_phases(phases: list[PhaseConfig], total: int) -> list[PhaseConfig]:
    """Phase budgets are the split of pretrain.steps: when their sum differs (pretrain.steps was
    overridden) they are scaled in proportion, each at least 1 step, the last taking the remainder."""
    planned = sum(p.steps for p in phases)
    if planned == total:
        return list(phases)
    steps, used = [], 0
    for i, p in enumerate(phases[:-1]):
        n = max(1, min(round(p.steps * total / planned), total - used - (len(phases) - 1 - i)))
        steps.append(n)
        used += n
    steps.append(total - used)
    return [p.model_copy(update={"steps": n}) for p, n in zip(phases, steps)]


class DataManagementUnit:
    def __init__(self, cfg: PretrainConfig, default_mixture: dict[str, float], train: dict[str, TokenShards], seed: int):
        self.cfg = cfg
        self.sources = list(train)
        self.phases = scaled_phases(cfg.phases, cfg.steps) if cfg.phases else [PhaseConfig(name="main", steps=cfg.steps)]
        self.default_mixture = default_mixture
        self.capacity = {s: t.n_tokens for s, t in train.items()}
        max_len = max([p.seq_len or cfg.seq_len for p in self.phases])
        self.sampler = MixtureSampler(train, self._phase_mixture(0), max_len, seed)
        self.state = {
            "phase": 0,
            "phase_start": 0,
            "base": self._phase_mixture(0),  # phase mixture after control / spike down-weighting
            "policy": None,  # underlearned weights (None: the base)
            "reference": {},  # underlearned: per-source reference validation loss of this phase
            "last_val": {},  # per-source validation loss at the last evaluation
            "seen": {s: 0 for s in self.sources},  # training tokens drawn per source
            "data_shift": 0,  # data step = training step + shift (grows when a window is skipped)
            "lr_scale": 1.0,
        }
        self._apply()

    # --------------------------------------------------------------------------- phases and weights

    def _phase_mixture(self, index: int) -> dict[str, float]:
        mix = self.phases[index].mixture or self.default_mixture
        return _normalise({s: float(mix.get(s, 0.0)) for s in self.sources})

    @property
    def phase(self) -> PhaseConfig:
        return self.phases[self.state["phase"]]

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.sampler.weights)

    def capped(self) -> list[str]:
        caps = {s: c.max_epochs for s, c in self.cfg.sources.items() if c.max_epochs is not None}
        return [s for s, cap in caps.items() if s in self.capacity and self.state["seen"][s] >= cap * self.capacity[s]]

    def _apply(self) -> None:
        weights = dict(self.state["policy"] or self.state["base"])
        for s in self.capped():
            weights[s] = 0.0
        self.sampler.set_weights(_normalise(weights))

    def begin_step(self, step: int) -> list[dict]:
        """Called at each step boundary; returns events (a phase that ends on its budget)."""
        events = []
        while self.state["phase"] < len(self.phases) - 1 and step - self.state["phase_start"] >= self.phase.steps:
            events.append(self.next_phase(step, "budget"))
        return events

    def next_phase(self, step: int, reason: str) -> dict:
        old = self.phase.name
        # Left-over steps of a phase ended early go to the next one, so the run's total is unchanged.
        left = self.phase.steps - (step - self.state["phase_start"])
        self.state["phase"] += 1
        self.state["phase_start"] = step
        if left > 0:
            self.phases[self.state["phase"]] = self.phase.model_copy(update={"steps": self.phase.steps + left})
        self.state["base"] = self._phase_mixture(self.state["phase"])
        self.state["policy"] = None
        self.state["reference"] = dict(self.state["last_val"])
        self._apply()
        return {"event": "phase", "from": old, "to": self.phase.name, "reason": reason, "weights": self.weights}

    def lr(self, step: int) -> float:
        phase = self.phase
        if phase.lr is None and phase.schedule is None:
            return lr_at(step, self.cfg) * self.state["lr_scale"]
        local = self.cfg.model_copy(
            update={
                "steps": phase.steps,
                "lr": phase.lr or self.cfg.lr,
                "schedule": phase.schedule or self.cfg.schedule,
                "warmup_steps": self.cfg.warmup_steps if phase.warmup_steps is None else phase.warmup_steps,
                "min_lr_ratio": self.cfg.min_lr_ratio if phase.min_lr_ratio is None else phase.min_lr_ratio,
                "phases": [],
            }
        )
        return lr_at(step - self.state["phase_start"], local) * self.state["lr_scale"]

    # --------------------------------------------------------------------------------- batches

    def batch_size(self) -> int:
        return self.phase.batch_size or self.cfg.batch_size

    def seq_len(self) -> int:
        return self.phase.seq_len or self.cfg.seq_len

    def batch(self, step: int, rank: int, world: int):
        """This rank's rows of training step `step`; counts every source's tokens (host-side numpy)."""
        data_step = step + self.state["data_shift"]
        size, seq_len = self.batch_size(), self.seq_len()
        domain_idx, _ = self.sampler.global_batch(data_step, size, seq_len)
        counts = np.bincount(domain_idx, minlength=len(self.sources))
        before = set(self.capped())
        for s, n in zip(self.sources, counts):
            self.state["seen"][s] += int(n) * seq_len
        x, y, tags = self.sampler.batch(data_step, size, rank, world, seq_len)
        if set(self.capped()) != before:
            self._apply()  # takes effect from the next step
        return x, y, tags

    def skip_window(self, rewound_to: int, spike_step: int, extra: int) -> tuple[int, int]:
        """After a rewind to checkpoint step `rewound_to`: never train on the data of steps
        rewound_to..spike_step (+ `extra` more). Returns the skipped data-step range [lo, hi)."""
        lo = rewound_to + self.state["data_shift"]
        self.state["data_shift"] += spike_step - rewound_to + 1 + extra
        return lo, rewound_to + self.state["data_shift"]

    # ------------------------------------------------------------------------------ policy hooks

    def set_base(self, changes: dict[str, float]) -> None:
        base = dict(self.state["base"])
        base.update(changes)
        self.state["base"] = _normalise(base)
        self.state["policy"] = None
        self._apply()

    def after_eval(self, val: dict[str, float]) -> dict | None:
        """Per-source validation losses {source: loss}; returns an event when the weights moved."""
        self.state["last_val"] = dict(val)
        policy = self.cfg.policy
        if policy.kind != "underlearned":
            return None
        ref = policy.reference or self.state["reference"]
        if not ref:
            self.state["reference"] = dict(val)
            return None
        base = self.state["base"]
        active = [s for s in self.sources if base[s] > 0 and s in val and s in ref]
        if not active:
            return None
        gap = {s: math.log(val[s]) - math.log(ref[s]) for s in active}
        mean_gap = sum(gap.values()) / len(gap)
        new = dict(base)
        for s in active:
            target = base[s] * math.exp(policy.eta * (gap[s] - mean_gap))
            new[s] = min(max(target, policy.min_ratio * base[s]), policy.max_ratio * base[s])
        self.state["policy"] = _normalise(new)
        self._apply()
        return {"event": "reweight", "policy": "underlearned", "gap": gap, "weights": self.weights}

    # --------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {**self.state, "phases": [p.model_dump() for p in self.phases]}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.phases = [PhaseConfig(**p) for p in state.pop("phases")]
        self.state = state
        self._apply()
