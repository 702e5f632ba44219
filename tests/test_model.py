"""The decoder against its references: transformers' logits, cached vs uncached decoding, init on meta.

Tiny fp32 configs on CPU. Weights are randomised with O(1) activations (not the 0.02 init, whose
small logits would hide errors) and norm weights away from 1, so a swapped or missing piece shows.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from openmill.config import ModelConfig
from openmill.model import KVCache, Transformer, build_model, count_parameters, rope_tables


def tiny(**fields) -> ModelConfig:
    """A small GQA config (4 query heads share 2 key/value heads); `fields` override."""
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return ModelConfig(**{**base, **fields}).resolved()


@torch.no_grad()
def randomised(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with weights N(0, 1/fan_in) (embeddings N(0, 1)) and norm weights 1 + N(0, 0.2)."""
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * noise)
        elif name == "embed_tokens.weight":
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def hf_config(cfg: ModelConfig, arch: str = "llama"):
    """The transformers config of the same shape: LlamaConfig, or MistralConfig with our sliding window."""
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if arch == "mistral":
        return MistralConfig(**fields, sliding_window=cfg.sliding_window)
    assert cfg.sliding_window is None, "LlamaForCausalLM has no sliding window"
    return LlamaConfig(**fields)


def to_hf_names(state_dict: dict) -> dict:
    """Our parameter names -> transformers' Llama/Mistral names: "x" -> "model.x"; "lm_head.weight" stays."""
    return {k if k == "lm_head.weight" else f"model.{k}": v for k, v in state_dict.items()}


def hf_twin(model: Transformer, arch: str, attn: str, **overrides):
    """transformers' model of the same shape holding our weights (strict load: every name must map)."""
    config = hf_config(model.cfg, arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    hf = (MistralForCausalLM if arch == "mistral" else LlamaForCausalLM)(config).eval()
    hf.load_state_dict(to_hf_names(model.state_dict()), strict=True)
    return hf


# ------------------------------------------------------------------------------ HF logits parity


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_logits_match_transformers(tie, attn):
    model = randomised(tiny(tie_embeddings=tie))
    hf = hf_twin(model, "llama", attn)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0  # logits of O(1): a 1e-4 agreement means something
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_sliding_window_logits_match_transformers(attn):
    window, T = 8, 24  # every position past 8 sees only its last 8 tokens
    model = randomised(tiny(sliding_window=window))
    hf = hf_twin(model, "mistral", attn)
    full = hf_twin(model, "mistral", attn, sliding_window=None)
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs, unwindowed = model(idx), hf(input_ids=idx).logits, full(input_ids=idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # The window is really applied on both sides: without it the later positions change a lot ...
    assert (ours[:, window:] - unwindowed[:, window:]).abs().max() > 0.1
    # ... and positions inside the first window cannot tell the difference.
    assert (ours[:, :window] - unwindowed[:, :window]).abs().max() <= 1e-4


# ------------------------------------------------------------------------ cache vs recomputation


def greedy_recompute(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def greedy_cached(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with a KVCache: prefill the prompt once, then one token per forward."""
    B, T = prompt.shape
    cache = KVCache(model.cfg, B, T + n)
    logits = model(prompt, pos=torch.arange(T), cache=cache)
    seq = prompt
    for p in range(T, T + n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if p + 1 < T + n:
            logits = model(nxt, pos=torch.tensor([p]), cache=cache)
    return seq


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@torch.no_grad()
def test_cached_greedy_equals_recomputed_greedy_exactly(window):
    model = randomised(tiny(sliding_window=window), seed=3)
    prompt = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    n = 20  # generates far past the window of 4
    cached = greedy_cached(model, prompt, n)
    assert torch.equal(cached, greedy_recompute(model, prompt, n))  # token for token, atol = 0
    assert len(set(cached[0, 3:].tolist())) > 1  # not a degenerate repeat of one token
    if window is not None:  # the window changed what was generated, so the cached path really applied it
        assert not torch.equal(cached, greedy_cached(randomised(tiny(), seed=3), prompt, n))


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@torch.no_grad()
def test_chunked_prefill_equals_one_call(window):
    model = randomised(tiny(sliding_window=window), seed=5)
    idx = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(6))
    one = model(idx, pos=torch.arange(21), cache=KVCache(model.cfg, 2, 32))
    cache, parts, start = KVCache(model.cfg, 2, 32), [], 0
    for size in (5, 1, 7, 8):
        parts.append(model(idx[:, start : start + size], pos=torch.arange(start, start + size), cache=cache))
        start += size
    chunked = torch.cat(parts, dim=1)
    # Same masks and math; only the SDPA reduction shapes differ. Stated tolerance: 1e-5 in fp32.
    assert (chunked - one).abs().max() <= 1e-5
    assert (one - model(idx)).abs().max() <= 1e-5  # and both equal the cache-free forward


# ----------------------------------------------------------------------------- init and shapes


def test_meta_build_then_init_gives_documented_std():
    cfg = tiny(dim=128, ffn_dim=256, n_layers=4, vocab_size=512, init_std=0.02)
    model = build_model(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # o_proj and down_proj (init_weights docstring)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            expected = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
            assert p.mean().abs() < 0.1 * expected, name
            assert p.std().item() == pytest.approx(expected, rel=0.06), name
    # to_empty leaves the RoPE buffers as garbage; init_weights must recompute them.
    cos, sin = rope_tables(cfg, cfg.max_seq_len)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)


def test_tied_embeddings_stay_tied_after_build():
    cfg = tiny(tie_embeddings=True)
    model = build_model(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    untied = count_parameters(tiny(tie_embeddings=False))
    assert untied - count_parameters(cfg) == cfg.vocab_size * cfg.dim
    # A step on the shared matrix moves both ends (one tensor, one gradient).
    loss = model(torch.randint(0, 97, (1, 8)), targets=torch.randint(0, 97, (1, 8)))
    loss.backward()
    with torch.no_grad():
        model.embed_tokens.weight -= model.embed_tokens.weight.grad
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)


@torch.no_grad()
def test_kv_heads_equal_to_heads_is_plain_mha():
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    mha = randomised(tiny(n_kv_heads=None))
    same = build_model(tiny(n_kv_heads=4)).eval()
    same.load_state_dict(mha.state_dict())
    assert torch.equal(same(idx), mha(idx))


@torch.no_grad()
def test_gqa_equals_mha_with_each_kv_head_copied_to_its_query_group():
    """Query head h reads key/value head h // (H/K): repeat_interleave, as transformers' repeat_kv does."""
    gqa = randomised(tiny(n_heads=4, n_kv_heads=2))
    mha = build_model(tiny(n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    D, rep = gqa.cfg.head_dim, 2
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # (K*D, C) -> (H*D, C)
            state[key] = state[key].view(2, D, -1).repeat_interleave(rep, dim=0).reshape(4 * D, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    assert (gqa(idx) - mha(idx)).abs().max() <= 1e-5


def test_forward_past_max_seq_len_fails_clearly():
    model = build_model(tiny(max_seq_len=16))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match=r"position 16 exceeds max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"KV cache of 17 positions exceeds max_seq_len 16"):
        KVCache(model.cfg, 1, 17)  # decoding is bounded where the cache is made, not per token
