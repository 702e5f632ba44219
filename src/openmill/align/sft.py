"""The sft stage: conversations -> a model fine-tuned on its assistant answers only.

    sft/final/         the fine-tuned model folder (its chat template = the one trained on)
    sft/metrics.jsonl  training loss, held-out loss (val/loss) per evaluation
    sft/checkpoints/   resumable state

Each conversation is rendered through the chat template; targets are the assistant tokens
(templates.encode_conversation), -100 elsewhere. With packing, conversations share rows of
seq_len tokens under a document mask (model.forward's doc_ids), else one per row, right-padded.
A conversation longer than seq_len is dropped and counted (too_long="drop") or stops the stage:
never cut, so no answer is ever trained on half.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from openmill.align import train as common
from openmill.align.config import SftConfig
from openmill.align.data import load_conversations
from openmill.align.templates import encode_conversation
from openmill.fused_loss import IGNORE_INDEX
from openmill.textmodel import TextTokenizer
from openmill.train.parallel import World, all_reduce_sum, check_batch_split, init_world, unwrap

PAD_DOC = -1  # document id of padding: padding attends only to padding, and has no targets


@dataclass
class Example:
    inputs: list[int]
    targets: list[int]  # -100 where no loss


def tokenize(conversations: list[list[dict]], tok: TextTokenizer, cfg: SftConfig, where: str,
             limit: int | None = None) -> tuple[list[Example], Counter]:
    """Examples that fit seq_len, in order, until `limit` of them (too-long ones are not counted)."""
    out, dropped = [], Counter()
    for n, messages in enumerate(conversations):
        if limit is not None and len(out) == limit:
            break
        ids, mask = encode_conversation(tok, common.with_system(messages, cfg.system_prompt))
        if len(ids) - 1 > cfg.seq_len:
            if cfg.too_long == "fail":
                raise ValueError(f"{where}: conversation {n} has {len(ids)} tokens, more than seq_len {cfg.seq_len} + 1")
            dropped["too_long"] += 1
            continue
        out.append(Example(ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])]))
    return out, dropped


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Rows of whole examples, filled in order: a new row when the next one does not fit."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and used + len(ex.inputs) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.inputs)
    if row:
        rows.append(row)
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, doc_ids), each (len(rows), longest row), right-padded."""
    width = max(sum(len(ex.inputs) for ex in row) for row in rows)
    inputs = torch.full((len(rows), width), pad_id)
    targets = torch.full((len(rows), width), -100)
    docs = torch.full((len(rows), width), PAD_DOC)
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            n = len(ex.inputs)
            inputs[r, at : at + n] = torch.tensor(ex.inputs)
            targets[r, at : at + n] = torch.tensor(ex.targets)
            docs[r, at : at + n] = d
            at += n
    return inputs, targets, docs


def sft_loss(model, inputs, targets, doc_ids):
    """Mean loss over the assistant tokens of the micro-batch (the document mask keeps packed
    conversations apart; on one-per-row batches it equals plain causal attention)."""
    return model(inputs, targets=targets, doc_ids=doc_ids)


def heldout_loss(rows: list[list[Example]], pad_id: int, batch_rows: int = 8, world: World = World()):
    """Evaluator: token-weighted mean loss over every held-out assistant token. Under torchrun each
    process evaluates a share of the batches (common.eval_share) and the sums are all-reduced, so
    every process gets the number one process would."""
    starts = range(0, len(rows), batch_rows)

    def evaluate(model) -> dict[str, float]:
        net = unwrap(model)  # a no-grad forward needs nothing of DDP's wrapper
        sums = torch.zeros(2, dtype=torch.float64, device=net.embed_tokens.weight.device)  # (loss x tokens, tokens)
        for j, counted in common.eval_share(len(starts), world):
            x, y, d = (t.to(sums.device) for t in collate(rows[starts[j] : starts[j] + batch_rows], pad_id))
            n = (y != IGNORE_INDEX).sum().double()
            loss = net(x, targets=y, doc_ids=d)
            if counted:
                sums += torch.stack([loss.double() * n, n])
        total, count = all_reduce_sum(sums).tolist()
        return {"val/loss": total / max(1, count)}

    return evaluate


def run_sft(cfg: SftConfig, init_from: Path, out_dir: Path, seed: int, log=print) -> tuple[list[Path], dict]:
    out_dir = Path(out_dir)
    if not cfg.train:
        raise ValueError("sft.train: no data files given")
    world = init_world()
    check_batch_split("sft.batch_size", cfg.batch_size, world.size, cfg.grad_accum)  # batch_size is global, as pretrain's
    log = log if world.is_main else (lambda *a, **k: None)
    torch.manual_seed(seed)
    model, tok, facts = common.load_start(init_from, cfg, log)
    train = load_conversations(cfg.train, cfg.format, cfg.bad_records)
    valid = load_conversations(cfg.valid, cfg.format, cfg.bad_records) if cfg.valid else None
    train_items, valid_items = common.split(train.items, cfg, valid.items if valid else None, seed)
    train_ex, train_drop = tokenize(train_items, tok, cfg, "sft.train", cfg.max_examples)
    valid_ex, valid_drop = tokenize(valid_items, tok, cfg, "sft.valid")
    if not train_ex:
        raise ValueError(f"sft: every training conversation is longer than seq_len {cfg.seq_len}")
    common.require_heldout(len(valid_ex), "sft", "conversations", cfg.seq_len)
    train_rows = pack(train_ex, cfg.seq_len) if cfg.packing else [[ex] for ex in train_ex]
    valid_rows = pack(valid_ex, cfg.seq_len) if cfg.packing else [[ex] for ex in valid_ex]
    pad_id = tok.pad_id
    micro = cfg.batch_size // world.size // cfg.grad_accum

    def batch_fn(step: int):
        picked = [train_rows[i] for i in common.step_share(step, cfg, len(train_rows), seed, world)]
        return [collate(picked[i : i + micro], pad_id) for i in range(0, len(picked), micro)]

    data = {
        "train_conversations": len(train_ex),
        "valid_conversations": len(valid_ex),
        "train_rows": len(train_rows),
        "skipped_records": dict(train.skipped + (valid.skipped if valid else Counter())),
        "dropped_too_long": dict(train_drop + valid_drop),
        "train_answer_tokens": sum(sum(t != -100 for t in ex.targets) for ex in train_ex),
    }
    log(f"sft: {data['train_conversations']} conversations in {len(train_rows)} rows, {len(valid_ex)} held out; "
        f"skipped {data['skipped_records'] or 'none'}, too long {data['dropped_too_long'] or 'none'}")
    result, trained = common.fit(model, cfg, out_dir, batch_fn, heldout_loss(valid_rows, pad_id, world=world), sft_loss,
                                 {"stage": "sft", "resume_key": common.resume_key(cfg, init_from)}, log)
    replies = []
    if world.is_main:
        trained.eval()
        replies = common.chat(trained, tok, cfg.chat_prompts, cfg.system_prompt, cfg.chat_max_new_tokens)
        common.save_final(out_dir / "final", trained, tok, init_from, {"stage": "sft", "init_from": str(init_from), "steps": cfg.steps})
    metrics = {
        **facts,
        **data,
        "processes": world.size,
        "val_loss": {"step0": (result["first_eval"] or {}).get("val/loss"), "final": result["last_eval"]["val/loss"]},
        "chat": replies,
    }
    return [out_dir / "final", out_dir / "metrics.jsonl"], metrics
