"""LoRA: starts as the base model, trains only the adapters, merges back to the same function."""

import torch

from openmill.align.config import LoraConfig
from openmill.align.lora import apply_lora, merge_lora
from openmill.config import ModelConfig
from openmill.model import build_model


def test_lora_trains_adapters_only_and_merges_exactly():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32).resolved(vocab_size=97))
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        base = model(x).clone()
    trainable = apply_lora(model, LoraConfig(rank=4))
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)  # B = 0: the base model at step 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        adapted = model(x).clone()
    assert not torch.allclose(adapted, base)
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
