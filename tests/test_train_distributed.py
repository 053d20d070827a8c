"""Two gloo processes: the gradient pretrain computes (gathered loss x world size, averaged by
DDP) equals the single-process gradient of the same global batch, for every objective; with a
local loss (``gather=False``), the gradient of the mean of the per-process losses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from training import distributed as D
from training.losses import build_loss
from training.pretrain import backward_scale

N, D_IN, D_OUT = 8, 6, 16


def _data():
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    model = torch.nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(D_OUT, D_IN, generator=g))
    return x_a, x_b, model


def _worker(
    rank: int, world: int, init_file: str, name: str, out: dict, gather: bool = True
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x_a, x_b, model = _data()
        ddp = DistributedDataParallel(model)
        rows = slice(rank * N // world, (rank + 1) * N // world)
        loss_fn = build_loss(name, gather=gather)
        loss = loss_fn(ddp(x_a[rows]), ddp(x_b[rows]))
        (loss * backward_scale(loss_fn)).backward()  # what training.pretrain does
        assert backward_scale(loss_fn) == (D.world_size() if gather else 1)
        out[(name, rank)] = (float(loss), model.weight.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["smi", "barlow_twins", "vicreg"])
def test_two_process_gradient_equals_full_batch_gradient(tmp_path, name):
    x_a, x_b, model = _data()
    full = build_loss(name)(model(x_a), model(x_b))
    full.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), name, out), nprocs=2, join=True)
        results = dict(out)
    for rank in range(2):
        loss, grad = results[(name, rank)]
        assert loss == pytest.approx(float(full.detach()), rel=1e-5)
        torch.testing.assert_close(grad, model.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_local_loss_gradient_is_the_gradient_of_the_mean_local_loss(tmp_path):
    x_a, x_b, model = _data()
    halves = [slice(0, N // 2), slice(N // 2, N)]
    local = [build_loss("smi")(model(x_a[r]), model(x_b[r])) for r in halves]
    torch.stack(local).mean().backward()
    with mp.Manager() as manager:
        out = manager.dict()
        args = (2, str(tmp_path / "init"), "smi", out, False)
        mp.spawn(_worker, args=args, nprocs=2, join=True)
        results = dict(out)
    for rank in range(2):
        loss, grad = results[("smi", rank)]
        assert loss == pytest.approx(float(local[rank].detach()), rel=1e-5)
        torch.testing.assert_close(grad, model.weight.grad, rtol=1e-4, atol=1e-6)
