# One command on one process or many: under torchrun (RANK/WORLD_SIZE set) the loop runs with DDP (gloo on the CPU,
# nccl on CUDA) or, by setting, FSDP; alone it runs plain. Sits around the loop: process group, model wrapper.
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def wrap(model: torch.nn.Module, info: DistInfo, kind: str):
    if not info.enabled:
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=info.device if
                                        info.device.type == "cuda" else None)
    if kind != "ddp":
        raise ValueError(f"distributed: {kind!r} is not 'ddp' or 'fsdp'")
    from torch.nn.parallel import DistributedDataParallel

    # Text-only batches leave the vision side unused, so some steps skip parameters.
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).item()
