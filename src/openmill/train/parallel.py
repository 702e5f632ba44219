"""Process groups and parallelism, applied from outside the model in one documented place.

Under `torchrun` (WORLD_SIZE > 1) the model is wrapped by DDP or sharded by FSDP2 (`fully_shard`);
a single process runs the plain module. Order (torchtitan's): compile each transformer block on its
own first (one small graph reused by every layer; the fused loss stays eager), then shard or wrap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from openmill.config import RecipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local, device)


def parallelize(model: nn.Module, world: World, mode: str, compile_model: bool) -> nn.Module:
    """mode: "auto" (DDP when several processes), "ddp" or "fsdp". Returns the module to train."""
    if compile_model:
        for block in model.layers:
            block.compile()
    if world.size > 1:
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = dist.device_mesh.init_device_mesh(world.device.type, (world.size,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside a DDP wrapper (FSDP2 shards in place, compile works per block)."""
    return getattr(model, "module", model)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over every process (a new tensor); `t` itself for one process."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_batch_split(field: str, batch_size: int, processes: int, grad_accum: int) -> None:
    """A global batch every process takes an equal share of, in grad_accum equal micro-batches."""
    if batch_size % (processes * grad_accum):
        raise RecipeError(f"{field}: {batch_size} must divide by processes x grad_accum ({processes} x {grad_accum})")
