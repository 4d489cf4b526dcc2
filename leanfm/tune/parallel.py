"""What the trainer needs to know about the processes it runs in (one, or a torch.distributed group).

Parallel() is a single process. leanfm.tune.distributed builds the data-parallel (DDP) and sharded
(FSDP) versions: `wrap` puts the wrapper around the loss module, `all_reduce` sums across processes,
`full_params` makes a sharded model's parameters whole (for saving).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Parallel"]


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    kind: str = "none"  # none | ddp | fsdp
    wrap_fn: Callable[[nn.Module], nn.Module] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, loss_module: nn.Module) -> nn.Module:
        return loss_module if self.wrap_fn is None else self.wrap_fn(loss_module)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum of `t` over processes (in place; `t` itself in a single process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def full_params(self, runner: nn.Module) -> Iterator[None]:
        """Inside: every parameter of `runner` is a whole, ordinary tensor (FSDP: gathered, on all ranks)."""
        if self.kind != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in runner.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.unshard()
        try:
            with torch.no_grad():
                yield
        finally:
            for m in modules:
                m.reshard()
