"""The dpo stage: preference pairs -> a model that prefers the chosen answers.

    dpo/final/         the aligned model folder
    dpo/metrics.jsonl  training loss; held-out val/loss, val/accuracy, val/margin, val/logp_accuracy per evaluation

The reference model is the starting model. Its log-probabilities of every train and held-out
answer are computed once, before training, and kept as two floats per pair: no second model in
memory during training (benchmarks/align.md measures what that saves).

Losses, with d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) summed
over answer tokens, and d_norm the same with each log-ratio divided by its answer's token count:
- sigmoid:  -log sigmoid(beta d)                     (DPO; TRL loss_type="sigmoid")
- dpo_norm: -log sigmoid(beta d_norm)                (length-normalised DPO, Moxin/Tulu 3's dpo_norm, beta=5 there; TRL "sigmoid_norm")
- ipo:      (d_norm - 1 / (2 beta))^2                 (IPO; TRL "ipo", which also averages per token)
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from openmill.align import train as common
from openmill.align.config import DpoConfig
from openmill.align.data import Pair, load_pairs
from openmill.align.sft import Example, collate
from openmill.align.templates import encode_conversation
from openmill.textmodel import TextTokenizer
from openmill.train.engine import autocast_context
from openmill.train.parallel import World, all_reduce_sum, check_batch_split, init_world, unwrap


def tokenize_pairs(pairs: list[Pair], tok: TextTokenizer, cfg: DpoConfig, where: str,
                   limit: int | None = None) -> tuple[list[tuple[Example, Example]], Counter]:
    """Pairs whose both sides fit seq_len, in order, until `limit` of them (too-long ones are not counted)."""
    out, dropped = [], Counter()
    for n, pair in enumerate(pairs):
        if limit is not None and len(out) == limit:
            break
        prompt = common.with_system(pair.prompt, cfg.system_prompt)
        sides = []
        for answer in (pair.chosen, pair.rejected):
            # Only the answer compared is scored: an assistant turn of a multi-turn prompt would
            # add the same log-ratio to both sides and skew the length-normalised losses.
            messages = prompt + [{"role": "assistant", "content": answer}]
            ids, mask = encode_conversation(tok, messages, last_answer_only=True)
            sides.append(Example(ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])]))
        longest = max(len(s.inputs) for s in sides)
        if longest > cfg.seq_len:
            if cfg.too_long == "fail":
                raise ValueError(f"{where}: pair {n} has {longest + 1} tokens, more than seq_len {cfg.seq_len} + 1")
            dropped["too_long"] += 1
            continue
        out.append((sides[0], sides[1]))
    return out, dropped


def pair_batch(pairs: list[tuple[Example, Example]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (2 n, T): the n chosen answers, then the n rejected ones."""
    x, y, _ = collate([[c] for c, _ in pairs] + [[r] for _, r in pairs], pad_id)
    return x, y


def sequence_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the target tokens, their count), each (B,). Only the answer tokens go
    through the output head, in chunks (model.forward's target_logps): no (B, T, vocab) logits."""
    picked = model(inputs, targets=targets, target_logps=True)
    return picked.sum(dim=1), (targets != -100).sum(dim=1)


def answer_lengths(pairs: list[tuple[Example, Example]]) -> torch.Tensor:
    """(n, 2) answer token counts of (chosen, rejected)."""
    return torch.tensor([[sum(t != -100 for t in side.targets) for side in pair] for pair in pairs])


def length_batches(pairs: list[tuple[Example, Example]], batch_pairs: int) -> list[list[int]]:
    """Pair indices in batches of similar length (longest first): a batch is padded to its longest
    sequence, so grouping by length wastes less compute on padding than the file's order."""
    order = sorted(range(len(pairs)), key=lambda i: -max(len(side.inputs) for side in pairs[i]))
    return [order[i : i + batch_pairs] for i in range(0, len(order), batch_pairs)]


def pair_logps(model, pairs: list[tuple[Example, Example]], pad_id: int, batch_pairs: int, world: World = World()) -> torch.Tensor:
    """(n, 2) summed log-probs of (chosen, rejected) under the model, in the pairs' order. Under
    torchrun each process scores a share of the batches (common.eval_share) and every process gets
    the whole table (all-reduced: the others' rows are 0 on each)."""
    net = unwrap(model)  # a no-grad forward needs nothing of DDP's wrapper
    device = net.embed_tokens.weight.device
    batches = length_batches(pairs, batch_pairs)
    out = torch.zeros(len(pairs), 2, device=device)
    for j, counted in common.eval_share(len(batches), world):
        idx = batches[j]
        x, y = pair_batch([pairs[i] for i in idx], pad_id)
        lp, _ = sequence_logps(net, x.to(device), y.to(device))
        if counted:
            out[idx] = torch.stack([lp[: len(idx)], lp[len(idx) :]], dim=1).float()
    return all_reduce_sum(out).cpu()


def dpo_terms(cfg: DpoConfig, logps, lengths, ref) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from (2 n,) log-probs and token counts and
    the (n, 2) reference log-probs. Rewards are beta x the log-ratio the loss compares."""
    n = ref.shape[0]
    ratios = logps - torch.cat([ref[:, 0], ref[:, 1]])
    if cfg.loss in ("dpo_norm", "ipo"):
        ratios = ratios / lengths.clamp(min=1)
    chosen, rejected = ratios[:n], ratios[n:]
    delta = chosen - rejected
    if cfg.loss == "ipo":
        loss = (delta - 1 / (2 * cfg.beta)) ** 2
    else:
        loss = -F.logsigmoid(cfg.beta * delta)
    return loss, cfg.beta * chosen.detach(), cfg.beta * rejected.detach()


@torch.no_grad()
def reference_logps(model, pairs, pad_id: int, batch_pairs: int = 4, dtype: str = "fp32", world: World = World()) -> torch.Tensor:
    """(n, 2) log-probs of (chosen, rejected) under the model as it is now: the DPO reference.

    `dtype` is the stage's: the forward runs in the autocast context the engine runs the policy
    in, so the log-ratio is exactly 0 at step 0 (an fp32 reference of a bf16 policy is not).
    Under torchrun the processes share the work and each gets every pair's (pair_logps)."""
    was_training = model.training
    model.eval()
    with autocast_context(dtype, model.embed_tokens.weight.device):
        out = pair_logps(model, pairs, pad_id, batch_pairs, world)
    model.train(was_training)
    return out


def make_loss(cfg: DpoConfig):
    def loss_fn(model, inputs, targets, ref):
        logps, lengths = sequence_logps(model, inputs, targets)
        return dpo_terms(cfg, logps, lengths, ref)[0].mean()

    return loss_fn


def preference_metrics(cfg: DpoConfig, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Held-out metrics from (n, 2) policy log-probs, answer lengths and reference log-probs of
    (chosen, rejected): loss, accuracy (chosen reward > rejected), mean reward margin, and
    logp_accuracy: the share of pairs whose chosen answer the model itself finds likelier per
    token than the rejected one. Rewards are relative to the reference, so at step 0 every margin
    is 0 and accuracy 0; logp_accuracy says how the starting model already ranks the pairs."""
    loss, chosen, rejected = dpo_terms(cfg, torch.cat([logps[:, 0], logps[:, 1]]), torch.cat([lengths[:, 0], lengths[:, 1]]), ref)
    margin = chosen - rejected
    per_token = logps / lengths.clamp(min=1)
    return {"val/loss": float(loss.mean()), "val/accuracy": float((margin > 0).float().mean()),
            "val/margin": float(margin.mean()), "val/logp_accuracy": float((per_token[:, 0] > per_token[:, 1]).float().mean())}


def preference_eval(cfg: DpoConfig, pairs, ref: torch.Tensor, pad_id: int, batch_pairs: int = 4, world: World = World()):
    """Evaluator on held-out pairs (preference_metrics); every process gets the same numbers."""
    lengths = answer_lengths(pairs)

    def evaluate(model) -> dict[str, float]:
        return preference_metrics(cfg, pair_logps(model, pairs, pad_id, batch_pairs, world), lengths, ref)

    return evaluate


def run_dpo(cfg: DpoConfig, init_from: Path, out_dir: Path, seed: int, log=print) -> tuple[list[Path], dict]:
    out_dir = Path(out_dir)
    if not cfg.train:
        raise ValueError("dpo.train: no data files given")
    world = init_world()
    check_batch_split("dpo.batch_size", cfg.batch_size, world.size, cfg.grad_accum)  # batch_size is global, as pretrain's
    log = log if world.is_main else (lambda *a, **k: None)
    torch.manual_seed(seed)
    model, tok, facts = common.load_start(init_from, cfg, log)
    train = load_pairs(cfg.train, cfg.format, cfg.bad_records)
    valid = load_pairs(cfg.valid, cfg.format, cfg.bad_records) if cfg.valid else None
    train_items, valid_items = common.split(train.items, cfg, valid.items if valid else None, seed)
    train_pairs, train_drop = tokenize_pairs(train_items, tok, cfg, "dpo.train", cfg.max_examples)
    valid_pairs, valid_drop = tokenize_pairs(valid_items, tok, cfg, "dpo.valid")
    if not train_pairs:
        raise ValueError(f"dpo: every training pair is longer than seq_len {cfg.seq_len}")
    common.require_heldout(len(valid_pairs), "dpo", "pairs", cfg.seq_len)
    pad_id = tok.pad_id
    data = {
        "train_pairs": len(train_pairs),
        "valid_pairs": len(valid_pairs),
        "skipped_records": dict(train.skipped + (valid.skipped if valid else Counter())),
        "dropped_too_long": dict(train_drop + valid_drop),
    }
    log(f"dpo ({cfg.loss}, beta {cfg.beta}): {len(train_pairs)} pairs, {len(valid_pairs)} held out; "
        f"skipped {data['skipped_records'] or 'none'}, too long {data['dropped_too_long'] or 'none'}")
    # Reference log-probs before the first update (and before LoRA changes anything: B starts at 0),
    # of the plain model before the engine wraps it: every process keeps the whole table, and the
    # reference never takes part in a backward.
    started = time.perf_counter()
    ref_train = reference_logps(model, train_pairs, pad_id, dtype=cfg.dtype, world=world)
    # in the evaluator's batches and autocast: its step 0, exactly
    ref_valid = reference_logps(model, valid_pairs, pad_id, dtype=cfg.dtype, world=world)
    log(f"reference log-probs of {len(train_pairs) + len(valid_pairs)} pairs: {time.perf_counter() - started:.0f} s")
    micro = cfg.batch_size // world.size // cfg.grad_accum

    def batch_fn(step: int):
        # A per-pair loss: every process has as many pairs, so the processes' mean is the batch's.
        picked = common.step_share(step, cfg, len(train_pairs), seed, world)
        out = []
        for i in range(0, len(picked), micro):
            idx = picked[i : i + micro]
            x, y = pair_batch([train_pairs[j] for j in idx], pad_id)
            out.append((x, y, ref_train[idx]))
        return out

    # At step 0 the policy is its reference: the reference pass already gave the held-out
    # evaluation (the same forward), so it is not run a second time.
    step0 = preference_metrics(cfg, ref_valid, answer_lengths(valid_pairs), ref_valid)
    result, trained = common.fit(model, cfg, out_dir, batch_fn, preference_eval(cfg, valid_pairs, ref_valid, pad_id, world=world),
                                 make_loss(cfg), {"stage": "dpo", "resume_key": common.resume_key(cfg, init_from)}, log,
                                 first_eval=step0, token_mean_loss=False)  # a loss per pair: micro-batches of as many pairs weigh alike
    replies = []
    if world.is_main:
        trained.eval()
        replies = common.chat(trained, tok, cfg.chat_prompts, cfg.system_prompt, cfg.chat_max_new_tokens)
        common.save_final(out_dir / "final", trained, tok, init_from, {"stage": "dpo", "init_from": str(init_from), "steps": cfg.steps})
    first, last = result["first_eval"] or {}, result["last_eval"]
    metrics = {
        **facts,
        **data,
        "processes": world.size,
        "val_accuracy": {"step0": first.get("val/accuracy"), "final": last["val/accuracy"]},
        "val_margin": {"step0": first.get("val/margin"), "final": last["val/margin"]},
        "val_logp_accuracy": {"step0": first.get("val/logp_accuracy"), "final": last["val/logp_accuracy"]},
        "chat": replies,
    }
    return [out_dir / "final", out_dir / "metrics.jsonl"], metrics
