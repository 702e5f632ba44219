"""What the sft and dpo stages share: the starting model, held-out split, the engine run, the
saved folder (with the chat template trained on), and the closing chat.

Under torchrun both stages are data-parallel as pretraining is (train/parallel.py: DDP or FSDP2 by
`parallel`): each process trains on a disjoint share of every global batch, evaluates a share of
the held-out batches (sums all-reduced), and process 0 alone writes metrics, checkpoints, the
final folder and the chat replies.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from openmill.align.config import AlignStage
from openmill.align.lora import apply_lora, merge_lora
from openmill.align.templates import with_template
from openmill.export.folder import write_model_folder
from openmill.generate import generate
from openmill.textmodel import TextTokenizer, load_text_model
from openmill.train.engine import BatchFn, EvalFn, LossFn, Trainer
from openmill.train.metrics import MetricsLog
from openmill.train.parallel import World, init_world, parallelize
from openmill.train.pretrain import BOOKKEEPING, _drop_foreign_checkpoints, unwrap_full


def load_start(folder: Path, cfg: AlignStage, log=print) -> tuple[nn.Module, TextTokenizer, dict]:
    """(model in train mode, tokenizer rendering the stage's template, facts for the manifest)."""
    if not (Path(folder) / "model.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (model.json missing); set init_from or run the stage before")
    model, tok = load_text_model(folder, device=init_world().device)  # where the trainer puts the batches
    tok = with_template(tok, cfg.template)
    if tok.info.chat_template is None:
        raise ValueError(f"{folder}: the model has no chat template; set template to one of chatml, solar, llama2")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len ({cfg.seq_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})")
    facts = {"init_from": str(folder), "parameters": sum(p.numel() for p in model.parameters())}
    if cfg.lora is not None:
        facts["trainable_parameters"] = apply_lora(model, cfg.lora)
        log(f"LoRA rank {cfg.lora.rank}: {facts['trainable_parameters']:,} trainable of {facts['parameters']:,}")
    return model.train(), tok, facts


def split(items: list, cfg: AlignStage, valid_items: list | None, seed: int) -> tuple[list, list]:
    """(train, held-out): the valid files when given, else a seeded valid_fraction of train. The
    train list is shuffled; max_examples is applied by the tokenizers, to usable examples."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if valid_items is None:
        n_valid = max(1, round(cfg.valid_fraction * len(order))) if cfg.valid_fraction > 0 else 0
        valid_items, order = order[:n_valid], order[n_valid:]
    if not order:
        raise ValueError("no training examples left (check train files and valid_fraction)")
    return order, valid_items


def require_heldout(n_valid: int, stage: str, what: str, seq_len: int) -> None:
    """A held-out set that tokenization emptied (every example longer than seq_len) is an error, not a
    silent evaluation over nothing."""
    if n_valid == 0:
        raise ValueError(f"{stage}: no held-out {what} left: every one is longer than {stage}.seq_len {seq_len} "
                         f"(raise {stage}.seq_len, {stage}.valid_fraction or give {stage}.valid files)")


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def epoch_order(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of the examples of `step`: a fresh seeded permutation each epoch, so a step's batch
    is a pure function of the step (exact resume, as the pretraining sampler)."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(g, n)
        out.append(int(_epoch_permutation(n, seed, epoch)[i]))
    return out


@lru_cache(maxsize=2)  # a step's examples mostly share an epoch: its permutation is drawn once, not per example
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_share(step: int, cfg: AlignStage, n: int, seed: int, world: World) -> list[int]:
    """This process's indices of `step`'s global batch (epoch_order): a contiguous, disjoint share,
    split as the pretraining sampler splits its rows (data/mixture.py)."""
    order = epoch_order(step, cfg.batch_size, n, seed)
    share = cfg.batch_size // world.size
    return order[world.rank * share : (world.rank + 1) * share]


def eval_share(n_batches: int, world: World) -> list[tuple[int, bool]]:
    """(batch index, counted) of this process's held-out batches: round-robin, so every batch is the
    one a single process evaluates (same rows, same padding) and sums all-reduce to its result.
    Every process runs as many forwards (an FSDP2 forward gathers weights from every process): one
    with no batch left in the last round repeats batch 0, not counted."""
    rounds = -(-n_batches // world.size)
    return [(j, True) if j < n_batches else (0, False) for j in range(world.rank, rounds * world.size, world.size)]


def fit(model, cfg: AlignStage, out_dir: Path, batch_fn: BatchFn, eval_fn: EvalFn, loss_fn: LossFn, meta: dict, log=print,
        first_eval: dict | None = None, token_mean_loss: bool = True) -> tuple[dict, nn.Module | None]:
    """Train the plain `model` through the engine, wrapped by DDP or sharded by FSDP2 under torchrun.

    Returns (the first and last evaluation, the trained model with whole weights: on process 0;
    None on the others). `batch_fn` gives this process's share of each step (step_share)."""
    world = init_world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine_cfg = cfg.engine_config()
    wrapped = parallelize(model, world, cfg.parallel, compile_model=False)
    trainer = Trainer(wrapped, model, engine_cfg, world, out_dir, batch_fn, eval_fn, loss_fn=loss_fn, meta=meta,
                      log=log, token_mean_loss=token_mean_loss)
    # Checkpoints of another config or starting model are not resumed from (removed, with a note).
    _drop_foreign_checkpoints(Path(out_dir) / "checkpoints", meta["resume_key"], log)
    resumed = trainer.resume()

    def progress(step, loss, tps):
        log(f"  step {step}/{cfg.steps}  loss {loss:.4f}  {tps:,.0f} tok/s")

    with MetricsLog(out_dir, world.is_main, cfg.tensorboard, trainer.state.step if resumed else None) as metrics:
        result = trainer.fit(metrics, progress, first_eval)
    return result, whole_model(wrapped, model, cfg, world)


def whole_model(wrapped, raw, cfg: AlignStage, world: World) -> nn.Module | None:
    """The trained model with whole weights on process 0 (None on the others): the module itself,
    unless FSDP2 sharded it in place; then gathered (collective) into a fresh copy, LoRA included."""
    prepare = (lambda copy: apply_lora(copy, cfg.lora)) if cfg.lora is not None else None
    trained = unwrap_full(wrapped, raw, prepare)
    return trained if world.is_main else None


def save_final(folder: Path, model, tok: TextTokenizer, init_from: Path, source: dict) -> None:
    """The trained model as a folder; its tokenizer info carries the template trained on, so HF and
    GGUF exports write that template (tokenizer_config.json, tokenizer.chat_template)."""
    merge_lora(model)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    text = (Path(init_from) / "tokenizer.json").read_text(encoding="utf-8")
    write_model_folder(folder, model.cfg, state, text, tok.info, source)


def chat(model, tok: TextTokenizer, prompts: list[str], system_prompt: str | None, max_new_tokens: int) -> list[dict]:
    """Greedy replies to one-turn conversations, through the template."""
    replies = []
    for prompt in prompts:
        messages = with_system([{"role": "user", "content": prompt}], system_prompt)
        ids = generate(model, tok.encode_chat(messages, add_generation_prompt=True), max_new_tokens, temperature=0, stop_ids=tok.stop_ids)
        replies.append({"user": prompt, "assistant": tok.decode([t for t in ids if t not in tok.stop_ids]).strip()})
    return replies


# Settings that change how a run is watched, saved, spread or shown, not what it trains: changing
# one keeps the checkpoints (pretraining's list, plus the closing chat's).
ALIGN_BOOKKEEPING = BOOKKEEPING | {"chat_prompts", "chat_max_new_tokens"}


def resume_key(cfg: AlignStage, init_from: Path) -> str:
    from openmill.rundir import fingerprint

    return fingerprint(cfg.model_dump(mode="json", exclude=ALIGN_BOOKKEEPING), [Path(init_from) / "model.safetensors"])
