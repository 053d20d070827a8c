"""Geometry of learned features on a test set: alignment, uniformity, rank, redundancy, spectrum.

    python -m training.geometry "SMI=smi_resnet18_fmnist" \
        "Barlow Twins=runs/fmnist_resnet18_barlow_twins/checkpoints/last.pt" \
        "random init=random:training/configs/fmnist_resnet18_smi.yaml" \
        --subset 2000 --out runs/geometry.json --plot docs/images/fmnist_geometry.png

Each ``LABEL=MODEL`` is a training checkpoint (``.pt``), a weights folder or registry name, or
``random:CONFIG`` (the recipe's architecture with random weights, ``--seed``). For the pooled
backbone features and, when the model still has its projector (training checkpoints), the
projector output, on ``--subset`` test images:

- ``alignment`` (Wang & Isola, 2020): mean ||f(x) - f(x')||^2 of L2-normalized features of two
  augmented views of each image (the recipe's augmentation pair, ``--config``); lower = views
  closer;
- ``uniformity`` (Wang & Isola, 2020): log mean exp(-2 ||f(x) - f(y)||^2) over pairs of
  normalized centre-image features; lower = more uniformly spread on the sphere;
- ``effective_rank`` (RankMe; Roy & Vetterli, 2007) of the centred centre-image features;
- ``redundancy``: mean |off-diagonal| of their feature correlation matrix (0 = decorrelated
  dimensions, 1 = every dimension a copy of the others);
- ``spectrum``: eigenvalues of their covariance (the variance along each principal dimension),
  sorted and normalized to sum 1; ``top10_variance`` is the share of the 10 largest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from smi_hub.cli_format import ArgumentParser
from smi_hub.errors import SMIHubError
from smi_hub.fileio import atomic_write_text
from smi_hub.models import SMIModel
from training.checkpoint import CheckpointError
from training.config import AugmentConfig, ConfigError
from training.config_load import load_config
from training.data import DataError, eval_transform, two_view_transform
from training.eval_data import Transformed, default_resize_ratio, labelled_source, load_model
from training.monitors import alignment, effective_rank, uniformity
from training.probes import EvalError

SPACES = ("backbone", "projector")
DEFAULT_CONFIG = "training/configs/fmnist_resnet18_smi.yaml"


def redundancy(features: torch.Tensor) -> float:
    """Mean absolute off-diagonal entry of the D x D feature correlation matrix (float64);
    constant dimensions count as uncorrelated."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True)
    x = torch.where(std > 0, x / std.clamp_min(1e-300), torch.zeros_like(x))
    corr = x.T @ x / (x.shape[0] - 1)
    d = corr.shape[0]
    off = corr[~torch.eye(d, dtype=torch.bool)]
    return float(off.abs().mean()) if d > 1 else 0.0


def variance_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Covariance eigenvalues, largest first, normalized to sum 1 (float64)."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    eig = torch.linalg.eigvalsh(x.T @ x / max(1, x.shape[0] - 1)).flip(0).clamp_min(0)
    total = eig.sum()
    return eig / total if total > 0 else eig


def geometry_metrics(
    centre: torch.Tensor, view_a: torch.Tensor, view_b: torch.Tensor
) -> dict[str, Any]:
    """All metrics of one feature space: N x D centre-image features and two views' features."""
    spectrum = variance_spectrum(centre)
    return {
        "dim": int(centre.shape[1]),
        "alignment": alignment(view_a, view_b),
        "uniformity": uniformity(centre),
        "effective_rank": effective_rank(centre),
        "redundancy": redundancy(centre),
        "top10_variance": float(spectrum[:10].sum()),
        "spectrum": spectrum.tolist(),
    }


@torch.no_grad()
def _features(
    model: SMIModel, dataset: torch.utils.data.Dataset, batch_size: int, desc: str
) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out: dict[str, list[torch.Tensor]] = {space: [] for space in SPACES}
    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, file=sys.stderr):
        h = model.embed(x)
        out["backbone"].append(h.float())
        if model.projector is not None:
            out["projector"].append(model.projector(h).float())
    return {k: torch.cat(v) for k, v in out.items() if v}


def measure(
    model: SMIModel,
    source: str = "fashion_mnist",
    path: str | None = None,
    split: str = "test",
    subset: int | None = 2000,
    augment: Any = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``{space: metrics}`` for the backbone (and projector, if any) of ``model``.

    The same ``subset`` of images and the same augmented views (``seed``) for every model."""
    model.eval()
    base = labelled_source(source, path, split, subset, seed)
    centre_tf = eval_transform(model.image_size, model.mean, model.std, default_resize_ratio(model))
    views = two_view_transform(model.image_size, model.mean, model.std, augment or AugmentConfig())
    centre = _features(model, Transformed(base, centre_tf), batch_size, "centre features")
    torch.manual_seed(seed)  # identical augmentations for every model
    a = _features(model, Transformed(base, views.view_a), batch_size, "view A features")
    b = _features(model, Transformed(base, views.view_b), batch_size, "view B features")
    return {space: geometry_metrics(centre[space], a[space], b[space]) for space in centre}


def _load(spec: str, seed: int) -> SMIModel:
    if spec.startswith("random:"):
        cfg = load_config(spec[len("random:") :]).to_dict()["model"]
        return load_model(random_init=True, model_config=cfg, seed=seed)[0]
    if spec.endswith(".pt"):
        return load_model(checkpoint=spec)[0]
    return load_model(weights=spec)[0]


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per model and feature space."""
    lines = [
        "| model | features | dim | alignment | uniformity | effective rank | redundancy "
        "| top-10 variance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, spaces in results.items():
        for space, m in spaces.items():
            lines.append(
                f"| {label} | {space} | {m['dim']} | {m['alignment']:.3f} | "
                f"{m['uniformity']:.3f} | {m['effective_rank']:.1f} | {m['redundancy']:.3f} | "
                f"{100 * m['top10_variance']:.1f} % |"
            )
    return "\n".join(lines) + "\n"


def plot(
    results: dict[str, dict[str, dict[str, Any]]],
    out: str | Path,
    title: str = "Backbone feature spectrum",
) -> Path:
    """Backbone variance spectra of every model, log scale (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, spaces in results.items():
        spectrum = spaces["backbone"]["spectrum"]
        ax.semilogy(range(1, len(spectrum) + 1), [max(v, 1e-12) for v in spectrum], label=label)
    ax.set_xlabel("principal dimension (sorted)")
    ax.set_ylabel("share of variance")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m training.geometry", description=__doc__)
    p.add_argument("models", nargs="+", help="LABEL=CHECKPOINT|FOLDER|NAME|random:CONFIG")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | imagefolder | hf")
    p.add_argument("--data-path", help="ImageFolder root or datasets folder")
    p.add_argument("--split", default="test", help="split whose images are measured")
    p.add_argument("--subset", type=int, default=2000, help="images used (all: 0)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe whose augmentations to use")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="image subset and augmentations")
    p.add_argument("--out", help="JSON of all metrics (and spectra)")
    p.add_argument("--plot", help="PNG of the backbone variance spectra")
    args = p.parse_args(argv)
    try:
        augment = load_config(args.config).data.augment
        results = {}
        for item in args.models:
            label, sep, spec = item.partition("=")
            if not sep or not label or not spec:
                raise EvalError(f"expected LABEL=MODEL, got {item!r}")
            results[label] = measure(
                _load(spec, args.seed), args.dataset, args.data_path, args.split,
                args.subset or None, augment, args.batch_size, args.seed,
            )  # fmt: skip
    except (EvalError, ConfigError, DataError, CheckpointError, SMIHubError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    table = markdown(results)
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(table)
    if args.plot:
        title = f"Backbone feature spectrum, {args.dataset} {args.split} images"
        plot(results, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
