"""Gradient accumulation is a memory setting: the accumulated gradient is the full batch's."""

import copy

import pytest
import torch

from openmill.config import ModelConfig, PretrainConfig
from openmill.model import build_model
from openmill.train.engine import Trainer
from openmill.train.parallel import World


def gradient_of_one_step(model, micro_batches, tmp_path, token_mean_loss=True):
    cfg = PretrainConfig(steps=1, batch_size=8, grad_accum=len(micro_batches), grad_clip=0.0, warmup_steps=0,
                         tensorboard=False)
    trainer = Trainer(model, model, cfg, World(), tmp_path, lambda step: micro_batches, lambda m: {},
                      token_mean_loss=token_mean_loss)
    grads = {}
    trainer.optimizer.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    loss = trainer.train_step().loss
    return grads, float(loss)


def relative_difference(a, b) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@pytest.mark.parametrize("kept", ["all", "unequal", "one micro-batch empty"])
def test_accumulated_gradient_equals_the_full_batch_one(tmp_path, kept):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32).resolved()
    model = build_model(cfg)
    x = torch.randint(0, 64, (8, 17))
    inputs, targets, tags = x[:, :-1], x[:, 1:].clone(), torch.zeros(8, dtype=torch.long)
    if kept == "unequal":  # as in SFT: few answer tokens in one micro-batch, many in the other
        targets[:4, :14] = -100
        targets[4:, :2] = -100
    elif kept == "one micro-batch empty":
        targets[:4] = -100
    full, full_loss = gradient_of_one_step(copy.deepcopy(model), [(inputs, targets, tags)], tmp_path / "a")
    halves = [(inputs[:4], targets[:4], tags[:4]), (inputs[4:], targets[4:], tags[4:])]
    accumulated, loss = gradient_of_one_step(copy.deepcopy(model), halves, tmp_path / "b")
    assert relative_difference(accumulated, full) < 1e-5
    assert loss == pytest.approx(full_loss, rel=1e-5)
