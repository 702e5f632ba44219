"""safetensors files read and written one tensor at a time (for upscale and merge).

The `safetensors` library reads through a memory map, so every tensor it hands out stays resident
(as file-backed memory of the process) until the file is closed: streaming a whole model through
`safe_open` still ends with the whole model in the process's resident set. And `save_file` needs
every tensor in memory at once. The format is simple (8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then the raw bytes), so here each tensor is read
with one `readinto` into its own buffer and written with one `write`: peak memory is the tensors
being combined, never the model. Files written here load with `safetensors.torch.load_file`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SurgeryError(ValueError):
    """A checkpoint or an argument surgery cannot work with; the message is one line naming it.

    Defined here, the lowest surgery module, so a bad safetensors file is one too; source.py
    re-exports it and the CLI catches it.
    """


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and byte range (from the file's start)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for one safetensors file (metadata entry left out)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SurgeryError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SurgeryError(f"{path}: not a safetensors file (header is not JSON)") from None
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise SurgeryError(f"{path}: tensor {name} has dtype {entry['dtype']}, which openmill does not read")
        start, end = entry["data_offsets"]
        out[name] = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + start, base + end)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, in its own freshly allocated memory (no memory map kept)."""
    buf = bytearray(info.nbytes)
    with open(info.path, "rb") as f:
        f.seek(info.start)
        if f.readinto(buf) != info.nbytes:
            raise SurgeryError(f"{info.path}: file ends inside a tensor (truncated?)")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def write_streaming(path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in `plan` order.

    plan: (name, dtype, shape) per tensor, known before any data (the header comes first).
    produce(name) returns that tensor; it is written and dropped before the next one is asked for.
    """
    header, offset = {}, 0
    for name, dtype, shape in plan:
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in plan:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} came as {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            del t


def read_many(paths: Iterable[Path]) -> dict[str, TensorInfo]:
    """The union of several files' headers (a sharded checkpoint); a name in two files is an error."""
    out: dict[str, TensorInfo] = {}
    for path in paths:
        for name, info in read_header(path).items():
            if name in out:
                raise SurgeryError(f"{path}: tensor {name} is also in {out[name].path}")
            out[name] = info
    return out


class PeakMemory:
    """Growth of this process's peak resident memory over a `with` block, in bytes.

    Linux resets the peak (VmHWM) to the current resident size when "5" is written to
    /proc/self/clear_refs, so the peak measured is the block's own, not the imports' before it.
    `growth` is None where /proc is not there to ask.
    """

    def __enter__(self) -> PeakMemory:
        self.growth: int | None = None
        self._start = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self._start is not None and peak is not None:
            self.growth = max(0, peak - self._start) * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
