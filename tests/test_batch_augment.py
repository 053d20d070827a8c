"""The batched (GPU) augmentation path against the reference's distribution and operations.

Reference: facebookresearch/barlowtwins@8e8d284 ``main.py`` ``Transform`` (the same pair in
facebookresearch/vicreg ``augmentations.py``): RandomResizedCrop(224, bicubic), flip 0.5,
ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2, PIL GaussianBlur(sigma ~ U(0.1, 2))
with p=1.0 / 0.1, PIL solarize with p=0.0 / 0.2. Images are real photos (scikit-image).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from skimage import data as skdata
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import ColorJitter, GaussianBlur, RandomApply, RandomSolarize
from torchvision.transforms.v2 import functional as TF

from training import batch_augment as BA
from training import pretrain, pretrain_data
from training.config import AugmentConfig, ConfigError
from training.config_load import load_config
from training.data import ImageFolderDataset, SafeTwoViewDataset, two_view_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CONFIG = Path(__file__).parents[1] / "training" / "configs" / "fmnist_resnet18_smi.yaml"


def photo(name: str, size: tuple[int, int] = (224, 224)) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.BICUBIC)


def photo_batch(size: int = 48) -> torch.Tensor:
    return torch.stack([TF.pil_to_tensor(photo(n, (size, size))) for n in PHOTOS]).float() / 255


class PhotoSource(torch.utils.data.Dataset):
    """``n`` items cycling over a few small real photos."""

    def __init__(self, n: int, size: tuple[int, int] = (40, 30)) -> None:
        self.images = [photo(p, size) for p in PHOTOS]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.images[i % len(self.images)], -1


def draw_views(specs, n: int = 4000, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Both views' parameters of ``n`` items through the dataset (collated per view)."""
    ds = SafeTwoViewDataset(PhotoSource(n), BA.CropTwoViews(8, specs), seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=n)
    a, b, _ = next(iter(loader))
    return [BA.unpack(a["params"]), BA.unpack(b["params"])]


def check_reference_frequencies(views: list[dict[str, torch.Tensor]], h: int, w: int) -> None:
    """Every probability and range of the reference pair, view by view (5 binomial sd)."""

    def freq(x: torch.Tensor, p: float, what: str) -> None:
        n = x.numel()
        tol = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9
        assert abs(x.float().mean().item() - p) <= tol, f"{what}: {x.float().mean():.4f} vs {p}"

    blur_p, solarize_p = (1.0, 0.1), (0.0, 0.2)
    for v, view in enumerate(views):
        tag = "AB"[v]
        freq(view["flip"], 0.5, f"view {tag} flip")
        freq(view["jitter"], 0.8, f"view {tag} colour jitter")
        freq(view["gray"], 0.2, f"view {tag} grayscale")
        freq(view["sigma"] > 0, blur_p[v], f"view {tag} blur")
        freq(view["solarize"], solarize_p[v], f"view {tag} solarize")
        sigma = view["sigma"][view["sigma"] > 0]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0
        assert abs(sigma.mean().item() - 1.05) < 0.03 and sigma.max() > 1.95 and sigma.min() < 0.15
        f = view["factors"]
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert f[:, k].min() >= lo and f[:, k].max() <= hi, k
            assert f[:, k].min() < lo + 0.01 and f[:, k].max() > hi - 0.01, k
            assert abs(f[:, k].mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo) + 0.005, k
        order = view["order"]
        assert (order.sort(dim=1).values == torch.arange(4)).all()  # a permutation each
        _, counts = torch.unique(order, dim=0, return_counts=True)
        assert len(counts) == 24 and counts.min() > 0.6 * len(order) / 24  # all 24 orders
        top, left, ch, cw = view["crop"].T.double()
        frac = ch * cw / (h * w)
        assert frac.min() > 0.07 and frac.max() <= 1.0
        ratio = cw / ch
        assert ratio.min() > 0.7 and ratio.max() < 1.42
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + ch <= h).all() and (left + cw <= w).all()


@pytest.mark.slow
def test_view_parameters_follow_the_reference_pair():
    views = draw_views(BA.view_specs(AugmentConfig()))
    check_reference_frequencies(views, h=30, w=40)
    # the two views of one item are drawn independently
    assert (views[0]["crop"] != views[1]["crop"]).any(dim=1).float().mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("field", ["solarize_prob", "blur_prob"])
def test_swapped_view_probabilities_are_caught(field):
    """A planted swap of view A's and view B's probabilities fails the check above."""
    a, b = BA.view_specs(AugmentConfig())
    swapped = (
        dataclasses.replace(a, **{field: getattr(b, field)}),
        dataclasses.replace(b, **{field: getattr(a, field)}),
    )
    with pytest.raises(AssertionError, match="solarize|blur"):
        check_reference_frequencies(draw_views(swapped, n=2000), h=30, w=40)


def test_view_specs_read_each_view_from_the_config():
    cfg = AugmentConfig(blur_prob=[0.7, 0.3], solarize_prob=[0.1, 0.4])
    a, b = BA.view_specs(cfg)
    assert (a.blur_prob, b.blur_prob, a.solarize_prob, b.solarize_prob) == (0.7, 0.3, 0.1, 0.4)


def test_default_views_are_the_reference_pair_on_both_paths():
    """The documented defaults, view by view (blur 1.0 / 0.1, solarize 0.0 / 0.2), on the
    batched path and the per-image one; a cheap guard beside the slow frequency test above."""
    a, b = BA.view_specs(AugmentConfig())
    assert (a.blur_prob, b.blur_prob, a.solarize_prob, b.solarize_prob) == (1.0, 0.1, 0.0, 0.2)
    pair = two_view_transform(28, [0.5] * 3, [0.5] * 3, AugmentConfig())
    for view, blur, solarize in ((pair.view_a, 1.0, []), (pair.view_b, 0.1, [0.2])):
        applied = {
            type(op.transforms[0]): op.p for op in view.transforms if isinstance(op, RandomApply)
        }
        assert applied == {ColorJitter: 0.8, GaussianBlur: blur}
        assert [op.p for op in view.transforms if isinstance(op, RandomSolarize)] == solarize


@pytest.mark.slow
@pytest.mark.parametrize("size", [(375, 500), (500, 375), (100, 1000), (1000, 90)])
def test_crop_boxes_match_torchvision_random_resized_crop(size):
    """Same distribution as torchvision's ``RandomResizedCrop.get_params`` (the reference's
    crop): area fraction and aspect-ratio quantiles, and the centre-crop fallback exactly."""
    import random

    h, w = size
    n = 4000
    rng = random.Random(0)
    ours = torch.tensor([BA.crop_box(rng, h, w, (0.08, 1.0)) for _ in range(n)]).double()
    img = torch.zeros(1, h, w)
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ).double()
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for stat in (lambda c: c[:, 2] * c[:, 3] / (h * w), lambda c: torch.log(c[:, 3] / c[:, 2])):
        assert torch.allclose(stat(ours).quantile(q), stat(ref).quantile(q), atol=0.03)
    never = BA.crop_box(random.Random(1), h, w, (1.0, 1.0))  # whole area never fits the ratio
    assert never == tuple(RandomResizedCrop.get_params(img, [1.0, 1.0], [3 / 4, 4 / 3]))


@pytest.mark.slow
def test_crop_resize_is_close_to_pil_bicubic():
    """The workers resize crops as uint8 tensors (torchvision's antialiased bicubic); the
    reference resizes PIL images. Measured on 20 crops: at most 0.036 grey levels apart on
    average, at most 0.1 % of pixels more than 2 levels apart (up to 31 at a few pixels)."""
    import random

    rng = random.Random(0)
    for name in PHOTOS:
        im = photo(name, (500, 375))
        x = TF.pil_to_tensor(im)
        for _ in range(5):
            top, left, h, w = BA.crop_box(rng, 375, 500, (0.08, 1.0))
            ours = TF.resized_crop(
                x,
                top,
                left,
                h,
                w,
                [224, 224],
                antialias=True,
                interpolation=TF.InterpolationMode.BICUBIC,
            ).float()
            ref = TF.pil_to_tensor(
                im.resize((224, 224), Image.BICUBIC, box=(left, top, left + w, top + h))
            ).float()
            diff = (ours - ref).abs()
            off = (diff > 2).float().mean()
            assert diff.mean() <= 0.05 and off <= 0.005, (name, diff.mean(), off)


@pytest.mark.parametrize(
    ("ours", "ref", "lo", "hi"),
    [
        (BA.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (BA.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (BA.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
        (BA.adjust_hue, TF.adjust_hue, -0.1, 0.1),
    ],
)
def test_jitter_ops_equal_torchvision_per_sample(ours, ref, lo, hi):
    x = photo_batch()
    f = torch.linspace(lo, hi, len(x))
    expected = torch.stack([ref(x[i], float(f[i])) for i in range(len(x))])
    torch.testing.assert_close(ours(x.clone(), f), expected, rtol=0, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
def test_blur_equals_pil_gaussian_blur_on_real_photos(name):
    """Within 3 grey levels anywhere and 0.6 on average of ``ImageFilter.GaussianBlur(sigma)``
    (the reference's blur; PIL rounds to 8 bits after each of its six box passes); a true
    Gaussian is off by up to 21 levels (measured), so this pins PIL's kernel."""
    im = photo(name)
    x = TF.pil_to_tensor(im).float()[None] / 255
    radius = BA.blur_radius(2.0)
    for sigma in (0.1, 0.3, 0.5, 0.8, 1.0, 1.3, 1.6, 2.0):
        ours = (BA.gaussian_blur(x, torch.tensor([sigma]), radius) * 255).round()[0]
        ref = TF.pil_to_tensor(im.filter(ImageFilter.GaussianBlur(sigma))).float()
        diff = (ours - ref).abs()
        assert diff.max() <= 3 and diff.mean() <= 0.6, (sigma, diff.max(), diff.mean())


@pytest.mark.slow
def test_blur_uses_each_samples_sigma():
    x = photo_batch()
    sigma = torch.tensor([0.1, 2.0, 0.7, 1.3])
    batched = BA.gaussian_blur(x, sigma, BA.blur_radius(2.0))
    for i in range(len(x)):
        one = BA.gaussian_blur(x[i : i + 1], sigma[i : i + 1], BA.blur_radius(2.0))
        torch.testing.assert_close(batched[i : i + 1], one, rtol=0, atol=1e-6)


def test_solarize_and_grayscale_equal_pil():
    im = photo("coffee")
    x = TF.pil_to_tensor(im).float()[None] / 255
    aug = BA.BatchAugment([0, 0, 0], [1, 1, 1], 2.0)
    view = params_for(x, solarize=[True])
    ref = TF.pil_to_tensor(ImageOps.solarize(im, 128)).float() / 255
    torch.testing.assert_close(aug(view)[0], ref, rtol=0, atol=1e-6)
    gray = aug(params_for(x, gray=[True]))[0]
    ref_gray = TF.pil_to_tensor(im.convert("L")).float() / 255
    assert (gray * 255 - ref_gray * 255).abs().max() <= 1.0
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def params_for(x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """A collated view dict for float images ``x`` with identity parameters except ``kw``."""
    n = len(x)
    params = torch.zeros(n, len(BA.PARAMS))
    params[:, BA.COLUMN["brightness"] : BA.COLUMN["hue"]] = 1.0
    params[:, BA.COLUMN["order0"] : BA.COLUMN["order3"] + 1] = torch.arange(4.0)
    for k, v in kw.items():
        first = {"factors": "brightness", "order": "order0"}.get(k, k)
        v = torch.as_tensor(v, dtype=torch.float32)
        i = BA.COLUMN[first]
        params[:, i : i + (v.shape[1] if v.dim() == 2 else 1)] = v.view(n, -1)
    return {"image": (x * 255).round().to(torch.uint8), "params": params}


@pytest.mark.slow
def test_batch_augment_equals_the_per_image_chain_in_each_samples_order():
    """Whole chain on a batch = torchvision's per-image ops in the sample's drawn order,
    then grayscale, blur, solarize, normalize."""
    x = photo_batch()
    view = params_for(
        x,
        jitter=[True, True, False, True],
        factors=[[0.7, 1.3, 0.85, 0.07], [1.2, 0.65, 1.1, -0.09], [0.6, 0.6, 0.8, 0.1], [1.0, 1.4, 1.2, 0.02]],
        order=[[3, 1, 0, 2], [0, 2, 3, 1], [1, 0, 2, 3], [2, 3, 1, 0]],
        gray=[False, True, False, True],
        sigma=[1.2, 0.0, 0.4, 2.0],
        solarize=[True, False, True, False],
    )  # fmt: skip
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = BA.BatchAugment(mean, std, 2.0)(view)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    u = view["image"].float() / 255
    p = BA.unpack(view["params"])
    for i in range(len(x)):
        y = u[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                y = ops[op](y, float(p["factors"][i, op]))
        if p["gray"][i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p["sigma"][i] > 0:
            y = BA.gaussian_blur(y[None], p["sigma"][i : i + 1], BA.blur_radius(2.0))[0]
        if p["solarize"][i]:
            y = TF.solarize(y, 128 / 255)
        y = TF.normalize(y, mean, std)
        torch.testing.assert_close(out[i], y, rtol=0, atol=2e-5)


def _photo_folder(root: Path, n: int) -> None:
    """``n`` JPEGs (different crops of real photos) in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        src = np.asarray(photo(PHOTOS[i % len(PHOTOS)], (120, 90)))
        t, left = rng.integers(0, 30), rng.integers(0, 40)
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[t : t + 60, left : left + 80]).save(d / f"{i:03d}.jpg", quality=90)


@pytest.mark.slow
def test_batched_views_are_a_function_of_seed_epoch_and_index(tmp_path):
    """Same views whatever the number of workers, the batch composition, or a fresh dataset
    (a resume) in between; another epoch gives other views."""
    _photo_folder(tmp_path, 12)
    specs = BA.view_specs(AugmentConfig())
    aug = BA.BatchAugment([0.5] * 3, [0.25] * 3, 2.0)

    def views(num_workers: int, batch_size: int, epoch: int, start: int = 0) -> torch.Tensor:
        ds = SafeTwoViewDataset(ImageFolderDataset(tmp_path), BA.CropTwoViews(24, specs), seed=3)
        ds.set_epoch(epoch)
        sub = torch.utils.data.Subset(ds, range(start, len(ds)))
        loader = torch.utils.data.DataLoader(sub, batch_size, num_workers=num_workers)
        return torch.cat([torch.stack([aug(a), aug(b)], 1) for a, b, _ in loader])

    ref = views(0, 4, epoch=1)
    torch.testing.assert_close(views(2, 3, epoch=1), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(views(0, 5, epoch=1, start=5), ref[5:], rtol=0, atol=1e-6)
    assert not torch.allclose(views(0, 4, epoch=2), ref)


def test_unreadable_images_are_skipped_and_counted_on_the_batched_path(tmp_path, caplog):
    _photo_folder(tmp_path, 6)
    (tmp_path / "c0" / "000.jpg").write_bytes(b"not a jpeg" * 20)
    specs = BA.view_specs(AugmentConfig())
    ds = SafeTwoViewDataset(ImageFolderDataset(tmp_path), BA.CropTwoViews(16, specs))
    bad = [i for i, (p, _) in enumerate(ds.base.samples) if p.endswith("000.jpg")][0]
    with caplog.at_level("WARNING", logger="training.data"):
        a, b, skipped = ds[bad]
    assert skipped == 1 and a["image"].shape == (3, 16, 16) and a["image"].dtype == torch.uint8
    assert "000.jpg" in caplog.text


def test_augment_device_setting(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    assert cfg.data.augment.device == "auto"
    assert not pretrain_data.augment_on_device(cfg, torch.device("cpu"))
    assert pretrain_data.augment_on_device(cfg, torch.device("cuda"))
    cfg.data.augment.device = "gpu"
    assert pretrain_data.augment_on_device(cfg, torch.device("cpu"))
    cfg.data.augment.device = "cpu"
    assert not pretrain_data.augment_on_device(cfg, torch.device("cuda"))
    with pytest.raises(
        ConfigError, match=r"data.augment.device: 'tpu' is not one of auto, cpu, gpu"
    ):
        load_config(CONFIG, [f"output_dir={tmp_path}", "data.augment.device=tpu"])


@pytest.mark.slow
def test_pretraining_runs_with_the_batched_augmentation(tmp_path):
    import json

    _photo_folder(tmp_path / "data", 40)
    (tmp_path / "data" / "c1" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={out}", "data.source=imagefolder", f"data.path={tmp_path / 'data'}",
            "data.augment.device=gpu", "model.base_width=4", "model.projector_dims=[16,16]",
            "model.image_size=24", "train.batch_size=8", "train.epochs=1", "data.num_workers=0",
            "log.progress=false", "log.tensorboard=false", "log.monitor_samples=8",
            "data.max_bad_fraction=0.3", "train.channels_last=false",
        ],
    )  # fmt: skip
    pretrain.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["augment_device"] == "batched on cpu"
    epoch = [r for r in records if r["type"] == "epoch"][0]
    assert epoch["skipped_images"] >= 1 and math.isfinite(epoch["loss"])
    assert "backbone_std" in epoch  # the monitors went through the same batched path
