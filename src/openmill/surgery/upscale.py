"""Depth Up-Scaling (SOLAR 10.7B): a deeper model made of overlapping copies of a trained one.

Two copies of an n-layer model; the first keeps layers 0..n-m-1, the second m..n-1; stacked they
make 2(n-m) layers (SOLAR: n=32, m=8 -> 48). Generalised to k copies: the first drops its last m
layers, the last its first m, the ones between drop both (n-2m layers each). Embeddings, final
norm and head are the source's. The result is then trained on (continued pretraining) to heal the
seam where layer n-m-1 meets layer m.

Memory: tensors are read, renamed and written one at a time (tensorfile.py), so the peak is about
the largest tensor, never the model. The output's model.json records, under source.upscale,
`layer_map`: new layer i was copied from source layer layer_map[i].
"""

from __future__ import annotations

import time
from pathlib import Path

from openmill.export.folder import _param_shapes, param_order
from openmill.surgery.source import Checkpoint, SurgeryError, open_checkpoint, write_folder


def parse_drop(drop: int | float | str, n_layers: int) -> int:
    """m as a whole number with 0 <= m < n/2, or a one-line reason why not."""
    try:
        m = float(drop)
    except (TypeError, ValueError):
        raise SurgeryError(f"--drop: expected a whole number of layers, got {drop!r}") from None
    if not m.is_integer():
        raise SurgeryError(f"--drop: expected a whole number of layers, got {drop!r} (layers are copied whole)")
    m = int(m)
    if m < 0:
        raise SurgeryError(f"--drop: must be >= 0, got {m}")
    if 2 * m >= n_layers:
        raise SurgeryError(
            f"--drop {m}: must be less than half of the source's {n_layers} layers (m < {n_layers / 2:g}); with "
            f"m >= n/2 two copies keep 2(n-m) = {2 * (n_layers - m)} layers, no deeper than the source's {n_layers}"
        )
    return m


def dus_layer_map(n_layers: int, drop: int | float | str, copies: int = 2) -> list[int]:
    """Source layer of each new layer. n=8, m=2, k=2 -> [0..5] + [2..7] (12 layers)."""
    m = parse_drop(drop, n_layers)
    if copies < 2:
        raise SurgeryError(f"--copies: must be >= 2, got {copies}")
    layer_map = []
    for c in range(copies):
        first = 0 if c == 0 else m
        last = n_layers if c == copies - 1 else n_layers - m
        layer_map += range(first, last)
    return layer_map


def upscale(src: Path | Checkpoint, out_dir: Path, layer_map: list[int], note: dict | None = None) -> dict:
    """Write the model whose layer i is source layer layer_map[i] to `out_dir` (an openmill model folder).

    Any map is allowed (DUS, naive repetition 0..5 + 0..5, a pruned model); `note` is recorded with it.
    Returns the provenance and what was moved: layers, bytes, seconds, largest tensor.
    """
    started = time.perf_counter()
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    n = ckpt.cfg.n_layers
    bad = [j for j in layer_map if not 0 <= j < n]
    if not layer_map or bad:
        raise SurgeryError(f"layer map: source layers must lie in 0..{n - 1}, got {bad or 'an empty map'}")
    cfg = ckpt.cfg.model_copy(update={"n_layers": len(layer_map)})

    def source_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(layer_map[int(parts[1])])
        return ".".join(parts)

    names = sorted(_param_shapes(cfg), key=param_order)
    plan = [(name, ckpt.tensors[source_name(name)].dtype, ckpt.tensors[source_name(name)].shape) for name in names]
    provenance = {"from": str(ckpt.path), "format": ckpt.format, "source_layers": n, "layer_map": layer_map, **(note or {})}
    write_folder(out_dir, cfg, plan, lambda name: ckpt.read(source_name(name)), ckpt.tokenizer_json, ckpt.tokenizer,
                 {"format": "openmill", "path": str(ckpt.path), "upscale": provenance})
    written = sum(ckpt.tensors[source_name(name)].nbytes for name in names)
    return {**provenance, "layers": len(layer_map), "bytes_written": written,
            "largest_tensor_bytes": ckpt.largest_tensor_bytes, "seconds": time.perf_counter() - started}


def depth_upscale(src: Path | Checkpoint, out_dir: Path, drop: int | float | str, copies: int = 2) -> dict:
    """SOLAR's DUS: `copies` copies of SRC with m = `drop` layers dropped at each seam (see the module doc)."""
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    layer_map = dus_layer_map(ckpt.cfg.n_layers, drop, copies)
    return upscale(ckpt, out_dir, layer_map, {"method": "dus", "drop": int(float(drop)), "copies": copies})
