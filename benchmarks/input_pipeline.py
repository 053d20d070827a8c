"""Input-pipeline cost of the ImageNet SMI recipe: what each DataLoader worker pays per image
(per core), today's all-on-CPU pipeline against the batched (GPU) one, and on a GPU the
pretraining rate fed from JPEG files against the step alone; the same for ``smi-hub extract``:
its per-file work with ``--decode cpu`` and ``--decode device`` (per core), and on a GPU its
images/s with either.

    python benchmarks/input_pipeline.py --images 200 --out benchmarks/results/input_pipeline_cpu.json
    python benchmarks/input_pipeline.py --device cuda --images 20000 --out r.json   # GPU machine
    python benchmarks/gpu_suite.py --steps input_pipeline --out r.json              # the same, as a suite step

The benchmark makes its own folder of ImageNet-sized JPEGs (500 x 375, quality 90): random
crops and flips of the real photos shipped with scikit-image and scikit-learn (or of
``data/photos/*.png`` that ``make gpu-data`` writes, where those packages are missing). Per-core
rows run in this process with one torch thread, every variant over the same files, interleaved
(best of ``--repeats`` passes). Prints a markdown table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import smi_hub  # noqa: E402
from smi_hub.feature_sources import _Files  # noqa: E402  (what `smi-hub extract` runs per file)
from smi_hub.images import load_image  # noqa: E402
from smi_hub.jpeg_decode import collate_encoded, device_decoder  # noqa: E402
from smi_hub.script_modules import load_file_module  # noqa: E402
from training import pretrain_data  # noqa: E402
from training.batch_augment import BatchAugment  # noqa: E402
from training.config_load import load_config  # noqa: E402
from training.data import ImageFolderDataset, two_view_transform  # noqa: E402

RECIPE = ROOT / "training" / "configs" / "imagenet_resnet50_smi.yaml"
SIZE = (500, 375)  # ImageNet's typical size (width x height)
PHOTO_DIR = ROOT / "data" / "photos"
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def source_photos() -> list[np.ndarray]:
    """Real colour photos (H x W x 3 uint8): scikit-image's and scikit-learn's, else the PNGs
    under data/photos/ (written by :func:`save_photos`)."""
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images

        photos = [np.asarray(getattr(data, n)())[..., :3] for n in SKIMAGE_PHOTOS]
        return photos + list(load_sample_images().images)
    except ImportError:
        files = sorted(PHOTO_DIR.glob("*.png"))
        if not files:
            raise SystemExit(
                "No photos: install scikit-image and scikit-learn, or run `make gpu-data` "
                "(writes data/photos/) before sending the checkout."
            ) from None
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def save_photos(folder: Path = PHOTO_DIR) -> None:
    """Write the source photos as PNG (for machines without scikit-image)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(source_photos()):
        Image.fromarray(p).save(folder / f"photo_{i:02d}.png")


def _write_chunk(args: tuple[str, int, int, int]) -> None:
    root, start, stop, seed = args
    photos = source_photos()
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(src[top : top + ch, left : left + cw]).resize(SIZE, Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        folder = Path(root) / f"class_{i % 10}"
        folder.mkdir(exist_ok=True)
        im.save(folder / f"{i:06d}.jpg", quality=90)


def make_jpeg_folder(root: Path, n: int, seed: int = 0, processes: int = 1) -> Path:
    """``n`` different 500 x 375 JPEGs (quality 90) in ten class folders under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    step = max(1, -(-n // (processes * 4)))
    chunks = [(str(root), s, min(n, s + step), seed) for s in range(0, n, step)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_chunk, chunks)
    else:
        for c in chunks:
            _write_chunk(c)
    return root


def recipe(folder: Path, device: str, *extra: str):
    """The ImageNet SMI recipe's config on ``folder`` (its data settings unchanged)."""
    overrides = [f"output_dir={tempfile.gettempdir()}/input_pipeline_run", f"data.path={folder}"]
    return load_config(RECIPE, overrides + [f"data.augment.device={device}"] + list(extra))


def per_core_variants(folder: Path, n: int) -> dict[str, Callable[[int], Any]]:
    """name -> a function of an item index (one image), all over the same files."""
    cfg = recipe(folder, "cpu")
    m, a = cfg.model, cfg.data.augment
    baseline = pretrain_data.build_train_dataset(cfg)
    batched = pretrain_data.build_train_dataset(recipe(folder, "gpu"), batched=True)
    files = ImageFolderDataset(folder).samples
    rrc = two_view_transform(m.image_size, m.mean, m.std, a)
    crop_only = [op.transforms[:2] for op in (rrc.view_a, rrc.view_b)]  # RandomResizedCrop, flip
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import Compose

    crops = [Compose(ops) for ops in crop_only]
    augment = BatchAugment(m.mean, m.std, max(a.blur_sigma), "cpu")
    group = 32
    batches = [  # the workers' output, made once here (not timed in the batched row)
        torch.utils.data.default_collate([batched[k] for k in range(s, min(n, s + group))])
        for s in range(0, n, group)
    ]

    eval_tf = smi_hub.get_transforms(
        smi_hub.SMIModel(arch="resnet50", projector_dims=[], image_size=m.image_size)
    )
    extract_files = _Files([f for f, _ in files], eval_tf)
    bare_tf = type(eval_tf)(eval_tf.transforms[1:])  # the same resize, crop, normalize
    decoder = device_decoder([f for f, _ in files], eval_tf, torch.device("cpu"), "device")
    encoded = [  # the device-decode workers' output, made once here (not timed below)
        collate_encoded([decoder.files[k] for k in range(s, min(n, s + group))])
        for s in range(0, n, group)
    ]

    def decode_on_cpu(i: int) -> None:
        if i % group == 0:
            decoder(encoded[i // group])

    def batched_cpu(i: int) -> None:
        if i % group == 0:
            va, vb, _ = batches[i // group]
            augment(va), augment(vb)

    return {
        "today: recipe dataset, all augmentations in the worker (build_train_dataset)": lambda i: (
            baseline[i]
        ),
        "batched path, worker part: decode + 2 crops + flips + parameters (CropTwoViews)": lambda i: (
            batched[i]
        ),
        "floor: load_image + 2 RandomResizedCrop + flip (PIL, torchvision v2)": lambda i: [
            c(load_image(files[i][0])) for c in crops
        ],
        "decode only: smi_hub.images.load_image (header checks, EXIF, RGB)": lambda i: load_image(
            files[i][0]
        ),
        "decode only: PIL Image.open(...).convert('RGB')": lambda i: Image.open(
            files[i][0]
        ).convert("RGB"),
        "decode only: torchvision.io.decode_jpeg": lambda i: decode_jpeg(read_file(files[i][0])),
        "extract: smi-hub extract's per-file work (load_image + get_transforms, 224 px)": lambda i: (
            extract_files[i]
        ),
        "extract floor: PIL open + convert + the same resize, crop, normalize": lambda i: bare_tf(
            Image.open(files[i][0]).convert("RGB")
        ),
        f"batched path, device part on this CPU (BatchAugment, batches of {group}, both views)": batched_cpu,
        "extract --decode device, worker part: header checks + read the bytes (EncodedFiles)": (
            lambda i: decoder.files[i]
        ),
        f"extract --decode device, device part on this CPU (decode_jpeg + resize, crop, normalize, batches of {group})": decode_on_cpu,
    }


def measure_per_core(folder: Path, n: int, repeats: int) -> list[dict[str, Any]]:
    """CPU ms per image of every variant: this process's CPU time (``time.process_time``,
    so other jobs on the machine do not count), one torch thread, variants interleaved, best
    of ``repeats`` passes; the wall time of the same pass is kept beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        variants = per_core_variants(folder, n)
        best = {name: (float("inf"), float("inf")) for name in variants}
        for fn in variants.values():  # warm-up
            fn(0)
        for _ in range(repeats):
            for name, fn in variants.items():
                c0, t0 = time.process_time(), time.perf_counter()
                for i in range(n):
                    fn(i)
                cpu, wall = (time.process_time() - c0) / n, (time.perf_counter() - t0) / n
                best[name] = min(best[name], (cpu, wall))
    finally:
        torch.set_num_threads(threads)
    base = next(iter(best.values()))[0]
    return [
        {
            "variant": name,
            "ms_per_image_per_core": round(1e3 * cpu, 3),
            "images_per_s_per_core": round(1 / cpu, 1),
            "cost_vs_today": round(cpu / base, 3),
            "wall_ms_per_image": round(1e3 * wall, 3),
        }
        for name, (cpu, wall) in best.items()
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_end_to_end(
    folder: Path,
    device: torch.device,
    model_args: dict[str, Any],
    batch_size: int,
    workers: int,
    steps: int,
    deadline: float = float("inf"),
) -> dict[str, Any]:
    """Pretraining steps fed from the JPEG folder (workers: decode + crop; BatchAugment on
    ``device``) against the same steps on one batch already on the device (step only)."""
    train_step = _train_step_module()
    ns = argparse.Namespace(seed=0, **model_args)
    runner = train_step.Runner(ns, "smi", device)
    cfg = recipe(folder, "gpu", f"model.image_size={model_args['image_size']}")
    dataset = pretrain_data.build_train_dataset(cfg, batched=True)
    prepare = pretrain_data.view_preparer(cfg, device, batched=True)
    prepare.channels_last = model_args["channels_last"]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,
    )
    fixed = None
    for va, vb, _ in loader:
        fixed = prepare(va), prepare(vb)
        break
    warm = 3
    for _ in range(warm):
        runner.step(*fixed)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(*fixed)
    _sync(device)
    step_only = steps * batch_size / (time.perf_counter() - t0)
    done, t0 = 0, None
    augment_s = 0.0
    while done < steps + warm and time.perf_counter() < deadline:
        for va, vb, _ in loader:
            if done == warm:
                _sync(device)
                t0 = time.perf_counter()
            ta = time.perf_counter()
            a, b = prepare(va), prepare(vb)
            augment_s += time.perf_counter() - ta if done >= warm else 0.0
            runner.step(a, b)
            done += 1
            if done >= steps + warm or time.perf_counter() > deadline:
                break
    _sync(device)
    timed = done - warm
    end_to_end = timed * batch_size / (time.perf_counter() - t0) if t0 and timed > 0 else None
    return {
        "images_per_s_step_only": round(step_only, 1),
        "images_per_s_end_to_end": None if end_to_end is None else round(end_to_end, 1),
        "end_to_end_over_step_only": None
        if end_to_end is None
        else round(end_to_end / step_only, 3),
        "timed_steps": timed,
        "host_ms_per_step_in_prepare": round(1e3 * augment_s / max(timed, 1), 2),
        "workers": workers,
        "batch_size": batch_size,
        "dataset_images": len(dataset),
        **{f"model_{k}": v for k, v in model_args.items()},
    }


EXTRACT_MODEL = {"arch": "resnet50", "base_width": 64, "image_size": 224}


def measure_extract(
    folder: Path,
    device: torch.device,
    workers: int,
    batch_size: int,
    images: int,
    model_args: dict[str, Any] = EXTRACT_MODEL,
    deadline: float = float("inf"),
) -> dict[str, Any]:
    """``smi-hub extract`` from the JPEG folder on ``device``, ``--decode cpu`` against
    ``--decode device`` (same files, model, batch, workers; bf16 and channels_last on CUDA):
    images/s end to end (DataLoader start included, after a warm-up run of each), and how far
    device decoding's preprocessed pixels and fp32 features are from the CPU path's on the
    first 256 files (nvjpeg is not libjpeg-turbo: this is the tolerance on that device)."""
    files = [f for f, _ in ImageFolderDataset(folder).samples][:images]
    torch.manual_seed(0)
    model = smi_hub.SMIModel(projector_dims=[], **model_args).eval().to(device)
    cuda = device.type == "cuda"
    kw = {
        "batch_size": batch_size, "num_workers": workers, "device": device, "progress": False,
        "channels_last": cuda, "amp_dtype": torch.bfloat16 if cuda else None,
    }  # fmt: skip
    out: dict[str, Any] = {
        "images": len(files),
        "workers": workers,
        "batch_size": batch_size,
        "model": {
            **model_args,
            "weights": "random init",
            **{k: str(kw[k]) for k in ("channels_last", "amp_dtype")},
        },
    }
    for mode in ("cpu", "device"):
        if time.perf_counter() > deadline:
            out["stopped"] = f"deadline before --decode {mode}"
            break
        smi_hub.extract_features(model, files[: 2 * batch_size], decode=mode, **kw)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        res = smi_hub.extract_features(model, files, decode=mode, **kw)
        _sync(device)
        rate = len(files) / (time.perf_counter() - t0)
        out[f"images_per_s_decode_{mode}"] = round(rate, 1)
        out[f"images_per_s_per_worker_decode_{mode}"] = round(rate / max(workers, 1), 1)
        out[f"rows_decode_{mode}"], out[f"failed_decode_{mode}"] = len(res), len(res.failed)
    if "images_per_s_decode_device" in out:
        out["device_over_cpu"] = round(
            out["images_per_s_decode_device"] / out["images_per_s_decode_cpu"], 3
        )
    tfm = smi_hub.get_transforms(model)
    sample = files[:256]
    decoder = device_decoder(sample, tfm, device, "device")
    x, idx, _, _ = decoder(collate_encoded([decoder.files[i] for i in range(len(sample))]))
    cpu_files = _Files(sample, tfm)
    ref = torch.stack([cpu_files[i][0] for i in idx]).to(device)
    std = torch.tensor(tfm.transforms[-1].std, device=device).view(1, 3, 1, 1)
    levels = ((x - ref) * std * 255).abs()
    with torch.inference_mode():
        fa, fb = model.embed(x.float()), model.embed(ref)
    out["pixels_vs_cpu_path"] = {
        "images": len(idx),
        "mean_grey_levels": round(levels.mean().item(), 4),
        "max_grey_levels": round(levels.max().item(), 2),
        "fraction_over_2_levels": round((levels > 2).float().mean().item(), 6),
        "max_feature_relative_error_fp32": round(
            ((fa - fb).norm(dim=1) / fb.norm(dim=1)).max().item(), 6
        ),
    }
    return out


def _train_step_module():
    return load_file_module("smi_benchmarks_train_step", ROOT / "benchmarks" / "train_step.py")


PAPER_MODEL = {
    "arch": "resnet50", "base_width": 64, "small_stem": False, "image_size": 224,
    "projector": [8192, 8192, 8192], "precision": "bf16", "channels_last": True,
}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    head = "| variant | ms / image / core | images/s / core | cost vs today |\n|---|---|---|---|"
    return "\n".join(
        [head]
        + [
            f"| {r['variant']} | {r['ms_per_image_per_core']:.2f} | "
            f"{r['images_per_s_per_core']:.0f} | {r['cost_vs_today']:.3f} |"
            for r in rows
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs to make (>= 20000 on a GPU)")
    p.add_argument("--per-core-images", type=int, default=200, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cuda: also the end-to-end rows")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="timed training steps (GPU)")
    p.add_argument("--folder", help="keep the JPEGs here (default: a temporary folder)")
    p.add_argument("--save-photos", action="store_true", help="write data/photos/ and exit")
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)
    if args.save_photos:
        save_photos()
        return 0
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        folder = Path(args.folder or tmp) / "jpegs"
        t0 = time.perf_counter()
        make_jpeg_folder(folder, args.images, processes=max(1, args.workers))
        made_s = time.perf_counter() - t0
        n = min(args.per_core_images, args.images)
        load_before = os.getloadavg()[0]
        rows = measure_per_core(folder, n, args.repeats)
        print(table(rows), flush=True)
        result: dict[str, Any] = {
            "command": "python benchmarks/input_pipeline.py " + " ".join(argv or sys.argv[1:]),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_1min_before_and_after": [load_before, os.getloadavg()[0]],
            },
            "torch": torch.__version__,
            "data": f"{args.images} JPEGs 500x375 quality 90 (random crops/flips of "
            "scikit-image and scikit-learn photos), made in "
            f"{made_s:.1f} s; per-core rows over the first {n}, best of {args.repeats}",
            "per_core": rows,
        }
        device = torch.device(args.device)
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
            result["end_to_end"] = measure_end_to_end(
                folder, device, PAPER_MODEL, args.batch_size, args.workers, args.steps
            )
            print(json.dumps(result["end_to_end"], indent=1), flush=True)
            result["extract"] = measure_extract(
                folder, device, args.workers, args.batch_size, min(args.images, 10_000)
            )
            print(json.dumps(result["extract"], indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
