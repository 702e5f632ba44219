"""Checkpoints that describe themselves, are written atomically and verified by checksum.

    checkpoints/step_000200/
        model.safetensors     full (unsharded) weights
        optimizer.pt          full optimizer state, keyed by parameter name
        trainer.pt            loop state: step, sampler (mixture) state, RNG states
        meta.json             model config, recipe name, step, tokens seen
        checksums.json        sha256 of every file above (written last, inside the atomic folder)

Full state dicts are gathered through torch.distributed.checkpoint.state_dict, so the same code
serves one process, DDP and FSDP2, and a checkpoint saved by N processes loads into M.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from openmill.rundir import atomic_dir, sha256_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")
FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "meta.json")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# What unpickling a numpy array needs, and nothing that can run other code.
_NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict:
    # numpy's key array as a tensor: a checkpoint of tensors and plain Python values loads with
    # torch.load(weights_only=True), which runs no code from the file.
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    # safetensors refuses aliased tensors (tied embeddings): store independent contiguous copies.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def save_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, meta: dict, keep: int) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the folder (rank 0) or None."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    final = Path(root) / f"step_{step:06d}"
    if is_main_process():
        with atomic_dir(final) as tmp:
            save_weights(tmp / "model.safetensors", model_sd)
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
            sums = {name: sha256_file(tmp / name) for name in FILES}
            (tmp / "checksums.json").write_text(json.dumps(sums, indent=2))
        _prune(Path(root), keep)
    barrier()
    return final if is_main_process() else None


def _prune(root: Path, keep: int) -> None:
    steps = sorted(list_checkpoints(root))
    for old in steps[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def verify(folder: Path) -> str | None:
    """None if every file matches its recorded sha256, else the reason it does not."""
    sums_path = folder / "checksums.json"
    if not sums_path.is_file():
        return "checksums.json missing"
    try:
        sums = json.loads(sums_path.read_text())
    except json.JSONDecodeError:
        return "checksums.json unreadable"
    for name in FILES:
        if not (folder / name).is_file():
            return f"{name} missing"
        if sha256_file(folder / name) != sums.get(name):
            return f"{name} checksum mismatch"
    return None


@dataclass
class Resumable:
    step: int
    folder: Path


def latest_good(root: Path, log=print, at_most: int | None = None) -> Resumable | None:
    """The newest checkpoint (of a step <= at_most, when given) whose checksums hold; every bad
    one on the way is reported."""
    for step, folder in reversed(list_checkpoints(root)):
        if at_most is not None and step > at_most:
            continue
        problem = verify(folder)
        if problem is None:
            return Resumable(step, folder)
        log(f"checkpoint {folder} is corrupt ({problem}); trying the previous one")
    return None


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Collective. Loads weights and optimizer into the (possibly sharded) model; returns trainer state."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    model_sd = load_file(str(folder / "model.safetensors"))
    set_model_state_dict(model, model_sd, options=opts)
    optim_sd = torch.load(folder / "optimizer.pt", weights_only=True)  # tensors and plain values only: no code runs
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    # numpy arrays are allowed too: checkpoints written before the RNG key became a tensor hold one.
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        trainer = torch.load(folder / "trainer.pt", weights_only=True)
    set_rng_state(trainer["rng"])
    return trainer
