"""Weights packed in oneDNN's blocked layout (CPU decoding), and the op that multiplies by them.

oneDNN's matmul reads its own blocked weight layout at close to memory bandwidth for 1 to a few
hundred rows, where MKL's on plain row-major weights reaches about half (benchmarks/inference.md).
A packed weight is an opaque oneDNN tensor: no strides, so torch.compile cannot make a fake tensor
of it and cannot trace a module that holds one. So a module holds a `PackedWeight` handle instead
(the tensor, an integer slot and the product's sizes), and a compiled step calls
`openmill::packed_linear(x, slot, out_features)`, an op dynamo leaves opaque, which finds the
tensor by its slot; the step's small ops (norms, RoPE, cache writes, SwiGLU) still fuse around it.
Eagerly the handle calls oneDNN directly.
"""

from __future__ import annotations

import itertools
import weakref

import torch

# slot -> a weak reference to the packed tensor; the handle owns the tensor, so a slot lives exactly
# as long as the module that holds its handle.
_SLOTS: dict[int, weakref.ref] = {}
_next_slot = itertools.count()

_lib = torch.library.Library("openmill", "DEF")  # a plain definition: torch.library.custom_op adds ~30 us per call
_lib.define("packed_linear(Tensor x, int slot, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, slot: int, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _SLOTS[slot](), None, "none", [], "")


_lib.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("openmill::packed_linear")
def _packed_linear_fake(x: torch.Tensor, slot: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedWeight:
    """y = x @ W.T for a weight W (out_features, in_features) stored in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.slot = next(_next_slot)
        _SLOTS[self.slot] = weakref.ref(self.tensor, lambda _, slot=self.slot: _SLOTS.pop(slot, None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.openmill.packed_linear(x, self.slot, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.tensor, None, "none", [], "")

    def __deepcopy__(self, memo) -> PackedWeight:  # read-only: copies of a model may share it
        return self

    def __repr__(self) -> str:
        return f"PackedWeight({self.out_features}, {self.in_features}, slot={self.slot})"
