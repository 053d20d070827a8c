"""``smi-hub demo`` (the Gradio page of a source checkout) and ``quickstart``; each command
imports what it runs (start-up time)."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from smi_hub.errors import SMIHubError
from smi_hub.script_modules import load_file_module


def demo_app_path() -> Path:
    """``demo/app.py`` of the source checkout this package was imported from."""
    import smi_hub

    return Path(smi_hub.__file__).resolve().parents[1] / "demo" / "app.py"


def cmd_demo(args: argparse.Namespace) -> int:
    path = demo_app_path()
    if not path.is_file():
        raise SMIHubError(
            f"The demo needs a source checkout: {path} does not exist. Clone the smi-hub "
            "repository, `pip install -e '.[demo]'` in it, and run `smi-hub demo` there."
        )
    module = load_file_module("smi_hub_demo_app", path, register=False)
    argv: list[str] = []
    for model in args.model or []:
        argv += ["--model", model]
    for flag in ("gallery", "index", "port", "host", "max_pixels"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.allow_any_model:
        argv.append("--allow-any-model")
    return int(module.main(argv) or 0)


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from smi_hub import fashion_mnist
    from smi_hub.features import extract_features
    from smi_hub.gallery import default_gallery, gallery_indices, label_of
    from smi_hub.hub import load
    from smi_hub.index import EmbeddingIndex

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load(args.model)
    gallery = default_gallery(per_class=args.per_class)
    print(f"Gallery: {gallery} (Fashion-MNIST test split, {args.per_class} images per class)")
    result = extract_features(model, gallery, progress=False)
    index = EmbeddingIndex().add(result.features, labels=[label_of(p) for p in result.paths])
    print(f"Indexed {len(index)} images with {args.model or 'smi_resnet18_fmnist'}.")

    # Held-out queries: test images of each class not in the gallery.
    images, labels = fashion_mnist.load_arrays("test")
    per_class_eval = max(1, -(-args.eval // len(fashion_mnist.CLASSES)))
    held_out = gallery_indices(labels, per_class_eval, offset=args.per_class)[: args.eval]
    from PIL import Image

    pils = [Image.fromarray(images[i], mode="L") for i in held_out]
    q = extract_features(model, pils, progress=False)
    found = index.search(q.features, k=args.k)
    truth = [fashion_mnist.CLASSES[int(labels[i])] for i in held_out]
    step = max(1, len(held_out) // max(1, args.queries))
    for n, j in enumerate(range(0, len(held_out), step)):
        if n >= args.queries:
            break
        print(f"\nquery: test image {held_out[j]} ({truth[j]})")
        for rank, (s, lab) in enumerate(
            zip(found.scores[j].tolist(), found.labels[j], strict=True)
        ):
            mark = "ok" if lab == truth[j] else "  "
            print(f"  {rank + 1}. {s:.3f}  {lab:<12} {mark}")
    votes = [Counter(row).most_common(1)[0][0] for row in found.labels]
    acc = 100.0 * sum(v == t for v, t in zip(votes, truth, strict=True)) / len(truth)
    top1 = 100.0 * sum(r[0] == t for r, t in zip(found.labels, truth, strict=True)) / len(truth)
    print(
        f"\n{args.k}-NN majority-vote accuracy on {len(truth)} held-out Fashion-MNIST test "
        f"images: {acc:.1f}% (nearest neighbour: {top1:.1f}%; chance 10%). "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    return 0
