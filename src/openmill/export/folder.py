"""What every converter shares: the openmill model folder, its tokenizer facts, and the errors.

An openmill model folder (train/pretrain.py) is `model.safetensors` + `model.json` + `tokenizer.json`.
`model.json` = {"model": ModelConfig dump, ...}. A folder made by training has openmill's own
special tokens and chat format (tokenizer.py); a folder imported from Hugging Face or GGUF keeps the
source's, recorded under "tokenizer" in model.json (TokenizerInfo below) so exporting it again
writes them back. Weights are in our parameter names (= HF Llama names without "model.").
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from openmill.config import ModelConfig, RecipeError
from openmill.rundir import atomic_dir, atomic_write_json
from openmill.tokenizer import BOS, CHAT_TEMPLATE, END, EOS, PAD


class ExportError(ValueError):
    """A model or file the converters cannot translate faithfully; the message is one line naming it."""


@dataclass
class TokenizerInfo:
    """The special tokens and chat format a tokenizer.json alone does not say (strings, not ids)."""

    bos_token: str | None = BOS
    eos_token: str | None = EOS
    pad_token: str | None = PAD
    # Tokens that end a generation: EOS for documents, <|end|> closes an openmill chat turn.
    stop_tokens: list[str] = field(default_factory=lambda: [EOS, END])
    chat_template: str | None = CHAT_TEMPLATE
    add_bos_token: bool = False  # whether plain encoding prepends BOS (openmill's does not)
    # llama.cpp pre-tokenizer type when known from the source (a GGUF import); else found by
    # matching the tokenizer.json split against openmill.pretokenizers.
    gguf_pre: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerInfo:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class ModelFolder:
    """An openmill model folder opened for reading: config, tokenizer facts, lazy weights."""

    path: Path
    cfg: ModelConfig
    tokenizer: TokenizerInfo

    @classmethod
    def open(cls, path: Path) -> ModelFolder:
        path = Path(path)
        for name in ("model.json", "model.safetensors", "tokenizer.json"):
            if not (path / name).is_file():
                raise ExportError(f"{path}: not an openmill model folder ({name} missing)")
        meta = read_json(path / "model.json")
        if "model" not in meta:
            raise ExportError(f"{path / 'model.json'}: no 'model' field (the model config)")
        cfg = checked_model_config(meta["model"], path / "model.json", prefix="model.")
        return cls(path, cfg, TokenizerInfo.from_dict(meta.get("tokenizer", {})))

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def tokenizer_json(self) -> dict:
        return read_json(self.path / "tokenizer.json")

    def names(self) -> list[str]:
        """Parameter names in the file, in model order (embeddings, layers by index, norm, head)."""
        with safe_open(str(self.weights_path), framework="pt") as f:
            return sorted(f.keys(), key=param_order)

    def tensors(self, names: list[str] | None = None):
        """Yield (name, tensor) one at a time: the whole model is never in memory at once."""
        with safe_open(str(self.weights_path), framework="pt") as f:
            for name in names or sorted(f.keys(), key=param_order):
                yield name, f.get_tensor(name)

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        vocab = tokenizer_vocab(self.tokenizer_json)
        if token not in vocab:
            raise ExportError(f"{self.path / 'tokenizer.json'}: special token {token!r} is not in the vocabulary")
        return vocab[token]


def read_json(path: Path):
    """A JSON file's content, or one ExportError line naming the file and where it stops being JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ExportError(f"{path}: not UTF-8 text (byte {e.start})") from None


def checked_model_config(fields: dict, source: Path, names: dict[str, str] | None = None,
                         prefix: str = "") -> ModelConfig:
    """ModelConfig(**fields).resolved(), or one ExportError line `source: field X: expected Y`.

    names: our field name -> the file's spelling of it (config.json says hidden_size for dim);
    prefix: where the fields sit in the file ("model." in model.json). Both only shape the message.
    """
    try:
        return ModelConfig(**fields).resolved()
    except ValidationError as e:
        raise ExportError(f"{source}: {first_validation_problem(e, names or {}, prefix)}") from None
    except RecipeError as e:  # resolved() with no vocab_size: its message names the field
        raise ExportError(f"{source}: {e}") from None


def first_validation_problem(err: ValidationError, names: dict[str, str], prefix: str) -> str:
    """The first problem pydantic found in a ModelConfig, as `field X: expected Y, got Z` (no newline)."""
    problem = err.errors()[0]
    key = ".".join(str(p) for p in problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")
    if not key:  # a check across fields (n_heads vs n_kv_heads): its message names them
        return message
    shown = prefix + names.get(key, key)
    if problem["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(ModelConfig.model_fields), n=1)
        return f"field {shown}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"field {shown}: {message.replace('Input should be', 'expected', 1)}, got {problem['input']!r}"


def param_order(name: str) -> tuple:
    """Sort key: embed_tokens, layers.0.*, layers.1.*, ..., norm, lm_head (layer numbers as numbers)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return ({"embed_tokens": 0, "norm": 2, "lm_head": 3}.get(parts[0], 4), 0, name)


def tokenizer_vocab(tok: dict) -> dict[str, int]:
    """token -> id over a tokenizer.json's model vocabulary and its added tokens."""
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return vocab


def write_model_folder(out_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer_json: str,
                       tokenizer: TokenizerInfo, source: dict) -> None:
    """Write an openmill model folder atomically (the layout train/pretrain.py writes and reads).

    `state` holds every parameter of `Transformer(cfg)` (lm_head too when tied, as training writes
    it). Tensors keep their dtype; load_model_folder casts them into the fp32 model.
    """
    expected = _param_shapes(cfg)
    if cfg.tie_embeddings:  # a live tied model's state dict aliases the two; safetensors needs copies
        state = {**state, "lm_head.weight": state["embed_tokens.weight"].clone()}
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise ExportError(f"{source.get('path', '?')}: weights do not fit the config "
                          f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(extra)[:3]})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ExportError(f"{source.get('path', '?')}: tensor {name} has shape {tuple(state[name].shape)}, "
                              f"the config needs {shape}")
    with atomic_dir(Path(out_dir)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_folder_description(tmp, cfg, tokenizer_json, tokenizer, source)


def write_folder_description(folder: Path, cfg: ModelConfig, tokenizer_json: str, tokenizer: TokenizerInfo,
                             source: dict) -> None:
    """model.json and tokenizer.json: everything of a model folder but its weights."""
    meta = {"model": cfg.model_dump(mode="json"), "tokenizer": asdict(tokenizer), "source": source}
    atomic_write_json(folder / "model.json", meta)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    from openmill.model import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
