# One command on one process or many: under torchrun (RANK/WORLD_SIZE set, one node or several) the loop runs with
# DDP or, by setting, FSDP (PyTorch's fully_shard, one shard unit per block); alone it runs plain. Sits around the
# loop: process group, model wrapper, gradient sync during accumulation, full state gathered for checkpoints.
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

# Our projector returns a view (nn.Linear on [B, Q, D]); nothing writes into it in place, which is what the warning
# is about, so it would only be noise in every FSDP run's log.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPProjector\) returned a view tensor")


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


def wrap(module: nn.Module, info: DistInfo, kind: str, half: torch.dtype | None) -> nn.Module:
    """DDP or FSDP around the training forward (tinygptv.train.forward.TrainForward); the module itself when alone.
    FSDP replaces every parameter by its shard: build the optimizer after this."""
    if kind not in ("ddp", "fsdp"):
        raise ValueError(f"distributed: {kind!r} is not 'ddp' or 'fsdp'")
    if not info.enabled:
        return module
    if kind == "fsdp":
        shard(module, info, half)
        return module
    # find_unused_parameters stays off: a recipe that mixes text-only and image samples would leave the image path
    # (projection, Q-Former or tower where they train) unused in some steps, but the training forward runs it on
    # every process in every micro-batch (on a blank image, weight 0, where a share has none), so no step skips a
    # parameter, and DDP's walk over the autograd graph looking for unused ones would only cost time.
    return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                   find_unused_parameters=False)


def shard(module: nn.Module, info: DistInfo, half: torch.dtype | None) -> None:
    """FSDP2 on `module.model`: one unit per vision block and per decoder layer, the Q-Former and the projection
    each one unit, the rest (embeddings, LM head, patch embedding) in the root. Frozen weights are sharded like the
    trained ones. With bf16/fp16 the blocks compute in that type from fp32 shards of the trained weights and reduce
    gradients in fp32; the Q-Former keeps its own type, as it does on one process."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mixed = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    model = module.model
    for block in repeated_blocks(model.visual_encoder) + repeated_blocks(model.llm):
        fully_shard(block, mesh=mesh, mp_policy=mixed)
    fully_shard(model.connector, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    fully_shard(model.projector, mesh=mesh, mp_policy=mixed)
    fully_shard(module, mesh=mesh, mp_policy=mixed)


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """The members of the outermost ModuleLists under `root`: a vision tower's blocks, an LM's decoder layers."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
            blocks.extend(module)
            taken.append(name)
    return blocks


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are reduced across processes only when `sync` (the
    last micro-batch of an optimizer step); the others accumulate locally (DDP's no_sync, FSDP's
    set_requires_gradient_sync)."""
    if isinstance(wrapped, DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
    yield


def _options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The trained weights (name -> full tensor) and the optimizer state (keyed by parameter name), gathered onto the
    first process's CPU; the other processes get empty dicts. Every process must call it."""
    options = _options(cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_trainable(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict | None) -> None:
    """The inverse of gather_trainable, on every process: each one keeps its shard (or its copy) of the full state.
    optim_state None leaves the optimizer alone."""
    set_model_state_dict(model, weights, options=_options(strict=False))
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_options())


def gather_objects(value: Any, info: DistInfo) -> list | None:
    """Every process's `value`, in rank order, on the first process (None elsewhere)."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).item()
