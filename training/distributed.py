"""Distributed helpers shared by every contrastive loss.

Each rank computes the loss of its *local* rows against the *global* batch (all ranks' columns),
as open_clip's ``local_loss=True, gather_with_grad=True``. With the usual DDP gradient averaging
this gives exactly the gradient of the loss of one process over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    Every rank must pass a tensor of the same shape. Without a process group it returns ``x``.
    """
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    The same layer as SLIP's and CLIP 🚀's ``GatherLayer``. ``torch.distributed.nn``'s
    ``all_gather`` (deprecated) does the same through an all-to-all on gloo, and with torch 2.14
    that path now and then aborts the worker at exit ("terminate called without an active
    exception").
    """

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def local_targets(n_local: int, device=None) -> torch.Tensor:
    """Indices of this rank's positives among the gathered columns."""
    rank, _ = world_info()
    return torch.arange(n_local, device=device) + rank * n_local


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
