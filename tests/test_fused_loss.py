"""The fused, chunked output-projection loss equals the plain logits + cross_entropy path."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from openmill.config import ModelConfig
from openmill.fused_loss import linear_cross_entropy, linear_target_logps
from openmill.model import build_model


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True, max_seq_len=32)
    return build_model(cfg.resolved())


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_plain_cross_entropy_with_ignored_targets(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[[3, 17, 40]] = -100
    fused = linear_cross_entropy(h, w, t, chunk=chunk)
    (gh, gw) = torch.autograd.grad(fused * 3.0, (h, w))
    plain = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    (ph, pw) = torch.autograd.grad(plain * 3.0, (h, w))
    assert torch.allclose(fused, plain, atol=1e-12)
    assert torch.allclose(gh, ph, atol=1e-12) and torch.allclose(gw, pw, atol=1e-12)


def test_model_loss_equals_logits_loss_and_tied_grads_flow():
    model = tiny_model()
    x = torch.randint(0, 500, (3, 17))
    fused = model(x[:, :-1], targets=x[:, 1:])
    fused.backward()
    g_fused = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    plain = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-5)
    assert torch.allclose(g_fused, model.embed_tokens.weight.grad, atol=1e-6)


class CountProducts(TorchFunctionMode):
    """Counts matrix products: the loss costs one per chunk, each gradient one more."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in ("matmul", "__matmul__", "addmm_")
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_under_no_grad_or_for_a_frozen_weight():
    h = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)  # like validation on a trainable model
    w = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    with torch.no_grad(), CountProducts() as products:
        loss = linear_cross_entropy(h, w, t, chunk=4)
    assert loss.grad_fn is None and torch.isfinite(loss)
    assert products.count == 2  # the logits of two chunks, no gradient products
    frozen = w.detach()  # a frozen head (LoRA): only the hidden states need a gradient
    with CountProducts() as products:
        (gh,) = torch.autograd.grad(linear_cross_entropy(h, frozen, t, chunk=4), h)
    assert products.count == 4
    (ph,) = torch.autograd.grad(F.cross_entropy(h @ frozen.t(), t), h)
    assert torch.allclose(gh, ph, atol=1e-12)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_target_logps_match_full_log_softmax_with_ignored_targets(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (3, 20))
    t[0, :5], t[2, 12:] = -100, -100
    upstream = torch.randn(3, 20, dtype=torch.float64)  # each token its own gradient, as DPO's pairs give
    fused = linear_target_logps(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad((fused * upstream).sum(), (h, w))
    full = torch.gather(F.log_softmax(h @ w.t(), dim=-1), 2, t.clamp(min=0)[..., None]).squeeze(-1) * (t != -100)
    ph, pw = torch.autograd.grad((full * upstream).sum(), (h, w))
    assert torch.allclose(fused, full, atol=1e-12)
    assert torch.allclose(gh, ph, atol=1e-12) and torch.allclose(gw, pw, atol=1e-12)


def test_model_target_logps_equal_logits_log_softmax_fp32():
    model = tiny_model()
    x = torch.randint(0, 500, (3, 17))
    t = x[:, 1:].clone()
    t[:, :6] = -100  # the prompt: no log-probs, no gradient
    fused = model(x[:, :-1], targets=t, target_logps=True)
    fused.sum().backward()
    g_fused = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    full = torch.gather(F.log_softmax(model(x[:, :-1]), dim=-1), 2, t.clamp(min=0)[..., None]).squeeze(-1) * (t != -100)
    full.sum().backward()
    assert torch.allclose(fused, full, atol=1e-5) and (fused[:, :6] == 0).all()
    assert torch.allclose(g_fused, model.embed_tokens.weight.grad, atol=1e-5)
