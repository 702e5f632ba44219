"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state)."""

import math

from openmill.config import PretrainConfig


def wsd_decay_start(steps: int, cfg: PretrainConfig) -> int:
    """The first step a wsd run of `steps` steps decays its learning rate."""
    return int(steps * (1 - cfg.decay_fraction))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to min_lr, warmup-stable-decay, or constant.

    Steps are 0-based, so the last trained step is steps - 1: that is where cosine and wsd reach
    min_lr. wsd (warmup-stable-decay, as in MiniCPM / OLMo 2): hold the peak, then decay linearly
    to min_lr over the last `decay_fraction` of the steps, which lets a run be extended from any
    checkpoint taken before the decay.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_start = wsd_decay_start(cfg.steps, cfg)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
    return peak + (floor - peak) * progress
