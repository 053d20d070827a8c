"""Units of the training pipeline: checkpoints, optimizer/schedule, monitors, sampler, data."""

from __future__ import annotations

import io
import math
import os
import random
import re
import zipfile
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.data import ResumableSampler, SafeTwoViewDataset, two_view_transform
from training.monitors import alignment, collapse_metrics, effective_rank, embedding_std, uniformity
from training.optim import LARS, WarmupCosine, build_optimizer, param_groups


def test_checkpoints_are_atomic_kept_and_safe(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step, "model": {"w": torch.full((2,), float(step))}}, tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_00000030.pt",
        "checkpoint_00000040.pt",
    ]
    assert not list(tmp_path.glob(".*tmp"))
    assert find_latest(tmp_path).name == "last.pt"
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["format"] == "smi-hub-checkpoint" and state["step"] == 40
    assert load_checkpoint(tmp_path)["model"]["w"].tolist() == [40.0, 40.0]


def _crash_halfway_through_torch_save(monkeypatch):
    """torch.save writes half of its bytes, then the process 'dies' (an exception)."""
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
        else:
            Path(f).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", half_then_crash)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_crash_while_writing_leaves_every_checkpoint_readable(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # file systems without hard links: last.pt is a second atomic copy
        monkeypatch.setattr(os, "link", Mock(side_effect=OSError("no hard links")))
    save_checkpoint({"step": 10, "model": {"w": torch.full((64,), 10.0)}}, tmp_path)
    with monkeypatch.context() as m:
        _crash_halfway_through_torch_save(m)
        for step in (20, 10):  # a new checkpoint, and one overwriting an existing name
            with pytest.raises(KeyboardInterrupt):
                save_checkpoint({"step": step, "model": {"w": torch.zeros(64)}}, tmp_path)
    # a reader sees the old set: every checkpoint name holds a complete checkpoint
    finals = [*list_checkpoints(tmp_path), tmp_path / "last.pt"]
    assert [p.name for p in finals] == ["checkpoint_00000010.pt", "last.pt"]
    for p in finals:
        assert load_checkpoint(p)["model"]["w"].tolist() == [10.0] * 64
    assert load_checkpoint(tmp_path)["step"] == 10
    save_checkpoint({"step": 20, "model": {"w": torch.zeros(64)}}, tmp_path)  # recovers
    assert load_checkpoint(tmp_path)["step"] == 20


def test_load_checkpoint_rejects_foreign_and_unsafe_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an smi-hub training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "smi-hub-checkpoint", "obj": random.Random(0)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "smi-hub-checkpoint", "obj": random.Random(0)}, evil)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    assert str(e.value) == (
        f"{evil} contains non-tensor Python objects (random.Random) and is refused for safety: "
        "smi-hub loads checkpoints with torch.load(weights_only=True) and never unpickles "
        "arbitrary objects."
    )
    foreign = tmp_path / "foreign.pt"  # an intact zip archive that is not a torch checkpoint
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(foreign)
    assert str(e.value) == (
        f"{foreign} could not be read as a safe (weights_only) checkpoint (RuntimeError); it is "
        "truncated, corrupted or not a torch checkpoint."
    )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(junk)
    assert str(e.value).startswith(f"{junk} is not a torch checkpoint archive (")
    assert str(e.value).endswith(
        ") and has no .sha256 checksum file: it is truncated, overwritten or not a checkpoint."
    )


def test_load_checkpoint_reads_safely_on_the_asked_device(tmp_path, monkeypatch):
    """weights_only=True is passed explicitly (torch < 2.6, allowed by setup.cfg, defaults to
    False), and so is map_location."""
    save_checkpoint({"step": 1}, tmp_path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    load_checkpoint(tmp_path / "last.pt")
    load_checkpoint(tmp_path / "last.pt", map_location="meta")
    assert calls == [
        {"map_location": "cpu", "weights_only": True},
        {"map_location": "meta", "weights_only": True},
    ]


def test_checkpoint_versions_defaults_and_run_folders(tmp_path):
    run = tmp_path / "run"
    for step in range(1, 6):  # keep_last defaults to 3
        save_checkpoint({"step": step}, run / "checkpoints")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "checkpoint_00000003.pt",
        "checkpoint_00000004.pt",
        "checkpoint_00000005.pt",
    ]
    raw = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (raw["format"], raw["version"], raw["step"]) == ("smi-hub-checkpoint", 1, 5)
    assert load_checkpoint(run)["step"] == 5  # a run folder: its checkpoints/ subfolder
    # a checkpoint without a version (the first format) loads; a newer version is refused
    torch.save({"format": "smi-hub-checkpoint", "step": 7}, tmp_path / "v0.pt")
    assert load_checkpoint(tmp_path / "v0.pt")["step"] == 7
    torch.save({"format": "smi-hub-checkpoint", "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="version 2; this smi-hub reads up to 1"):
        load_checkpoint(tmp_path / "v2.pt")


def test_pruning_tolerates_checkpoints_without_sidecar(tmp_path):
    torch.save({"format": "smi-hub-checkpoint", "version": 1, "step": 1}, tmp_path / "x.pt")
    (tmp_path / "x.pt").rename(tmp_path / "checkpoint_00000001.pt")  # older smi-hub: no .sha256
    for step in (2, 3):
        save_checkpoint({"step": step}, tmp_path, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_00000003.pt"]


def test_damaged_sidecars_and_checkpoints_are_reported(tmp_path, caplog):
    save_checkpoint({"step": 1}, tmp_path, keep_last=5)
    save_checkpoint({"step": 2}, tmp_path, keep_last=5)
    last, two = tmp_path / "last.pt", tmp_path / "checkpoint_00000002.pt"
    for content in (b"", b"\xff\xfe not utf-8 \xff"):  # empty, undecodable
        (tmp_path / "checkpoint_00000001.pt.sha256").write_bytes(content)
        with pytest.raises(CheckpointError, match="does not hold a SHA-256 digest"):
            load_checkpoint(tmp_path / "checkpoint_00000001.pt")
    data = bytearray(two.read_bytes())
    data[-30] ^= 0xFF
    two.write_bytes(bytes(data))  # also damages last.pt: the same file (hard link)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(two)
    assert re.search(
        r"sha256 [0-9a-f]{12}\.\.\., expected [0-9a-f]{12}\.\.\.\): it was modified", str(e.value)
    )
    problems = []
    for p in (last, two):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        problems.append(str(e.value))
    (tmp_path / "checkpoint_00000001.pt.sha256").unlink()  # checkpoint 1: CRC-checked, intact
    with caplog.at_level("WARNING", logger="training.checkpoint"):
        assert find_latest(tmp_path) == tmp_path / "checkpoint_00000001.pt"
    assert caplog.records[-1].getMessage() == (
        f"Skipping damaged checkpoints: {' '.join(problems)} Using "
        f"{tmp_path / 'checkpoint_00000001.pt'}."
    )
    (tmp_path / "checkpoint_00000001.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as e:
        find_latest(tmp_path)
    assert str(e.value).startswith(f"No intact checkpoint in {tmp_path}: {' '.join(problems)} ")
    assert str(e.value).endswith(
        " Restore a checkpoint from a backup, or start a new run in another output_dir."
    )


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    random.seed(3)
    random.gauss(0.0, 1.0)  # and in Python's
    save_checkpoint({"step": 1, "rng": rng_state()}, tmp_path)
    expected = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0))
    set_rng_state(load_checkpoint(tmp_path)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0))
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    torch.rand(1, device="cuda")  # initializes CUDA
    save_checkpoint({"step": 1, "rng": rng_state()}, tmp_path)
    state = load_checkpoint(tmp_path, map_location="cpu")["rng"]
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_param_groups_exclude_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    decay, no_decay = param_groups(model, 1e-4, exclude_bias_bn=True)
    assert [p.ndim for p in decay["params"]] == [2]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert not no_decay["lars"]
    assert len(param_groups(model, 1e-4, exclude_bias_bn=False)) == 1


def test_lars_trust_ratio_scales_the_update():
    p = torch.nn.Parameter(torch.full((4,), 2.0))  # ||p|| = 4
    p.grad = torch.full((4,), 100.0)  # ||g|| = 200
    opt = LARS([{"params": [p], "lars": True}], lr=1.0, momentum=0.0, eta=0.5)
    opt.step()
    # update = lr * eta * ||p|| / ||g|| * g = 0.5 * 4 / 200 * 100 = 1
    assert torch.allclose(p.detach(), torch.full((4,), 1.0))


def reference_lars(params, grads, groups, steps):
    """LARS as in FAIR's Barlow Twins (main.py), element by element in float64: d = g + wd * p
    (adapted groups), d *= eta * ||p|| / ||d|| when both norms are > 0, mu = m * mu + d,
    p -= lr * mu. ``groups[i]`` = (lr, momentum, weight_decay, eta, lars) of params[i]."""
    ps = [[float(v) for v in p.flatten()] for p in params]
    mus = [[0.0] * len(p) for p in ps]
    for t in range(steps):
        for i, (lr, mom, wd, eta, adapt) in enumerate(groups):
            g = [float(v) for v in grads[t][i].flatten()]
            d = [gj + wd * pj for gj, pj in zip(g, ps[i], strict=True)] if adapt else g
            if adapt:
                pn = sum(v * v for v in ps[i]) ** 0.5
                dn = sum(v * v for v in d) ** 0.5
                q = eta * pn / dn if pn > 0 and dn > 0 else 1.0
                d = [v * q for v in d]
            mus[i] = [mom * m + dj for m, dj in zip(mus[i], d, strict=True)]
            ps[i] = [pj - lr * m for pj, m in zip(ps[i], mus[i], strict=True)]
    return [
        torch.tensor(p, dtype=torch.float64).reshape(q.shape)
        for p, q in zip(ps, params, strict=True)
    ]


def test_lars_with_momentum_and_weight_decay_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    init = [
        torch.randn(5, 3, generator=g, dtype=torch.float64),  # a weight: decayed and adapted
        torch.zeros(4, 2, dtype=torch.float64),  # ||p|| = 0: trust ratio 1
        torch.randn(3, generator=g, dtype=torch.float64),  # a bias: plain momentum SGD
        torch.randn(6, generator=g, dtype=torch.float64),  # adapted, no decay: ||d|| = 0 below
    ]
    steps = 4
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in init]]
    grads += [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in init]]
    grads += [[torch.zeros_like(init[0]), *grads[0][1:3], torch.zeros_like(init[3])]]
    grads += [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in init]]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = LARS(
        [
            {"params": params[:2], "lars": True},
            {"params": params[2:3], "lars": False, "weight_decay": 0.0, "lr": 0.05},
            {"params": params[3:], "lars": True, "weight_decay": 0.0},
        ],
        lr=0.3,
        momentum=0.9,
        weight_decay=0.2,
        eta=0.02,
    )
    for t in range(steps):
        for p, grad in zip(params, grads[t], strict=True):
            p.grad = grad.clone()
        opt.step()
    hp = (0.9, 0.2, 0.02)
    groups = [(0.3, *hp, True), (0.3, *hp, True), (0.05, 0.9, 0.0, 0.02, False)]
    groups.append((0.3, 0.9, 0.0, 0.02, True))
    expected = reference_lars(init, grads, groups, steps)
    for p, e, p0 in zip(params, expected, init, strict=True):
        assert not torch.equal(p.detach(), p0)
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_build_optimizer_kinds_and_hyperparameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sgd = build_optimizer(model, "sgd", 0.1, 1e-3, momentum=0.8)
    assert type(sgd) is torch.optim.SGD
    assert [(g["lr"], g["weight_decay"], g["momentum"]) for g in sgd.param_groups] == [
        (0.1, 1e-3, 0.8),
        (0.1, 0.0, 0.8),
    ]
    adamw = build_optimizer(model, "adamw", 0.01, 0.05, exclude_bias_bn=False)
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 1
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    lars = build_optimizer(model, "lars", 0.2, 1e-6, momentum=0.7, lars_eta=0.01)
    assert type(lars) is LARS
    assert [(g["momentum"], g["eta"], g["lars"]) for g in lars.param_groups] == [
        (0.7, 0.01, True),
        (0.7, 0.01, False),
    ]
    with pytest.raises(ValueError, match="Unknown optimizer"):
        build_optimizer(model, "adagrad", 0.1, 0.0)


def test_warmup_cosine_schedule_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupCosine(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(99):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3) and all(
        a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)
    )
    opt2 = torch.optim.SGD([p], lr=1.0)
    s2 = WarmupCosine(opt2, 100, 10, 0.01)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def cosine_reference(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("total, warmup", [(10, 0), (1, 0), (2, 1), (5, 5), (30, 4)])
def test_warmup_cosine_matches_the_formula_past_the_end(total, warmup):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 2.0}, {"params": [], "lr": 0.5}])
    s = WarmupCosine(opt, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.05)
    for step in range(total + 5):  # the LR stays at its minimum after the last step
        f = cosine_reference(step, total, warmup, 0.05)
        assert s.get_last_lr() == pytest.approx([2.0 * f, 0.5 * f], rel=1e-12)
        assert [g["lr"] for g in opt.param_groups] == s.get_last_lr()
        s.step()


def test_warmup_cosine_defaults_restart_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupCosine(opt, total_steps=4, warmup_steps=2)
    assert s.min_lr_ratio == 0.001 and opt.param_groups[0]["lr"] == 0.5
    # a second schedule on the same optimizer starts from the peak LR, not the warmed-up one
    again = WarmupCosine(opt, total_steps=4, warmup_steps=2)
    assert again.base_lrs == [1.0] and opt.param_groups[0]["initial_lr"] == 1.0
    assert s.state_dict() == {
        "name": "warmup_cosine",
        "step": 0,
        "total_steps": 4,
        "warmup_steps": 2,
        "min_lr_ratio": 0.001,
        "base_lrs": [1.0],
    }
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0})
    with pytest.raises(ValueError):  # a group the schedule does not know is not left unscheduled
        s.step()


def test_optimizer_defaults_and_frozen_parameters():
    p = torch.nn.Parameter(torch.zeros(2))
    assert LARS([p], lr=0.1).defaults == {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "eta": 0.001,
        "lars": True,
    }
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen layer first: the rest still trains
    decay, no_decay = param_groups(model, 1e-4, exclude_bias_bn=True)
    assert [tuple(p.shape) for p in decay["params"]] == [(2, 3)] and decay["weight_decay"] == 1e-4
    assert [tuple(p.shape) for p in no_decay["params"]] == [(3,), (2,)]
    lars = build_optimizer(model, "lars", 0.2, 1e-6)
    assert [(g["momentum"], g["eta"]) for g in lars.param_groups] == [(0.9, 0.001)] * 2


def test_collapse_monitors_on_known_cases():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 64, generator=g)
    collapsed = torch.ones(512, 64) + 1e-9 * torch.randn(512, 64, generator=g)
    assert embedding_std(spread) == pytest.approx(1.0, abs=0.05)
    assert embedding_std(collapsed) < 1e-3
    assert effective_rank(spread) > 50
    line = torch.randn(512, 1, generator=g) * torch.randn(1, 64, generator=g)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert alignment(spread, spread) == 0.0
    assert alignment(spread, -spread) == pytest.approx(4.0)
    assert uniformity(spread) < uniformity(spread[:, :2]) < 0
    assert set(collapse_metrics(spread, spread)) == {
        "std",
        "effective_rank",
        "alignment",
        "uniformity",
    }


def test_resumable_sampler_partitions_and_resumes():
    world = [ResumableSampler(100, 8, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in world:
        s.set_epoch(1)
    batches = [list(s) for s in world]
    assert len(batches[0]) == 6  # 100 // 16 full global batches
    flat = [i for b in batches[0] + batches[1] for i in b]
    assert len(flat) == len(set(flat)) == 96
    world[0].set_epoch(1, start_batch=4)
    assert list(world[0]) == batches[0][4:]
    world[0].set_epoch(2)
    assert list(world[0]) != batches[0]


def test_two_views_are_a_function_of_seed_epoch_index(fmnist_test):
    from PIL import Image

    images, labels = fmnist_test

    class Source(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return Image.fromarray(images[i], mode="L").convert("RGB"), int(labels[i])

    from training.config import AugmentConfig

    t = two_view_transform(28, [0.5] * 3, [0.5] * 3, AugmentConfig())
    ds = SafeTwoViewDataset(Source(), t, seed=0)
    a1, b1, _ = ds[3]
    torch.rand(5)  # global RNG use in between changes nothing
    a2, b2, _ = ds[3]
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a1)
    # grayscale input: all three channels stay equal through colour jitter and grayscale ops
    for i in range(8):
        a, b, _ = ds[i]
        assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])


def test_bias_bn_lr_ratio_sets_the_excluded_group_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, "lars", 1.6, 1.5e-6, bias_bn_lr_ratio=0.024)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.6, 0.0384])
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=0)
    sched.step()
    ratio = opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"]
    assert ratio == pytest.approx(0.024)
