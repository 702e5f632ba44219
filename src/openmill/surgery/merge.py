"""Weight-averaging merges of checkpoints of one architecture (SOLAR averaged its SFT/DPO candidates).

linear: sum_i w_i * theta_i with the weights normalised to sum 1. Computed in float64 and cast
        back to the stored dtype, so merging a checkpoint with itself returns it bit for bit
        (the float64 error, ~1e-16 relative, is far below half a float32/bf16 step).
slerp:  two checkpoints, t in [0, 1]; per tensor, interpolate along the great circle between the
        two flattened tensors: sin((1-t)W)/sin W * a + sin(tW)/sin W * b, W the angle between them;
        nearly parallel tensors (sin W ~ 0) fall back to linear, which is the same limit.

Tensors are read one at a time from every input and written as they are made (tensorfile.py).
Equal shapes are not enough: the inputs must have one model config (RoPE base, sliding window,
tied head, ...) and one tokenizer, since the output is written with the first one's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from openmill.export.folder import param_order
from openmill.surgery.source import Checkpoint, SurgeryError, open_checkpoint, write_folder

# Below this sin(angle) two tensors count as parallel and slerp is linear (mergekit uses 1 - 1e-4 on the cosine).
PARALLEL_SIN = 1e-4
# ModelConfig fields that do not change what a model computes: how its config was written (preset,
# ffn_multiple_of, both already resolved into the other fields) or how its weights were first drawn.
NOT_COMPARED_CONFIG = {"preset", "ffn_multiple_of", "init_std"}
# TokenizerInfo's llama.cpp pre-tokenizer name is known for a GGUF import and found later otherwise.
NOT_COMPARED_TOKENIZER = {"gguf_pre"}


def check_same_shapes(ckpts: list[Checkpoint]) -> list[str]:
    """The shared tensor names in model order; the first name that differs in any input is an error."""
    first = ckpts[0]
    for other in ckpts[1:]:
        for name in sorted(set(first.tensors) | set(other.tensors), key=param_order):
            a, b = first.tensors.get(name), other.tensors.get(name)
            if a is None or b is None:
                where = other.path if a is not None else first.path
                raise SurgeryError(f"merge: tensor {name} is missing in {where}; the checkpoints differ in shape")
            if a.shape != b.shape:
                raise SurgeryError(f"merge: tensor {name} has shape {a.shape} in {first.path} but {b.shape} in {other.path}")
    return sorted(first.tensors, key=param_order)


def check_same_model(ckpts: list[Checkpoint]) -> None:
    """Every input has the first one's model config and tokenizer; else one line naming the first difference."""
    first = ckpts[0]
    first_tokenizer_file = json.loads(first.tokenizer_json)
    for other in ckpts[1:]:
        for field in type(first.cfg).model_fields:
            a, b = getattr(first.cfg, field), getattr(other.cfg, field)
            if field not in NOT_COMPARED_CONFIG and a != b:
                raise SurgeryError(f"merge: model config field {field} is {a!r} in {first.path} "
                                   f"but {b!r} in {other.path}")
        info_a, info_b = asdict(first.tokenizer), asdict(other.tokenizer)
        for field in info_a:
            if field not in NOT_COMPARED_TOKENIZER and info_a[field] != info_b[field]:
                raise SurgeryError(f"merge: tokenizer field {field} is {_short(info_a[field])} in {first.path} "
                                   f"but {_short(info_b[field])} in {other.path}")
        other_tokenizer_file = json.loads(other.tokenizer_json)
        for key in sorted(set(first_tokenizer_file) | set(other_tokenizer_file)):
            # The values are whole vocabularies and merge lists: name the key only.
            if first_tokenizer_file.get(key) != other_tokenizer_file.get(key):
                raise SurgeryError(f"merge: tokenizer.json field {key} differs between {first.path} and {other.path}")


def _short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a chat template runs to kilobytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def linear(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        out.add_(t.to(torch.float64), alpha=w)
    return out.to(tensors[0].dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return linear([a, b], [1 - t, t])
    cos = float(torch.clamp((a64.flatten() @ b64.flatten()) / (na * nb), -1.0, 1.0))
    angle = math.acos(cos)
    if math.sin(angle) < PARALLEL_SIN:
        return linear([a, b], [1 - t, t])
    s = math.sin(angle)
    return (math.sin((1 - t) * angle) / s * a64 + math.sin(t * angle) / s * b64).to(a.dtype)


def merge(sources: list[Path], out_dir: Path, weights: list[float] | None = None, method: str = "linear",
          t: float = 0.5) -> dict:
    """Merge `sources` into the openmill model folder `out_dir`; returns what was done."""
    started = time.perf_counter()
    if method not in ("linear", "slerp"):
        raise SurgeryError(f"--method: expected linear or slerp, got {method!r}")
    if len(sources) < 2:
        raise SurgeryError(f"merge: needs at least two checkpoints, got {len(sources)}")
    if method == "slerp" and len(sources) != 2:
        raise SurgeryError(f"--method slerp: interpolates exactly two checkpoints, got {len(sources)}")
    if method == "slerp" and not 0 <= t <= 1:
        raise SurgeryError(f"--t: slerp's position must lie in [0, 1], got {t}")
    weights = list(weights) if weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise SurgeryError(f"--weights: {len(weights)} weights for {len(sources)} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SurgeryError(f"--weights: expected non-negative weights with a positive sum, got {weights}")
    weights = [w / sum(weights) for w in weights]

    ckpts = [open_checkpoint(p) for p in sources]
    names = check_same_shapes(ckpts)
    check_same_model(ckpts)  # after the shapes, so a shape difference is reported as the tensor it breaks
    first = ckpts[0]

    def produce(name: str) -> torch.Tensor:
        tensors = [c.read(name) for c in ckpts]
        return linear(tensors, weights) if method == "linear" else slerp(tensors[0], tensors[1], t)

    plan = [(n, first.tensors[n].dtype, first.tensors[n].shape) for n in names]
    recipe = {"method": method, "sources": [str(p) for p in sources]}
    recipe.update(weights=weights) if method == "linear" else recipe.update(t=t)
    write_folder(out_dir, first.cfg, plan, produce, first.tokenizer_json, first.tokenizer,
                 {"format": "openmill", "path": str(first.path), "merge": recipe})
    return {**recipe, "tensors": len(names), "seconds": time.perf_counter() - started}
