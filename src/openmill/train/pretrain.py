"""The pretrain stage: token shards + tokenizer -> a trained model folder.

    pretrain/
        checkpoints/step_XXXXXX/   resumable state (see train/checkpoint.py)
        final/                     model.safetensors + model.json + tokenizer.json: a self-contained model
        metrics.jsonl  tb/         training and validation metrics, HeuriMentor's events
        report.md  *.png           the monitor's end-of-run report (docs/heurimentor.md)
        control.yaml               live control of a running job (openmill control)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file

from openmill.config import ModelConfig, Recipe
from openmill.data.dmu import DataManagementUnit
from openmill.data.shards import TokenShards
from openmill.export.folder import TokenizerInfo, write_model_folder
from openmill.model import Transformer, build_model
from openmill.rundir import fingerprint, sha256_file
from openmill.tokenizer import Tokenizer
from openmill.train.checkpoint import barrier, is_main_process, list_checkpoints
from openmill.train.engine import Trainer
from openmill.train.heurimentor import HeuriMentor
from openmill.train.metrics import MetricsLog, read_metrics
from openmill.train.monitor import TrainingMonitor
from openmill.train.parallel import check_batch_split, init_world, parallelize, unwrap
from openmill.train.report import write_report
from openmill.train.schedule import wsd_decay_start


def load_model_folder(folder: Path, device="cpu") -> tuple[Transformer, ModelConfig]:
    """A model folder written by this stage (or by import/export later): weights + model.json."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (model.json missing)")
    cfg = ModelConfig(**json.loads(meta_path.read_text())["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    model.reset_rope()
    return model, cfg


def save_trained_model(folder: Path, model: Transformer, tokenizer_path: Path, source: dict) -> None:
    """A live model as an openmill model folder, through the one writer the importers use too."""
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    text = Path(tokenizer_path).read_text(encoding="utf-8")
    write_model_folder(folder, model.cfg, state, text, TokenizerInfo(), source)


def window_starts(n_targets: int, length: int, n_rows: int) -> list[int]:
    """Starts of `n_rows` windows of `length` targets spread evenly over `n_targets`, first to last.

    Evenly spread rather than the split's first tokens: a split's head is whichever documents came
    first, not a sample of it (zh's first 8,192 tokens were 45% Wikipedia, its whole split 20%).
    Windows never overlap, since n_rows * length <= n_targets.
    """
    if n_rows <= 1:
        return [0]
    span = n_targets - length
    return [i * span // (n_rows - 1) for i in range(n_rows)]


class Validation:
    """Loss and bits-per-byte per domain on fixed windows spread over each valid split.

    bpb = (sum of next-token losses in nats over targets that are text) / ln 2 / (UTF-8 bytes of
    those targets). Special tokens (EOS between documents) carry no bytes and are left out of both
    sums, so bpb compares across tokenizers.
    """

    def __init__(self, shards: dict[str, TokenShards], token_bytes: np.ndarray, seq_len: int, max_tokens: int, device):
        self.device = device
        self.token_bytes = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
        self.rows = {}
        for name, s in shards.items():
            length = min(seq_len, s.n_tokens - 1)
            starts = window_starts(s.n_tokens - 1, length, max(1, min(max_tokens, s.n_tokens - 1) // length))
            rows = np.stack([s.read(start, length + 1) for start in starts])
            self.rows[name] = torch.from_numpy(rows.astype(np.int64))

    def __call__(self, model, batch_size: int = 8) -> dict[str, float]:
        out = {}
        for name, rows in self.rows.items():
            nats, nbytes, ntok, loss_sum = 0.0, 0, 0, 0.0
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size].to(self.device)
                logits = model(chunk[:, :-1]).float()
                targets = chunk[:, 1:]
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                tb = self.token_bytes[targets.flatten()]
                nats += float((loss * (tb > 0)).sum())
                nbytes += int(tb.sum())
                loss_sum += float(loss.sum())
                ntok += targets.numel()
            out[f"val/{name}/loss"] = loss_sum / ntok
            out[f"val/{name}/bpb"] = nats / math.log(2) / max(1, nbytes)
        return out


def run_pretrain(recipe: Recipe, out_dir: Path, tokenizer_path: Path, tokens_dir: Path, log=print) -> tuple[list[Path], dict]:
    cfg = recipe.pretrain
    world = init_world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed % 2**32)

    tokenizer = Tokenizer.load(tokenizer_path)

    weights = recipe.domain_weights(cfg.mixture)
    # A domain is trained if any mixture that can be in force weighs it: the default or a phase's.
    mixtures = [weights] + [recipe.domain_weights(p.mixture) for p in cfg.phases if p.mixture]
    domains = [d for d in recipe.data.domains if any(m[d] > 0 for m in mixtures)]
    train = {d: TokenShards(Path(tokens_dir) / d / "train") for d in domains}
    valid = {d: TokenShards(Path(tokens_dir) / d / "valid") for d in recipe.data.domains}
    dmu = DataManagementUnit(cfg, weights, train, recipe.seed)

    if cfg.init_from is not None:  # continued pretraining: the shape comes with the weights
        raw, model_cfg = load_model_folder(cfg.init_from, device=world.device)
        log(f"initialised from {cfg.init_from}")
    else:
        model_cfg = recipe.model.resolved(vocab_size=tokenizer.vocab_size)
        raw = build_model(model_cfg, device=world.device)
    # Checked here, on the shape actually trained (the preflight cannot see init_from's or the tokenizer's).
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) < tokenizer vocabulary ({tokenizer.vocab_size})")
    for field, seq_len in cfg.window_lengths():
        if seq_len > model_cfg.max_seq_len:
            raise ValueError(f"{field} ({seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")
    n_params = sum(p.numel() for p in raw.parameters())
    model = parallelize(raw, world, cfg.parallel, cfg.compile)

    for phase in dmu.phases:  # preflight says so first, for a whole recipe
        check_batch_split(f"pretrain batch size (phase {phase.name})", phase.batch_size or cfg.batch_size, world.size, cfg.grad_accum)

    def batch_fn(step: int):
        # The phase of `step` decides batch size and window length (data/dmu.py).
        x, y, tags = dmu.batch(step, world.rank, world.size)
        micro = len(x) // cfg.grad_accum
        return [(x[i : i + micro], y[i : i + micro], tags[i : i + micro]) for i in range(0, len(x), micro)]

    validation = Validation(valid, tokenizer.token_bytes(), cfg.seq_len, cfg.eval_tokens, world.device)
    out_dir = Path(out_dir)
    monitor = TrainingMonitor(cfg.monitor, dmu.sources, world.device)
    hooks = HeuriMentor(cfg, dmu, monitor, world, out_dir.parent, log=log)
    trainer = Trainer(
        model,
        raw,
        cfg,
        world,
        out_dir,
        batch_fn,
        eval_fn=validation,
        stateful={"dmu": dmu, "monitor": monitor, "heurimentor": hooks},
        meta={"model": model_cfg.model_dump(mode="json"), "recipe": recipe.name, "steps": cfg.steps},
        log=log,
        hooks=hooks,
        token_mean_loss=False,  # every row keeps all its targets: equal shares are the token mean
        equal_batches=True,  # every process draws B x T windows
    )
    resume_key = training_fingerprint(recipe)
    _drop_foreign_checkpoints(out_dir / "checkpoints", resume_key, log)
    trainer.meta["resume_key"] = resume_key
    resumed = trainer.resume(at_most=_wsd_extension_limit(out_dir / "checkpoints", cfg, log))
    metrics = MetricsLog(out_dir, world.is_main, cfg.tensorboard, trainer.state.step if resumed else None)
    log(
        f"pretrain: {n_params / 1e6:.2f}M parameters, {world.size} process(es) on {world.device}, "
        f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens"
    )
    with metrics, Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        disable=not world.is_main,
    ) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=trainer.state.step, status="")

        def progress(step, loss, tps):
            bar.update(task, completed=step, status=f"loss {loss:.3f}  {tps:,.0f} tok/s")

        with hooks.sigterm_checkpoints():
            trainer.fit(metrics, progress)
    if world.is_main and cfg.monitor.report:
        write_report(out_dir, dmu.sources)

    final = out_dir / "final"
    plain = unwrap_full(model, raw)  # collective under FSDP: every rank takes part
    if world.is_main:
        save_trained_model(final, plain, tokenizer_path, {"recipe": recipe.name, "step": cfg.steps})
    summary = summarize(read_metrics(out_dir / "metrics.jsonl"), list(recipe.data.domains)) if world.is_main else {}
    summary.update(parameters=n_params, processes=world.size, device=str(world.device))
    return [final, out_dir / "metrics.jsonl"], summary


# Settings that change how a run is watched, saved or spread over processes, not what it trains: changing
# one keeps the checkpoints (they hold whole weights: DDP, FSDP2 and any process count resume them).
BOOKKEEPING = {"threads", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "parallel"}


def training_fingerprint(recipe: Recipe) -> str:
    """What a checkpoint must share with the recipe to be resumed from.

    `steps` counts where it shapes every learning rate (cosine) or the phases' boundaries: a wsd or
    constant run without phases can be extended from its checkpoints (a wsd one from those taken
    before its decay: `_wsd_extension_limit`). init_from's contents count too: new weights at the
    same path (a re-run upscale) are another run.
    """
    cfg = recipe.pretrain
    extendable = cfg.schedule != "cosine" and not cfg.phases
    pretrain = cfg.model_dump(mode="json", exclude=BOOKKEEPING | ({"steps"} if extendable else set()))
    pretrain["monitor"].pop("report", None)
    trained = {**recipe.model_dump(mode="json", include={"seed", "data", "model"}), "pretrain": pretrain}
    return fingerprint(trained, [cfg.init_from] if cfg.init_from else [])


def _drop_foreign_checkpoints(root: Path, resume_key: str, log) -> None:
    """Checkpoints of a run with another recipe are not resumed from: they are removed, with a note.

    Judged on the newest checkpoint whose meta.json is intact (`_newest_meta`).
    """
    newest = _newest_meta(root)
    if newest is not None and newest[1].get("resume_key") != resume_key and is_main_process():
        log(f"{root.parent.name}: the recipe changed since {newest[0].name}; starting over (old checkpoints removed)")
        shutil.rmtree(root)
    barrier()


def _wsd_extension_limit(root: Path, cfg, log) -> int | None:
    """The newest step a wsd run whose `steps` changed may resume from: a checkpoint taken before
    both schedules' decay started, the only ones trained with the learning rates the new schedule
    gives. Later checkpoints belong to the old schedule's decay and are removed (else pruning would
    keep them over the new run's). None: no limit."""
    if cfg.schedule != "wsd":
        return None
    newest = _newest_meta(root)
    old = newest[1].get("steps", cfg.steps) if newest is not None else cfg.steps
    if old == cfg.steps:
        return None
    limit = min(wsd_decay_start(old, cfg), wsd_decay_start(cfg.steps, cfg))
    later = [folder for step, folder in list_checkpoints(root) if step > limit]
    barrier()  # every process has read the checkpoints before any is removed
    if later and is_main_process():
        log(f"{root.parent.name}: steps changed from {old} to {cfg.steps} under wsd; resuming from a checkpoint at "
            f"step <= {limit}, before the decay ({len(later)} later checkpoint(s) removed)")
        for folder in later:
            shutil.rmtree(folder)
    barrier()
    return limit


def _newest_meta(root: Path) -> tuple[Path, dict] | None:
    """(folder, meta.json) of the newest checkpoint whose meta.json is intact; a torn one says
    nothing about the run (the resume reports it and falls back to an older one)."""
    for _, folder in reversed(list_checkpoints(root)):
        meta = _verified_meta(folder)
        if meta is not None:
            return folder, meta
    return None


def _verified_meta(folder: Path) -> dict | None:
    """A checkpoint's meta.json if it is the one its checksums.json records (only that file is hashed)."""
    try:
        recorded = json.loads((folder / "checksums.json").read_text()).get("meta.json")
        if recorded != sha256_file(folder / "meta.json"):
            return None
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def unwrap_full(model, raw: Transformer, prepare=None) -> Transformer | None:
    """The plain model with full weights (FSDP2 shards in place: gather into a fresh copy).

    Collective under FSDP2; the gathered copy exists on rank 0 only (None elsewhere), on the CPU (a
    model that needed sharding may not fit one device whole). `prepare(copy)` gives the fresh copy
    what the trained one had added before loading (LoRA adapters)."""
    if not any(type(p).__name__ == "DTensor" for p in raw.parameters()):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return None
    plain = build_model(raw.cfg, device="cpu")
    if prepare is not None:
        prepare(plain)
    plain.load_state_dict(full)
    return plain


def summarize(records: list[dict], domains: list[str]) -> dict:
    """Validation bpb per domain at step 0 and at the end, and their ratio (from metrics.jsonl)."""
    evals = [r for r in records if any(k.startswith("val/") for k in r)]
    train = [r for r in records if "loss" in r]
    out = {"val_bpb": {}, "final_train_loss": train[-1]["loss"] if train else None}
    if train:
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
        out["tokens"] = train[-1]["tokens"]
    if evals:
        first, last = evals[0], evals[-1]
        for d in domains:
            start, end = first.get(f"val/{d}/bpb"), last.get(f"val/{d}/bpb")
            out["val_bpb"][d] = {"step0": start, "final": end, "ratio": end / start if start and end else None}
    return out
