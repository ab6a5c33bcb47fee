"""Scaling out with `torchrun`: the process group, DDP or FSDP2 wrapping, and full (unsharded) states for
checkpoints in the Hugging Face layout — PyTorch's own machinery, no launcher or communication of our own.

    torchrun --nproc_per_node 8 -m minir1 pretrain ... [--parallel ddp|fsdp]

Under torchrun (WORLD_SIZE > 1) the process group is NCCL on GPUs and gloo on the CPU. The global batch is
`batch_size` whatever the number of processes: the micro-batches of a step (batch_size / micro_batch_size
of them, rows of the step's batch, a deterministic function of (seed, step)) are dealt out to the
processes, so W processes compute exactly the gradient one process computes. Checkpoints hold full states (model in
HF layout, optimizer keyed by parameter name), so a run resumes with any number of processes.
Expert parallelism is not here: every process holds (DDP) or shards (FSDP2) all experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); returns the process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that lets stages read the model's own attributes (config, mtp, ...) through the wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, parallel: str, d: DistInfo) -> nn.Module:
    """DDP (a full replica per process) or FSDP2 (`fully_shard` per block, then the whole model)."""
    if not d.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        # The MTP modules stay in the root's group: their final norm is applied outside their forward.
        fully_shard(model)
        return model
    device_ids = [d.local_rank] if next(model.parameters()).device.type == "cuda" else None
    # Unused parameters are normal here (experts a micro-batch never routes to, MTP outside pretraining);
    # buffers are not broadcast: the routing biases move identically on every process (loads all-reduced).
    return _DDP(model, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(t: torch.Tensor) -> bool:
    """Whether FSDP2 sharded this parameter (a DTensor)."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full_model_state(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded model state (a collective under FSDP: every process must call it): on the first
    process only, on the CPU (for checkpoints), or on every process (`everywhere`, to generate from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=not everywhere))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """{"state": {param name: {...}}, "param_groups": [...]} on the first process ({} elsewhere): keyed by
    name, so a run resumes with any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap(model), opt,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), opt, state, options=StateDictOptions(full_state_dict=True))


def all_mean(values: dict[str, float], d: DistInfo) -> dict[str, float]:
    """The mean over processes of each value (one all-reduce)."""
    if not d.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(values, t.tolist())}


def all_sum(x: float, d: DistInfo) -> float:
    if not d.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def barrier(d: DistInfo) -> None:
    if d.enabled:
        dist.barrier()
