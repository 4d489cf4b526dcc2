"""Data-parallel (DDP) and sharded (FSDP) fine-tuning on torch.distributed, launched by torchrun:

    torchrun --nproc_per_node 2 -m leanfm.cli finetune --model M --method lora --data d.jsonl -o out \
        --distributed ddp          # or fsdp

Every process loads the model and adds the same adapter; `setup` joins the process group (gloo on CPU,
nccl on GPU) and returns a Parallel whose `wrap` puts DistributedDataParallel, or FSDP2's fully_shard
(each decoder layer, then the whole), around the trainer's loss module. Each process takes its slice of
every step's examples; the loss is normalised by the global token count, so a step equals the
single-process step on the same global batch. Only rank 0 writes files.

FSDP note: a resumed sharded run restores the adapter, step, schedule and RNG, but its optimizer moments
start over (sharded optimizer state is not checkpointed).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from leanfm.tune.config import AdapterError
from leanfm.tune.parallel import Parallel

__all__ = ["KINDS", "launched_by_torchrun", "setup", "teardown"]

KINDS = ("ddp", "fsdp")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _wrap_ddp(loss_module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_module)


def _wrap_fsdp(loss_module: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in loss_module.model.model.layers:
        fully_shard(layer)
    fully_shard(loss_module)
    return loss_module


def setup(kind: str) -> Parallel:
    """Join the torchrun process group and return the trainer's view of it."""
    if kind not in KINDS:
        raise AdapterError(f"--distributed must be one of {', '.join(KINDS)}, got {kind!r}")
    if not launched_by_torchrun():
        raise AdapterError("--distributed needs several processes: launch with torchrun --nproc_per_node N "
                           "-m leanfm.cli finetune ...")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same adapter init everywhere (add_adapter seeds it too)
    return Parallel(rank=rank, world=world, kind=kind, wrap_fn=_wrap_ddp if kind == "ddp" else _wrap_fsdp)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
