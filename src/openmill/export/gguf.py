"""GGUF (llama.cpp) files out and in, for the "llama" architecture, with the BPE tokenizer inside.

Export writes llama.* hyper-parameters, the byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2":
tokens, token types, merges, special ids, `tokenizer.ggml.pre`), the chat template and the tensors
in f32, f16, q8_0 or q4_0. Import reads a llama-architecture GGUF (F32/F16 as stored, every quantized
type the `gguf` package can dequantize, e.g. Q8_0/Q4_0/Q4_1) and its tokenizer into a model folder.

Why q and k are permuted: llama.cpp's llama architecture applies RoPE to adjacent pairs
(x0, x1), (x2, x3), ... of each head (Meta's original layout), while we, like transformers, rotate
the two halves (x_i, x_{i+D/2}). Reordering the rows of each head of q_proj and k_proj from
[first half; second half] to interleaved [h0_0, h1_0, h0_1, h1_1, ...] makes the pairwise rotation
act on exactly the pairs rotate-half uses; q and k get the same reordering, so every q.k score, and
the attention output, is unchanged (tests/test_export_gguf.py checks both the algebra and the files).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from openmill.config import ModelConfig
from openmill.export.folder import ExportError, ModelFolder, TokenizerInfo, write_model_folder
from openmill.pretokenizers import PRETOKENIZERS, Pretokenizer
from openmill.tokenizer import pretokenizer_name

ARCH = "llama"
QTYPES = ("f32", "f16", "q8_0", "q4_0")

# Splits of llama.cpp pre-tokenizer types: ours (openmill.pretokenizers), plus the types of files we
# import but never train: "smollm" (also starcoder, refact, ...) = every digit alone, then GPT-2's rule
# (llama.cpp's llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM).
_GPT2_RULE = PRETOKENIZERS["gpt2"].patterns[0]
LLAMACPP_SPLITS: dict[str, tuple[str, ...]] = {
    **{p.gguf_pre: p.patterns for p in PRETOKENIZERS.values() if p.gguf_pre is not None},
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2_RULE)),
}
# llama.cpp tokenizes a piece that is itself a vocabulary token as that token without merging
# ("ignore_merges") for these types only.
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}

# Our parameter name (after "layers.{i}.") -> llama.cpp's (after "blk.{i}.").
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def to_gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def from_gguf_name(name: str) -> str | None:
    """Our name for a llama.cpp tensor name, or None when we have no such parameter."""
    top = {v: k for k, v in TOP_NAMES.items()}
    if name in top:
        return top[name]
    parts = name.split(".", 2)
    rest = {v: k for k, v in LAYER_NAMES.items()}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in rest:
        return f"layers.{parts[1]}.{rest[parts[2]]}"
    return None


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order -> llama.cpp's interleaved pairs, per head. w: (n_heads * D, C)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rope_rows."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------- export


def gguf_pre_of(folder: ModelFolder) -> str:
    """The llama.cpp pre-tokenizer type that splits text as this folder's tokenizer does."""
    if folder.tokenizer.gguf_pre is not None:
        return folder.tokenizer.gguf_pre
    name = pretokenizer_name(folder.tokenizer_json.get("pre_tokenizer"))
    if name is None:
        raise ExportError(f"{folder.path / 'tokenizer.json'}: pre_tokenizer matches no openmill pretokenizer, "
                          "so its llama.cpp type (tokenizer.ggml.pre) is unknown")
    if PRETOKENIZERS[name].gguf_pre is None:
        usable = ", ".join(n for n, p in PRETOKENIZERS.items() if p.gguf_pre)
        raise ExportError(f"{folder.path / 'tokenizer.json'}: pretokenizer {name!r} has no llama.cpp equivalent "
                          f"(gguf_pre is None), so llama.cpp would tokenize differently; use one of: {usable}")
    return PRETOKENIZERS[name].gguf_pre


def _vocab_lists(folder: ModelFolder) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges as "a b") from tokenizer.json, padded to vocab_size."""
    from gguf import TokenType

    tok = folder.tokenizer_json
    if tok["model"].get("type") != "BPE":
        raise ExportError(f"{folder.path / 'tokenizer.json'}: model type {tok['model'].get('type')!r}; only BPE exports to GGUF")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, TokenType.NORMAL)
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    n = folder.cfg.vocab_size
    if len(by_id) > n or sorted(by_id) != list(range(len(by_id))):
        raise ExportError(f"{folder.path / 'tokenizer.json'}: ids are not 0..{n - 1} (model.vocab_size {n}, {len(by_id)} tokens)")
    for i in range(len(by_id), n):  # embedding rows past the tokenizer: placeholders llama.cpp never emits
        by_id[i], types[i] = f"<|unused_{i}|>", TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return [by_id[i] for i in range(n)], [int(types[i]) for i in range(n)], merges


def _tensor_type(name: str, shape: torch.Size, qtype: str):
    """The GGML type of one tensor: norms F32; matrices as asked (f32 keeps fp32 weights exactly: a
    reference file for parity with llama.cpp); the output matrix of a q4_0 file Q8_0 (it is the most
    sensitive one, and llama.cpp's own q4_0 keeps it above 4 bits too); F16 when the row length is
    not a multiple of the quantization block (32)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    target = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if target == T.Q4_0 and name == "output":
        target = T.Q8_0
    if target not in (T.F32, T.F16) and shape[-1] % GGML_QUANT_SIZES[target][0] != 0:
        target = T.F16
    return target


def export_gguf(model_dir: Path, out_path: Path, qtype: str = "f16") -> Path:
    """Write the openmill model folder `model_dir` as one llama-architecture GGUF file at `out_path`.

    Tensors stream through a temporary spool file (one tensor in memory at a time); the file appears
    at out_path complete or not at all.
    """
    import gguf

    if qtype not in QTYPES:
        raise ExportError(f"qtype: expected one of {', '.join(QTYPES)}, got {qtype!r}")
    folder = ModelFolder.open(model_dir)
    cfg, info = folder.cfg, folder.tokenizer
    if cfg.sliding_window is not None:
        raise ExportError(f"{folder.path / 'model.json'}: model.sliding_window is {cfg.sliding_window}; llama.cpp's "
                          "llama architecture attends to the whole context, so the GGUF would compute a different model")
    pre = gguf_pre_of(folder)
    tokens, types, merges = _vocab_lists(folder)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH, use_temp_file=True)
    writer.add_name(out_path.stem)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (("bos", info.bos_token), ("eos", info.eos_token), ("pad", info.pad_token)):
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(folder.token_id(token))
    eot = [t for t in info.stop_tokens if t != info.eos_token]
    if eot:  # llama.cpp stops generation at EOS and at the end-of-turn token
        writer.add_eot_token_id(folder.token_id(eot[0]))
    writer.add_add_bos_token(info.add_bos_token)
    writer.add_add_eos_token(False)
    if info.chat_template is not None:
        writer.add_chat_template(info.chat_template)

    output = "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    for name, w in folder.tensors():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        w = w.float()
        if name.endswith("q_proj.weight"):
            w = permute_rope_rows(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_rope_rows(w, cfg.n_kv_heads)
        ttype = _tensor_type("output" if name == output else name, w.shape, qtype)
        data = gguf.quants.quantize(w.numpy(), ttype)
        writer.add_tensor(to_gguf_name(name), data, raw_dtype=ttype if ttype not in (gguf.GGMLQuantizationType.F32,
                                                                                 gguf.GGMLQuantizationType.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


# --------------------------------------------------------------------------------------- import


def _field(reader, key: str, default=None, required: bool = False, source: Path | None = None):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ExportError(f"{source}: metadata {key} missing")
        return default
    return f.contents()


def config_from_gguf(reader, source: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", required=True, source=source)
    if arch != ARCH:
        raise ExportError(f"{source}: general.architecture {arch!r} is not supported (expected 'llama')")

    def hp(key, default=None):
        return _field(reader, f"llama.{key}", default, required=default is None, source=source)

    if _field(reader, "llama.expert_count", 0):
        raise ExportError(f"{source}: llama.expert_count is set; mixture-of-experts is not implemented")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ExportError(f"{source}: llama.rope.scaling.type {scaling!r} is not implemented; only plain RoPE")
    dim, heads = hp("embedding_length"), hp("attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", dim // heads)
    if _field(reader, "llama.attention.value_length", head_dim) != head_dim:
        raise ExportError(f"{source}: llama.attention.value_length differs from key_length; not supported")
    if hp("rope.dimension_count", head_dim) != head_dim:
        raise ExportError(f"{source}: llama.rope.dimension_count {hp('rope.dimension_count')} != head_dim {head_dim}; "
                          "partial rotary embeddings are not implemented")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ExportError(f"{source}: tensor token_embd.weight missing")
    return ModelConfig(
        vocab_size=int(embd.shape[1]),  # ggml shapes are innermost-first: (dim, vocab)
        dim=dim,
        n_layers=hp("block_count"),
        n_heads=heads,
        n_kv_heads=hp("attention.head_count_kv", heads),
        head_dim=head_dim,
        ffn_dim=hp("feed_forward_length"),
        max_seq_len=hp("context_length", 2048),
        rope_theta=float(hp("rope.freq_base", 10000.0)),
        norm_eps=float(hp("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),
    ).resolved()


def tokenizer_from_gguf(reader, source: Path) -> tuple[str, TokenizerInfo]:
    """A `tokenizers` byte-level BPE rebuilt from the embedded vocabulary and merges, and its facts."""
    from gguf import TokenType

    model = _field(reader, "tokenizer.ggml.model", required=True, source=source)
    if model != "gpt2":
        raise ExportError(f"{source}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in LLAMACPP_SPLITS:
        raise ExportError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(sorted(LLAMACPP_SPLITS))})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", required=True, source=source))
    types = list(_field(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", required=True, source=source)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ExportError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES))
    hf.pre_tokenizer = Pretokenizer(LLAMACPP_SPLITS[pre], pre).build()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == TokenType.CONTROL])
    hf.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == TokenType.USER_DEFINED])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = token("eos")
    info = TokenizerInfo(
        bos_token=token("bos"),
        eos_token=eos,
        pad_token=token("padding"),
        stop_tokens=list(dict.fromkeys(t for t in (eos, token("eot"), token("eom")) if t is not None)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        # Without the key llama.cpp adds BOS for the Llama 3 pre-tokenizers (the ones that ignore merges).
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", pre in IGNORE_MERGES)),
        gguf_pre=pre,
    )
    return hf.to_str(pretty=True), info


def import_gguf(path: Path, out_dir: Path) -> list[Path]:
    """Read a llama-architecture GGUF into an openmill model folder; return its files.

    F32 and F16 tensors keep their type; quantized ones are dequantized to fp32 with the `gguf`
    package, one tensor at a time (the file itself is memory-mapped).
    """
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, dequantize

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError/struct errors on foreign files)
        raise ExportError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = config_from_gguf(reader, path)
    tokenizer_json, info = tokenizer_from_gguf(reader, path)
    state = {}
    for t in reader.tensors:
        name = from_gguf_name(t.name)
        if name is None:
            raise ExportError(f"{path}: tensor {t.name} has no counterpart in openmill's decoder")
        if t.tensor_type == T.F16:
            w = torch.from_numpy(np.array(t.data, dtype=np.float16))
        else:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        state[name] = w.contiguous()
    out_dir = Path(out_dir)
    write_model_folder(out_dir, cfg, state, tokenizer_json, info, {"format": "gguf", "path": str(path)})
    return [out_dir / n for n in ("model.safetensors", "model.json", "tokenizer.json")]
