"""Out-of-domain signal of ``smi_hub.ood``: detection rate on real out-of-domain photos and
false-alarm rate on in-domain queries, with the embedded default model.

Gallery: the first ``--gallery`` Fashion-MNIST *train* images, indexed with
``EmbeddingIndex.build`` (which records the gallery's own nearest-neighbour profile).
In domain: the first ``--queries`` Fashion-MNIST *test* images (not in the gallery).
Out of domain: scikit-image's bundled photos (colour and grey), scikit-learn's two sample
photos, and scikit-learn's 1,797 8x8 handwritten digits (grey strokes on black: the nearest
to Fashion-MNIST of the three). A query is flagged when ``verdict(...).in_domain`` is False.

    python benchmarks/ood_eval.py --gallery 10000 --queries 1000 --out benchmarks/results/ood.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.index import EmbeddingIndex
from smi_hub.ood import threshold_score, verdict

SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry", "coins", "camera", "cat", "moon", "page", "text", "clock",
    "horse", "grass", "gravel", "brick", "colorwheel", "logo",
)  # fmt: skip


def out_of_domain_sets() -> dict[str, list[Image.Image]]:
    """Real out-of-domain images that ship with scikit-image and scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_digits, load_sample_images

    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in SKIMAGE_PHOTOS]
    photos += [Image.fromarray(a) for a in load_sample_images().images]
    digits = [
        Image.fromarray((a * 255 / 16).astype(np.uint8), mode="L") for a in load_digits().images
    ]
    return {"photos (skimage + sklearn)": photos, "digits (sklearn 8x8)": digits}


def evaluate(gallery: int, queries: int, model: Any = None) -> dict[str, Any]:
    """Flag rates of each query set against a gallery of ``gallery`` train images."""
    model = smi_hub.load(model, progress=False) if not isinstance(model, torch.nn.Module) else model
    train, _ = fashion_mnist.load_arrays("train")
    test, _ = fashion_mnist.load_arrays("test")

    def embed(images: list[Image.Image]) -> torch.Tensor:
        return smi_hub.extract_features(model, images, progress=False).features

    t0 = time.perf_counter()
    g = embed([Image.fromarray(a, mode="L") for a in train[:gallery]])
    index = EmbeddingIndex.build(g, kind="flat")
    profile = index.metadata["neighbour_profile"]
    sets = {
        "in domain (Fashion-MNIST test)": [Image.fromarray(a, mode="L") for a in test[:queries]]
    }
    sets.update(out_of_domain_sets())
    rows = []
    for name, images in sets.items():
        top = index.search(embed(images), k=1).scores[:, 0].tolist()
        flagged = [verdict(s, profile).in_domain is False for s in top]
        rows.append(
            {
                "set": name,
                "images": len(images),
                "flagged": int(sum(flagged)),
                "rate": round(float(np.mean(flagged)), 4),
                "median_top_score": round(float(np.median(top)), 4),
            }
        )
    return {
        "gallery": gallery,
        "threshold_percentile": profile["threshold_percentile"],
        "threshold_score": round(threshold_score(profile), 4),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", type=int, default=10000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = evaluate(args.gallery, args.queries, args.model)
    print(
        f"gallery {report['gallery']} Fashion-MNIST train images; flagged when the top score "
        f"< {report['threshold_score']} (percentile {report['threshold_percentile']:g} of the "
        "gallery's own nearest-neighbour scores)"
    )
    print(f"{'query set':34} {'images':>7} {'flagged':>8} {'rate':>7} {'median top':>10}")
    for r in report["rows"]:
        print(
            f"{r['set']:34} {r['images']:7d} {r['flagged']:8d} {r['rate']:7.1%} "
            f"{r['median_top_score']:10.4f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
