"""The one decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, optional sliding window.

No I/O and no distributed code here (parallelism is applied from outside, see train/parallel.py).
Parameter names follow Hugging Face's Llama layout without the "model." prefix, so export and
import are a rename. RoPE uses the same rotate-half convention as `transformers`.

Shapes: B batch, T tokens, H query heads, K key/value heads, D head_dim, C model dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from openmill.config import ModelConfig
from openmill.fused_loss import linear_cross_entropy, linear_target_logps
from openmill.packed import PackedWeight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' weight * x * rsqrt(mean(x^2) + eps), statistics in fp32 (for bf16 inputs
        # too), as one fused kernel: 7 ops -> 1, which a decode step runs twice per layer.
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


# Inputs of at most this many rows (decoding: one token per sequence) go through oneDNN when no
# gradient is needed; see `linear`. Longer ones (prefill, training) were not measured to gain.
ONEDNN_MAX_ROWS = 16


@functools.cache
def _onednn_linear_works() -> bool:
    """The oneDNN op is private to PyTorch (inductor's): use it only where this build has it and it
    gives F.linear's numbers, checked once per process; anywhere else `linear` is plain F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return torch.allclose(got, F.linear(x, w), atol=1e-5, rtol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for fp32 CPU inference on a few rows, which runs oneDNN's matmul instead of
    MKL's: decoding multiplies one vector per sequence by every weight, and there MKL reads the large
    matrices (the output head, gate/up) at about half the memory bandwidth that oneDNN reaches on
    this 2-core AMD CPU (benchmarks/inference.md). Same products to ~1e-6 (a different summation
    order). Training, autograd, longer inputs and torch.compile (whose inductor lowers this op only
    for frozen weights) keep F.linear. A weight packed by `Transformer.pack_weights` (a
    `PackedWeight`, oneDNN's own layout, no bias) always goes to oneDNN, at any number of rows,
    compiled or not."""
    if isinstance(weight, PackedWeight):
        return weight(x)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training: one check, then F.linear
        return F.linear(x, weight, bias)
    few_rows = x.numel() // x.size(-1) <= ONEDNN_MAX_ROWS
    if not few_rows or x.device.type != "cpu" or x.dtype != torch.float32 or not _onednn_linear_works():
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fuse_rows(*linears: nn.Linear) -> torch.Tensor:
    """One matrix stacking the linears' weights (out features concatenated); each weight becomes a
    view of its block, so no memory is added and the parameters keep their names and objects."""
    fused = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        lin.weight.data = fused[start : start + lin.out_features]
        start += lin.out_features
    return fused


def rope_tables(cfg: ModelConfig, n_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_positions, D), in fp32, rotate-half layout (frequencies repeated twice).
    The first half of sin is negated, so `apply_rope` needs no negation (see there)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    t = torch.arange(n_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.cat((-torch.ones(d // 2, device=device), torch.ones(d // 2, device=device)))
    return emb.cos(), emb.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos/sin (from rope_tables): (T, D) or (B, 1, T, D).

    transformers' x * cos + cat(-x2, x1) * sin with the sign folded into the table: the same
    numbers (a negation does not round) in 5 ops instead of 9, run for q and k of every layer at
    every decoded token. A bf16 x is promoted to fp32 by the fp32 tables, as transformers does."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend: causal, and within `window` tokens if set."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of packed sequences -> (B, T) positions restarting at 0 in each document."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def attention_mask_rows(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (B, Tq, Tk) mask from per-row positions; keys at negative positions (empty slots,
    padding) are never attended to."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (diff >= 0) & (k_pos[:, None, :] >= 0)
    if window is not None:
        allowed &= diff < window
    return allowed


class KVCache(nn.Module):
    """Preallocated keys and values, one (B, K, 1 + slots, D) tensor per layer in `k` and `v`.

    A full cache has one slot per position (slot = 1 + position). With sliding-window attention and
    a window shorter than `max_len` it is a rolling buffer of `window` slots (slot = 1 + position
    mod window), so memory stays O(window) however long the generation runs. `slot_pos` (B, 1 +
    slots) records which absolute position each slot holds (-1: empty), so every row of a batch
    can be at its own position (prompts of different lengths, requests joining a running batch).
    Slot 0 is a sink: tokens at a negative position (padding, idle rows) are written there and
    never attended to.

    Passed explicitly into `Transformer.forward`; the generation engine owns its lifetime.

    One tensor per layer (plain lists, not buffers: allocate the cache on its device), written by a
    compiled step with `index_put_`: the form inductor (torch 2.13) keeps in place. A `scatter_`, or
    a write into a per-layer view of one shared tensor, compiled into a fresh copy of the layer's
    cache and a copy back every step (benchmarks/inference.md).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        super().__init__()
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache of {max_len} positions exceeds max_seq_len {cfg.max_seq_len}")
        window = cfg.sliding_window
        self.rolling = window is not None and window < max_len
        self.n_slots = window if self.rolling else max_len
        self.max_len = max_len
        shape = (batch_size, cfg.n_kv_heads, 1 + self.n_slots, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.register_buffer("slot_pos", torch.full((batch_size, 1 + self.n_slots), -1, device=device), persistent=False)
        self._index, self._rows, self._slots, self._concat = None, None, None, False

    def view(self, rows: slice = slice(None), below: int | None = None) -> KVCache:
        """A view sharing this cache's storage: only `rows`, and only the slots of positions
        < `below` (a full cache's attention then costs O(below), not O(max_len))."""
        width = 1 + (self.n_slots if below is None or self.rolling else min(below, self.n_slots))
        out = KVCache.__new__(KVCache)
        nn.Module.__init__(out)
        out.rolling, out.n_slots, out.max_len = self.rolling, self.n_slots, self.max_len
        out.k, out.v = [k[rows, :, :width] for k in self.k], [v[rows, :, :width] for v in self.v]
        out.slot_pos = self.slot_pos[rows, :width]
        out._index, out._rows, out._slots, out._concat = None, None, None, False
        return out

    def reset(self, rows: slice | int = slice(None)) -> None:
        """Forget what `rows` hold (the keys stay in memory but are never attended to again)."""
        self.slot_pos[rows] = -1

    def prepare(self, pos: torch.Tensor) -> torch.Tensor:
        """Called once per forward with the new tokens' positions (B, T); returns the positions of
        the keys attention will see (B, S), in the order `update` returns them."""
        T = pos.size(1)
        slots = torch.where(pos >= 0, 1 + pos % self.n_slots, 0)
        # A rolling buffer cannot take a chunk that wraps before attending: a later token of the
        # chunk would overwrite a key an earlier one still needs. Such a chunk attends to the old
        # slots plus its own keys (concatenated), and only its last `window` tokens are kept.
        self._concat = self.rolling and T > 1
        if self._concat:
            keep = pos > pos.max(dim=1, keepdim=True).values - self.n_slots
            slots = torch.where(keep, slots, 0)
            key_pos = torch.cat([self.slot_pos, pos], dim=1)
        B, K, _, D = self.k[0].shape  # (B, K, 1 + slots, D)
        # Where update() writes each (B, K, T, D) key, built once here for every layer: eagerly a
        # scatter_ index along the slot dimension (a third of the cost of the equivalent advanced-
        # index assignment at T=1); compiled, the (row, slot) pairs of an index_put_ (see the class).
        if torch.compiler.is_compiling():
            self._rows, self._slots = torch.arange(B, device=pos.device)[:, None].expand(B, T), slots
        else:
            self._index = slots[:, None, :, None].expand(B, K, T, D)
        self.slot_pos.scatter_(1, slots, pos)
        self.slot_pos[:, 0] = -1
        return key_pos if self._concat else self.slot_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) into the slots `prepare` chose; return the keys/values to attend to."""
        k_all, v_all = self.k[layer], self.v[layer]
        if self._concat:
            keys, values = torch.cat([k_all, k], dim=2), torch.cat([v_all, v], dim=2)
        if torch.compiler.is_compiling():  # an index_put_ into a graph input stays in place; a scatter_ is copied
            k_all[self._rows, :, self._slots], v_all[self._rows, :, self._slots] = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k_all.scatter_(2, self._index, k)
            v_all.scatter_(2, self._index, v)
        return (keys, values) if self._concat else (k_all, v_all)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, h * d, bias=False)
        self.k_proj = Linear(cfg.dim, k * d, bias=False)
        self.v_proj = Linear(cfg.dim, k * d, bias=False)
        self.o_proj = Linear(h * d, cfg.dim, bias=False)
        self.register_buffer("qkv_weight", None, persistent=False)  # see Transformer.fuse_projections

    def forward(self, x, cos, sin, pos: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self.qkv_weight is not None:
            # Inference, fused: q, k, v are head slices of one product, and q and k are rotated
            # together (a decode step's small ops cost as much as their arithmetic, per call).
            qkv = linear(x, self.qkv_weight).view(B, T, H + 2 * K, D).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + K], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + K :]
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = cfg.n_kv_heads != cfg.n_heads
        # Generation (a cache): SDPA reads the shared K/V heads in place; copying the whole cache to
        # H heads every step would cost as much as the attention itself on long contexts. Training:
        # expanding K/V to H heads costs memory but keeps the fast SDPA kernels on every backend.
        share_kv = gqa and cache is not None
        if gqa and not share_kv:
            rep = cfg.n_heads // cfg.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=share_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # see Transformer.fuse_projections

    def forward(self, x):
        if self.gate_up_weight is not None:
            gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, pos, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Build on the meta device, then `to_empty(device=...)` and `init_weights()` (see `build_model`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None or cfg.head_dim is None or cfg.ffn_dim is None or cfg.n_kv_heads is None:
            raise ValueError("Transformer needs a resolved ModelConfig (call cfg.resolved(vocab_size))")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_seq_len, device="meta")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        self.reset_rope()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference only: q/k/v and gate/up each become one matrix, so decoding runs 4 matrix-
        vector products per layer instead of 7 (fewer, larger reads of the weights). The projection
        parameters become views of the fused matrices (no memory added; state_dict, names and export
        unchanged) and stop requiring gradients: a fused model is not trained, quantized or given new
        weights afterwards (its fused matrices would not follow)."""
        projections = [m for b in self.layers for m in (*b.self_attn.children(), *b.mlp.children())]
        if any(type(m) is not Linear for m in projections):
            raise ValueError("fuse_projections: the projections are not plain Linear layers (quantized or LoRA); fuse a plain model")
        self.requires_grad_(False)
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            if attn.qkv_weight is None:
                attn.qkv_weight = fuse_rows(attn.q_proj, attn.k_proj, attn.v_proj)
                mlp.gate_up_weight = fuse_rows(mlp.gate_proj, mlp.up_proj)

    @property
    def is_packed(self) -> bool:
        """Whether `pack_weights` stored the weights in oneDNN's layout (forward only). Read from the
        fused q/k/v matrix, which every model has (a quantized head has no `weight`)."""
        return isinstance(self.layers[0].self_attn.qkv_weight, PackedWeight)

    @torch.no_grad()
    def pack_weights(self) -> bool:
        """For CPU inference in fp32: fuse the projections (`fuse_projections`), then store them and
        the output head in oneDNN's blocked weight layout, which its matmul reads at close to memory
        bandwidth for 1 to a few hundred rows; with plain row-major weights it slows from 2 rows on
        (benchmarks/inference.md: a decode step's products 1.5x faster at 2 rows, 1.4x at 8, and at
        64 rows 1.6x faster than the MKL GEMM those used).
        Returns False, having only fused, where that layout is not available (GPU, bf16, a PyTorch
        build without this oneDNN op).

        The plain copies are released (the packed ones hold the same numbers), so memory stays as it
        was, plus one copy of the output head when it is tied to the embedding (the lookup needs the
        plain one). Each packed matrix replaces its parameter or buffer by a `PackedWeight` handle
        (packed.py), which torch.compile can trace through. Such a model only runs forward:
        `state_dict()` raises."""
        self.fuse_projections()
        if self.is_packed:
            return True
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not _onednn_linear_works():
            return False

        def pack(module: nn.Module, name: str) -> None:  # the parameter or buffer becomes a plain attribute
            handle = PackedWeight(getattr(module, name))
            delattr(module, name)
            setattr(module, name, handle)

        def release(*linears: nn.Linear) -> None:  # their numbers now live in the packed fused matrix
            for lin in linears:
                lin.weight = nn.Parameter(torch.empty(lin.weight.shape, device="meta"), requires_grad=False)

        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            for module, name in ((attn, "qkv_weight"), (mlp, "gate_up_weight"), (attn.o_proj, "weight"), (mlp.down_proj, "weight")):
                pack(module, name)
            release(attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        pack(self.lm_head, "weight")  # a tied head: the embedding keeps its own
        self.register_state_dict_pre_hook(_refuse_packed_state_dict)
        return True

    @torch.no_grad()
    def reset_rope(self):
        """Recompute the RoPE tables on the model's device (after to_empty or a load)."""
        cos, sin = rope_tables(self.cfg, self.cfg.max_seq_len, device=self.embed_tokens.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
        target_logps: bool = False,
    ) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab), or the mean next-token loss if `targets` (B, T).

        `last_only`: logits of the last position only, (B, 1, vocab) (generation: a prefill needs just
        the next token's, and the output head is the largest matrix).

        Without a cache, positions are 0..T-1. With a cache, `pos` (T,) or (B, T) gives the absolute
        positions of the new tokens (negative = padding, attends and is attended to by nothing) and
        attention covers every cached position up to them (within the window, if any). With targets the
        output projection and the loss are fused (fused_loss.py): no (B, T, vocab) logits are kept.
        Targets equal to -100 are ignored. `target_logps`: instead of the mean loss, the (B, T) log-probs
        of the targets (0 where ignored), also without full-vocabulary logits (DPO's sequence log-probs).

        `doc_ids` (B, T) packs several documents into one row (SFT packing): a token attends only to
        earlier tokens of its own document and positions restart at each document's first token, so
        each document sees exactly what it would see alone (the block-diagonal mask costs the fast
        causal-only SDPA path, so it is used only when given).
        """
        B, T = idx.shape
        if doc_ids is not None:
            if cache is not None or T > self.cfg.max_seq_len:
                raise ValueError("doc_ids is for training on packed rows of at most max_seq_len tokens, without a cache")
            doc_pos = document_positions(doc_ids)
            index = torch.arange(T, device=idx.device)
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & attention_mask(index, index, None)
            if self.cfg.sliding_window is not None:
                mask &= (doc_pos[:, :, None] - doc_pos[:, None, :]) < self.cfg.sliding_window
            mask = mask[:, None]  # (B, 1, T, T): one mask for every head
            cos, sin = self.rope_cos[doc_pos][:, None], self.rope_sin[doc_pos][:, None]  # (B, 1, T, D)
        else:
            if pos is None:
                if T > self.cfg.max_seq_len:  # a shape check: no host-device sync on the training path
                    raise ValueError(f"position {T - 1} exceeds max_seq_len {self.cfg.max_seq_len}")
                pos = torch.arange(T, device=idx.device)
            # With explicit positions (decoding) the caller bounds them: the KV cache is allocated with
            # at most max_seq_len slots, and reading pos back here would sync every decoded token.
            mask = None  # None = plain causal over the T tokens (the fast path)
            if cache is not None:
                pos = pos.expand(B, T) if pos.dim() == 1 else pos  # (B, T): each row at its own position
                allowed = attention_mask_rows(pos, cache.prepare(pos), self.cfg.sliding_window)
                # Additive, not boolean: a padding row that may attend to nothing gets a uniform (finite)
                # softmax instead of NaN, and its output is never used.
                dtype = self.embed_tokens.weight.dtype
                mask = torch.zeros(allowed.shape, dtype=dtype, device=idx.device).masked_fill(~allowed, torch.finfo(dtype).min)
                mask = mask.unsqueeze(1)  # (B, 1, T, S): one mask for every head
                cos, sin = self.rope_cos[pos.clamp(min=0)].unsqueeze(1), self.rope_sin[pos.clamp(min=0)].unsqueeze(1)
            else:
                cos, sin = self.rope_cos[pos], self.rope_sin[pos]
                if self.cfg.sliding_window is not None and T > self.cfg.sliding_window:
                    mask = attention_mask(pos, pos, self.cfg.sliding_window)
        if targets is not None and self.is_packed:
            raise ValueError("this model's weights are packed for CPU inference (Transformer.pack_weights): it gives logits, "
                             "not a loss or target log-probs; load the model folder again for those")
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, cache, mask)
        if targets is not None and target_logps:
            return linear_target_logps(self.norm(x), self.lm_head.weight, targets)
        if targets is not None:
            return linear_cross_entropy(self.norm(x), self.lm_head.weight, targets)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


def _refuse_packed_state_dict(module, prefix, keep_vars) -> None:
    raise ValueError("this model's weights are packed for CPU inference (Transformer.pack_weights) and cannot be "
                     "saved or copied; load the model folder again for that")


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Meta device -> to_empty -> one init_weights: no weights are ever allocated twice."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()
    return model


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a resolved config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())
