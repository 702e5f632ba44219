"""Weight-averaging merges of checkpoints of one architecture (SOLAR averaged its SFT/DPO candidates).

linear: sum_i w_i * theta_i with the weights normalised to sum 1. Computed in float64 and cast
        back to the stored dtype, so merging a checkpoint with itself returns it bit for bit
        (the float64 error, ~1e-16 relative, is far below half a float32/bf16 step).
slerp:  two checkpoints, t in [0, 1]; per tensor, interpolate along the great circle between the
        two flattened tensors: sin((1-t)W)/sin W * a + sin(tW)/sin W * b, W the angle between them;
        nearly parallel tensors (sin W ~ 0) fall back to linear, which is the same limit.

Tensors are read one at a time from every input and written as they are made (tensorfile.py).
The tokenizer and special tokens are the first checkpoint's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from openmill.export.folder import param_order
from openmill.surgery.source import Checkpoint, SurgeryError, open_checkpoint, write_folder

# Below this sin(angle) two tensors count as parallel and slerp is linear (mergekit uses 1 - 1e-4 on the cosine).
PARALLEL_SIN = 1e-4


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
