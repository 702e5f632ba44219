"""Hugging Face folders out and in: LlamaForCausalLM / MistralForCausalLM + safetensors + tokenizer.

Our parameter names are transformers' Llama/Mistral names without the "model." prefix (model.py),
and our RoPE is the same rotate-half RoPE, so the weights move unchanged: only names, config keys
and the tokenizer files are translated. transformers is not imported here; the folder is plain JSON
and safetensors (tests load it with the real transformers).

Export writes: config.json, model.safetensors (or model-0000k-of-0000n.safetensors shards plus
model.safetensors.index.json), tokenizer.json, tokenizer_config.json, generation_config.json.
Import reads the same layout, one tensor at a time, into an openmill model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from openmill.config import ModelConfig
from openmill.export.folder import (ExportError, ModelFolder, TokenizerInfo, checked_model_config, tokenizer_vocab,
                                    write_model_folder)
from openmill.rundir import atomic_dir, atomic_write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# config.json keys without which the model's shape is unknown; the rest have transformers' defaults.
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Our ModelConfig field -> its config.json key, so an error names the key the file has.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size",
           "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
           "tie_embeddings": "tie_word_embeddings"}


def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else name.removeprefix("model.")


# --------------------------------------------------------------------------------------- export


def hf_config(cfg: ModelConfig, tok: TokenizerInfo, ids: dict, dtype: str) -> dict:
    """config.json for our config. Mistral when a sliding window is set (Llama has none)."""
    model_type = "mistral" if cfg.sliding_window is not None else "llama"
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config["sliding_window"] = cfg.sliding_window
    return config


def _shard_plan(folder: ModelFolder, names: list[str], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names grouped so each group's bytes stay under max_shard_bytes (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    with safe_open(str(folder.weights_path), framework="pt") as f:
        for name in names:
            n = itemsize
            for d in f.get_slice(name).get_shape():
                n *= d
            if current and size + n > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(name)
            size += n
    return shards + [current]


def export_hf(model_dir: Path, out_dir: Path, max_shard_bytes: int = 2_000_000_000, dtype: str | None = None) -> list[Path]:
    """Write a transformers folder for the openmill model folder `model_dir`; return the files written.

    dtype: "float32" | "bfloat16" | "float16", or None to keep the stored dtype. Memory: one shard
    of weights at a time. The folder appears at `out_dir` complete or not at all.
    """
    folder = ModelFolder.open(model_dir)
    cfg, tok = folder.cfg, folder.tokenizer
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    names = [n for n in folder.names() if not (cfg.tie_embeddings and n == "lm_head.weight")]
    stored = next(folder.tensors(names[:1]))[1].dtype
    target = DTYPES[dtype] if dtype else stored
    dtype_name = next(k for k, v in DTYPES.items() if v == target)
    ids = {k: folder.token_id(getattr(tok, f"{k}_token")) for k in ("bos", "eos", "pad")}
    stop_ids = [folder.token_id(t) for t in tok.stop_tokens]

    plan = _shard_plan(folder, names, target.itemsize, max_shard_bytes)
    with atomic_dir(Path(out_dir)) as tmp:
        weight_map, total = {}, 0
        for k, shard in enumerate(plan, 1):
            fname = "model.safetensors" if len(plan) == 1 else f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            tensors = {to_hf_name(n): t.to(target).contiguous() for n, t in folder.tensors(shard)}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
        if len(plan) > 1:
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", hf_config(cfg, tok, ids, dtype_name))
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": ids["bos"], "eos_token_id": stop_ids, "pad_token_id": ids["pad"]})
        shutil.copy(folder.path / "tokenizer.json", tmp / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "add_bos_token": tok.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_seq_len,
        }
        if tok.chat_template is not None:
            tokenizer_config["chat_template"] = tok.chat_template
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config)
        written = sorted(p.name for p in tmp.iterdir())
    return [Path(out_dir) / n for n in written]


# --------------------------------------------------------------------------------------- import


def _rope_type(config: dict) -> str:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default"))


def config_from_hf(config: dict, source: Path) -> ModelConfig:
    """Our ModelConfig for a Llama/Mistral config.json; anything we do not implement is refused."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{source}: model_type {model_type!r} is not supported (expected llama or mistral)")
    arch = config.get("architectures") or [ARCHITECTURES[model_type]]
    if arch != [ARCHITECTURES[model_type]]:
        raise ExportError(f"{source}: architectures {arch} is not supported (expected [{ARCHITECTURES[model_type]!r}])")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ExportError(f"{source}: {key} is true; openmill's decoder has no bias terms")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (expected silu)")
    if (rope := _rope_type(config)) != "default":
        raise ExportError(f"{source}: rope type {rope!r} (rope_parameters/rope_scaling) is not implemented; only default RoPE")
    rope_params = config.get("rope_parameters") or {}
    window = config.get("sliding_window") if model_type == "mistral" else None
    if model_type == "mistral" and config.get("use_sliding_window") is False:
        window = None
    for key in REQUIRED_HF_KEYS:  # checked first: head_dim below divides by them
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            got = "nothing (missing)" if key not in config else repr(value)
            raise ExportError(f"{source}: field {key}: expected a positive integer, got {got}")
    heads = config["num_attention_heads"]
    fields = dict(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=rope_params.get("rope_theta", config.get("rope_theta", 10000.0)),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        sliding_window=window,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    return checked_model_config(fields, source, HF_KEYS)


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_from_hf(hf_dir: Path) -> tuple[str, TokenizerInfo]:
    """(tokenizer.json text, TokenizerInfo) from a transformers folder's tokenizer files."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing (only fast tokenizers with a tokenizer.json can be imported)")
    text = path.read_text(encoding="utf-8")
    vocab = tokenizer_vocab(json.loads(text))
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = _token_text(tc.get("eos_token"))
    stop_ids = gen.get("eos_token_id", [])
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    by_id = {i: t for t, i in vocab.items()}
    stops = [by_id[i] for i in stop_ids if i in by_id] or ([eos] if eos else [])
    info = TokenizerInfo(
        bos_token=_token_text(tc.get("bos_token")),
        eos_token=eos,
        pad_token=_token_text(tc.get("pad_token")),
        stop_tokens=stops,
        chat_template=template,
        add_bos_token=bool(tc.get("add_bos_token", False)),
    )
    for name in ("bos_token", "eos_token", "pad_token"):
        token = getattr(info, name)
        if token is not None and token not in vocab:
            raise ExportError(f"{tc_path}: {name} {token!r} is not in {path.name}")
    if "add_bos_token" not in tc:
        info.add_bos_token = _post_processor_adds_bos(text, info.bos_token)
    return text, info


def _post_processor_adds_bos(tokenizer_json: str, bos_token: str | None) -> bool:
    """Whether tokenizer.json's post-processor starts every encoding with BOS.

    Llama 3 style folders add BOS this way (TemplateProcessing "<bos> $A") and leave add_bos_token
    out of tokenizer_config.json; transformers then encodes with the post-processor, so we ask it.
    """
    if bos_token is None:
        return False
    hf = Tokenizer.from_str(tokenizer_json)
    return hf.encode("", add_special_tokens=True).ids[:1] == [hf.token_to_id(bos_token)]


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    raise ExportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)")


def import_hf(hf_dir: Path, out_dir: Path) -> list[Path]:
    """Read a transformers Llama/Mistral folder into an openmill model folder; return its files.

    Tensors are read one at a time from each safetensors shard and kept in their stored dtype, so
    memory holds the model once. Bias tensors or names outside the Llama layout are refused.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing")
    cfg = config_from_hf(json.loads(config_path.read_text()), config_path)
    tokenizer_json, info = tokenizer_from_hf(hf_dir)
    state = {}
    for path in _weight_files(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(".bias"):
                    raise ExportError(f"{path}: tensor {hf_name} is a bias; openmill's decoder has none")
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer older transformers saved; recomputed from rope_theta
                state[from_hf_name(hf_name)] = f.get_tensor(hf_name)
    out_dir = Path(out_dir)
    write_model_folder(out_dir, cfg, state, tokenizer_json, info, {"format": "hf", "path": str(hf_dir)})
    return [out_dir / n for n in ("model.safetensors", "model.json", "tokenizer.json")]
