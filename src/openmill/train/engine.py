"""The training engine: one loop for pretraining (and, later, SFT and DPO through `loss_fn`).

A step: for each micro-batch, forward + loss / grad_accum + backward (gradient sync only on the
last one), clip, AdamW step with the schedule's learning rate. Host-device syncs happen only at
log, eval and checkpoint steps. Everything resumable goes through train/checkpoint.py, and the
batch of a step is a pure function of the step (data/mixture.py), so a resumed run reproduces the
uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from openmill.config import PretrainConfig
from openmill.fused_loss import IGNORE_INDEX
from openmill.train import checkpoint as ckpt
from openmill.train.metrics import MetricsLog, read_metrics
from openmill.train.parallel import World, all_reduce_mean, all_reduce_sum
from openmill.train.schedule import lr_at

# A batch source gives this rank's micro-batches of a step: list of (inputs, targets, extra). The
# extra tensor is what the loss function needs besides tokens: pretraining's domain tags (unused by
# the loss), SFT's document ids of packed rows, DPO's precomputed reference log-probabilities.
BatchFn = Callable[[int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# An evaluator returns flat scalar metrics, e.g. {"val/en/bpb": 1.9}; collective under torchrun.
EvalFn = Callable[[nn.Module], dict[str, float]]


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    # The loss is computed inside the model's forward (fused with the output projection), so
    # FSDP2 has the output weights gathered while it runs.
    return model(inputs, targets=targets)


def make_optimizer(model: nn.Module, cfg: PretrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW (train/muon.py); weight decay on matrices only (norm gains are not decayed)."""
    if cfg.optimizer == "muon":
        from openmill.train.muon import Muon

        return Muon(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def cpu_matmul_peak_flops(n: int = 1024, repeats: int = 8) -> float:
    """Measured fp32 matmul FLOP/s on this CPU: the denominator of a CPU 'MFU'."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
        return float("nan")
    return cpu_matmul_peak_flops()


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 12 L T C (attention scores), N without the embedding lookup."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed_tokens"))
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.dim
    return 6 * n + 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def autocast_context(dtype: str, device: torch.device):
    """The context every training and evaluation forward runs in. Forwards made outside the loop
    that the loop's must equal (DPO's reference log-probs) use it too.

    auto = bf16 autocast on CUDA, fp32 on CPU; bf16 asks for autocast on either device, fp32 for
    none. CPU bf16 pays only where the CPU has bf16 instructions: on the 2-core EPYC with avx512_bf16
    the demo pretrains 1.15x faster with the same bits per byte (benchmarks/README.md); without
    them it is not measured, so auto stays with fp32 on every CPU."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


class TrainingHooks:
    """What the loop lets an observer/controller do (train/heurimentor.py is the full one); the
    defaults change nothing. Every hook runs at a step boundary or on device without a host sync,
    except where its docstring says otherwise."""

    def lr(self, step: int, cfg: PretrainConfig) -> float:
        return lr_at(step, cfg)

    def capture(self, tags: torch.Tensor):
        """Context around one micro-batch's forward + backward (per-source loss capture)."""
        return contextlib.nullcontext()

    def allow_update(self, step: int, loss: torch.Tensor) -> bool:
        """After the backward of step `step` (`loss`: this process's): False drops the optimizer
        step. Under torchrun every process must answer the same (a collective decision), or the
        replicas drift apart."""
        return True

    def at_boundary(self, trainer: "Trainer") -> None:
        """Before each step (phase changes, live control, SIGTERM)."""

    def at_log(self, trainer: "Trainer", step: int) -> dict:
        """At log and checkpoint steps (host syncs are allowed): extra metrics; may rewind the trainer."""
        return {}

    def after_eval(self, trainer: "Trainer", step: int, results: dict[str, float]) -> None:
        pass

    def before_save(self, trainer: "Trainer", step: int) -> None:
        """At checkpoint steps, before the checkpoint is written (weight statistics)."""


class StepResult(NamedTuple):
    loss: torch.Tensor  # this process's mean loss (device scalar: no host sync)
    grad_norm: torch.Tensor
    tokens: int  # over all processes
    lr: float
    applied: bool  # False: a hook dropped the optimizer update (skip_update)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the mixture sampler's state


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        raw_model: nn.Module,
        cfg: PretrainConfig,
        world: World,
        out_dir: Path,
        batch_fn: BatchFn,
        eval_fn: EvalFn,
        loss_fn: LossFn = next_token_loss,
        stateful: dict | None = None,
        meta: dict | None = None,
        log=print,
        hooks: TrainingHooks | None = None,
        token_mean_loss: bool = True,
        equal_batches: bool = False,
    ):
        """token_mean_loss: `loss_fn` is a mean over the targets it keeps and rows keep different
        numbers of them (SFT's answers): micro-batches, and under torchrun processes, weigh by their
        kept targets, so the step's loss is the mean over the global batch's. False: they weigh
        alike; right for DPO's per-pair loss, and for pretraining, whose rows keep every target, so
        equal shares are already the token mean (without a count and an all-reduce per step).

        equal_batches: every process's batches have the same shape (pretraining's windows), so the
        step's tokens are this process's times the processes; else (SFT/DPO rows padded to their
        own longest) they are summed over the processes, a host sync per step."""
        self.model, self.raw, self.cfg, self.world = model, raw_model, cfg, world
        self.token_mean_loss, self.equal_batches = token_mean_loss, equal_batches
        self.out_dir = Path(out_dir)
        self.batch_fn, self.eval_fn, self.loss_fn = batch_fn, eval_fn, loss_fn
        self.stateful = stateful or {}  # name -> object with state_dict / load_state_dict
        self.meta = meta or {}
        self.hooks = hooks or TrainingHooks()
        self.log = log if world.is_main else (lambda *a, **k: None)
        fused = world.device.type == "cuda" or world.size == 1
        self.optimizer = make_optimizer(model, cfg, fused=fused)
        self.state = TrainState()
        self.autocast = autocast_context(cfg.dtype, world.device)

    # ------------------------------------------------------------------------------ resumption

    def resume(self, at_most: int | None = None) -> bool:
        """Load the newest good checkpoint (of a step <= at_most, when given: a rewind)."""
        found = ckpt.latest_good(self.out_dir / "checkpoints", log=self.log, at_most=at_most)
        if found is None:
            return False
        trainer = ckpt.load_checkpoint(found.folder, self.model, self.optimizer)
        self.state = TrainState(step=trainer["step"], tokens=trainer["tokens"], extra=trainer.get("extra", {}))
        for name, obj in self.stateful.items():
            if name in self.state.extra:
                obj.load_state_dict(self.state.extra[name])
        self.log(f"resuming from {found.folder} (step {self.state.step})")
        return True

    def save(self) -> None:
        """Collective. A checkpoint is a restart point a rewind trusts: weights that are not finite
        are refused (FloatingPointError) rather than saved as good."""
        if not self._weights_finite():
            raise FloatingPointError(f"weights are not finite at step {self.state.step}; no checkpoint written")
        extra = {name: obj.state_dict() for name, obj in self.stateful.items()}
        ckpt.save_checkpoint(
            self.out_dir / "checkpoints",
            self.state.step,
            self.model,
            self.optimizer,
            {"step": self.state.step, "tokens": self.state.tokens, "extra": extra},
            {**self.meta, "tokens": self.state.tokens},
            keep=self.cfg.keep_checkpoints,
        )

    def _weights_finite(self) -> bool:
        """Collective under torchrun (FSDP2 shards: each process checks its own)."""
        bad = torch.zeros((), device=self.world.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).any()
        if dist.is_initialized():
            dist.all_reduce(bad)
        return not bool(bad)

    # ------------------------------------------------------------------------------- the loop

    def _sync_context(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch."""
        if last or self.world.size == 1:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def train_step(self) -> StepResult:
        """One optimizer step (or a dropped one, when a hook says so); no host sync of its own."""
        cfg, step = self.cfg, self.state.step
        lr = self.hooks.lr(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self.batch_fn(step)
        shares = self._micro_shares(micro)
        total = torch.zeros((), device=self.world.device)
        tokens = 0
        for i, (inputs, targets, extra) in enumerate(micro):
            last = i == len(micro) - 1
            if last and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(True)
            inputs, targets, extra = (t.to(self.world.device) for t in (inputs, targets, extra))
            # For pretraining `extra` is each row's source index (the monitor's per-source loss).
            with self._sync_context(last), self.autocast, self.hooks.capture(extra):
                loss = self.loss_fn(self.model, inputs, targets, extra)
                loss = loss / len(micro) if shares is None else loss * shares[i]
                loss.backward()
            total += loss.detach()
            tokens += targets.numel()
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            norm = torch.zeros(())
        applied = self.hooks.allow_update(step, total)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.size > 1:
            tokens = tokens * self.world.size if self.equal_batches else int(all_reduce_sum(torch.tensor(tokens, device=self.world.device)))
        return StepResult(total, norm, tokens, lr, applied)

    def _micro_shares(self, micro) -> list[float] | torch.Tensor | None:
        """Each micro-batch's share of the step's loss, or None for equal shares. Weighing a
        token-mean loss by kept targets makes the step's loss the mean over all kept targets whatever
        `grad_accum` and the number of processes are; the plain average of micro-batch means would
        weigh a micro-batch of few answer tokens (SFT) as much as a full one."""
        if not self.token_mean_loss:
            return None
        kept = [int((targets != IGNORE_INDEX).sum()) for _, targets, _ in micro]  # host tensors: no device sync
        if self.world.size > 1:
            # DDP and FSDP2 average gradients over processes, hence the factor world size: one
            # all-reduce per step, left on the device (no host sync).
            local = torch.tensor(kept, dtype=torch.float32, device=self.world.device)
            return local * self.world.size / all_reduce_sum(local.sum()).clamp(min=1)
        if len(micro) == 1 or len(set(kept)) == 1 or sum(kept) == 0:
            return None
        return [k / sum(kept) for k in kept]

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            results = self.eval_fn(self.model)
        self.model.train()
        return results

    def fit(self, metrics: MetricsLog, progress=None, first_eval: dict[str, float] | None = None) -> dict:
        """Train from self.state.step to cfg.steps; returns the first and last evaluation.

        `first_eval`: the step-0 evaluation when the caller already has it (DPO's reference pass
        is that forward), logged instead of evaluating again. A resumed run returns the step-0
        evaluation its metrics.jsonl holds, and one resumed at its last step (it died after the
        final checkpoint) evaluates that step again, so both are there for the caller's summary."""
        cfg = self.cfg
        self.metrics = metrics  # hooks log their events here
        fpt = flops_per_token(self.raw, cfg.seq_len)
        peak = peak_flops(self.world.device)
        if self.state.step == 0:
            first_eval = first_eval if first_eval is not None else self.evaluate()
            metrics.log(0, **first_eval)
            last_eval = first_eval
        else:
            first_eval, last_eval = self._logged_step0_eval(), None
        # The logged loss is the mean over the window's applied steps: a dropped update's loss
        # (a spike, maybe inf) is no part of the trained curve and must not end the run it spared.
        running, window_tokens, t0 = torch.zeros((), device=self.world.device), 0, time.perf_counter()
        window_steps = 0
        self.model.train()
        while self.state.step < cfg.steps:
            self.hooks.at_boundary(self)
            result = self.train_step()
            self.state.step += 1
            self.state.tokens += result.tokens
            window_tokens += result.tokens
            if result.applied:  # the same on every process (TrainingHooks.allow_update)
                running += result.loss
                window_steps += 1
                norm = result.grad_norm
            step = self.state.step
            if step % cfg.log_every == 0 or step == cfg.steps or step % cfg.checkpoint_every == 0:
                # the one host sync per log; a window whose every update was dropped logs no loss
                mean_loss = all_reduce_mean(running / window_steps).item() if window_steps else None
                tps = window_tokens / (time.perf_counter() - t0)
                running.zero_()
                window_tokens, window_steps = 0, 0
                extra = self.hooks.at_log(self, step)  # may rewind to an earlier checkpoint
                if self.state.step != step:
                    t0 = time.perf_counter()
                    continue
                trained = {}
                if mean_loss is not None:
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"loss is {mean_loss} at step {step}")
                    trained = {"loss": mean_loss, "grad_norm": float(norm)}
                metrics.log(
                    step,
                    **trained,
                    lr=result.lr,
                    tokens=self.state.tokens,
                    tokens_per_s=tps,
                    mfu=tps * fpt / (peak * self.world.size),
                    **extra,
                )
                if progress is not None and mean_loss is not None:
                    progress(step, mean_loss, tps)
                t0 = time.perf_counter()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = self.evaluate()
                metrics.log(step, **last_eval)
                self.hooks.after_eval(self, step, last_eval)
                t0 = time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.hooks.before_save(self, step)
                self.save()
                t0 = time.perf_counter()
        if last_eval is None:  # resumed at the last step: nothing was left to train
            last_eval = self.evaluate()
        return {"first_eval": first_eval, "last_eval": last_eval}

    def _logged_step0_eval(self) -> dict[str, float] | None:
        """The step-0 evaluation as metrics.jsonl recorded it (its first record: fit logs it first)."""
        path = self.out_dir / "metrics.jsonl"
        records = read_metrics(path) if path.is_file() else []
        if not records or records[0].get("step") != 0:
            return None
        return {k: v for k, v in records[0].items() if k != "step"}
