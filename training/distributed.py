"""torch.distributed helpers: process-group setup and an autograd-aware all-gather; the
mixed-precision context of a training step."""

from __future__ import annotations

import contextlib
import os

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


def local_rank() -> int:
    """This process's GPU index on its node (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: str = "auto") -> torch.device:
    """Initialize the process group when launched by ``torchrun`` and pick this rank's device.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cuda`` or ``cpu``. The backend is
    NCCL on GPU and gloo on CPU; rendezvous comes from torchrun's environment
    (``MASTER_ADDR``/``MASTER_PORT`` or ``--rdzv-endpoint``), so the same command works on one
    node and across nodes.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda was requested but no CUDA GPU is visible; use device=cpu or auto."
        )
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return dev


def cleanup_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronize all ranks (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks in place (no-op when not distributed) and return it."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_min_flag(flag: torch.Tensor) -> torch.Tensor:
    """True only if ``flag`` (a 0-d bool tensor) is true on every rank."""
    if not is_distributed():
        return flag
    x = flag.to(torch.int32).reshape(1)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x[0].bool()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (``fp32``: none, ``bf16``, else float16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
