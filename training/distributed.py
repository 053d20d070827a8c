"""torch.distributed helpers: process-group setup and an autograd-aware all-gather."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the gradient.

    Every rank computes the same full-batch loss from the gathered tensor, so the gradient
    arriving at this rank's slice is already the full-batch gradient w.r.t. its own samples:
    no reduction is needed (summing over ranks would multiply it by the world size).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes_list = [int(s.item()) for s in sizes]
        if len(set(sizes_list)) != 1:
            raise ValueError(
                f"All ranks must contribute the same number of samples to the loss, got "
                f"{sizes_list}; use drop_last=True in the DataLoader/DistributedSampler."
            )
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = rank(), x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order); identity when not distributed.

    Gradients flow back to each rank's own rows. With DDP, which averages gradients over
    ranks, scale the loss by ``world_size()`` before ``backward`` to get the full-batch
    gradient (``training.pretrain`` does).
    """
    return _GatherWithGrad.apply(x) if is_distributed() else x
