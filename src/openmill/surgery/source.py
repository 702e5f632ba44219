"""A checkpoint to operate on, whatever folder it came in, and the folder surgery writes.

Sources: an openmill model folder (model.json + model.safetensors + tokenizer.json, e.g.
runs/tiny/pretrain/final) or a Hugging Face Llama/Mistral folder (config.json + model.safetensors
or shards with model.safetensors.index.json + tokenizer.json). Either way the tensors are listed
by their openmill names (export/folder.py) with where they lie on disk; nothing is loaded until a
tensor is read. Output is always an openmill model folder (`openmill export --format hf` turns it
into a Hugging Face one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from openmill.config import ModelConfig
from openmill.export.folder import (
    ExportError,
    ModelFolder,
    TokenizerInfo,
    _param_shapes,
    param_order,
    read_json,
    write_folder_description,
)
from openmill.export.hf import _weight_files, config_from_hf, from_hf_name, tokenizer_from_hf
from openmill.rundir import atomic_dir
from openmill.surgery.tensorfile import SurgeryError, TensorInfo, read_header, read_many, read_tensor, write_streaming


@dataclass
class Checkpoint:
    path: Path
    format: str  # "openmill" or "hf"
    cfg: ModelConfig
    tensors: dict[str, TensorInfo]  # openmill name -> location; lm_head is present even when tied
    tokenizer_json: str
    tokenizer: TokenizerInfo

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    @property
    def largest_tensor_bytes(self) -> int:
        return max(t.nbytes for t in self.tensors.values())


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if (path / "model.json").is_file():
        return _open_openmill(path)
    if (path / "config.json").is_file():
        return _open_hf(path)
    raise SurgeryError(f"{path}: neither an openmill model folder (model.json) nor a Hugging Face folder (config.json)")


def _open_openmill(path: Path) -> Checkpoint:
    try:
        folder = ModelFolder.open(path)
    except ExportError as e:
        raise SurgeryError(str(e)) from None
    tensors = read_header(folder.weights_path)
    _check_names(path, folder.cfg, tensors)
    return Checkpoint(path, "openmill", folder.cfg, tensors, (path / "tokenizer.json").read_text(encoding="utf-8"),
                      folder.tokenizer)


def _open_hf(path: Path) -> Checkpoint:
    try:
        cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
        tokenizer_json, info = tokenizer_from_hf(path)
        files = _weight_files(path)
    except ExportError as e:
        raise SurgeryError(str(e)) from None
    tensors = {}
    for hf_name, t in read_many(files).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; recomputed from rope_theta
        tensors[from_hf_name(hf_name)] = t
    if cfg.tie_embeddings and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]  # openmill folders store both
    _check_names(path, cfg, tensors)
    return Checkpoint(path, "hf", cfg, tensors, tokenizer_json, info)


def _check_names(path: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    expected = _param_shapes(cfg)
    for name in sorted(set(expected) | set(tensors), key=param_order):
        if name not in tensors:
            raise SurgeryError(f"{path}: tensor {name} is missing (the config needs it)")
        if name not in expected:
            raise SurgeryError(f"{path}: tensor {name} does not belong to a {cfg.n_layers}-layer model of this config")
        if tensors[name].shape != expected[name]:
            raise SurgeryError(f"{path}: tensor {name} has shape {tensors[name].shape}, the config needs {expected[name]}")


def write_folder(out_dir: Path, cfg: ModelConfig, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 produce: Callable[[str], torch.Tensor], tokenizer_json: str, tokenizer: TokenizerInfo,
                 source: dict) -> Path:
    """An openmill model folder whose weights are produced tensor by tensor (see tensorfile.py)."""
    with atomic_dir(Path(out_dir)) as tmp:
        write_streaming(tmp / "model.safetensors", plan, produce, metadata={"format": "pt"})
        write_folder_description(tmp, cfg, tokenizer_json, tokenizer, source)
    return Path(out_dir)
