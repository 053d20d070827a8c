"""Feature-extraction and retrieval throughput, measured against plain references in one run.

- extract_features (tensor input) vs a plain torchvision ResNet forward of the same weights on
  the same preprocessed images (``ratio`` = ours / plain; target >= 0.95);
- extract_features from PNG files vs torchvision DataLoader + forward on the same files;
- channels_last, bf16 autocast and torch.compile variants of the plain forward;
- EmbeddingIndex search (torch) vs faiss IndexFlatIP.

Images are real: Fashion-MNIST test photos (``apt-get install dataset-fashion-mnist``).

    python benchmarks/extract.py --arch resnet18 --image-size 64 --images 512 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import smi_hub
from smi_hub import fashion_mnist


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def paired(fa, fb, repeats: int) -> tuple[float, float]:
    """Best times of two functions measured alternately (a, b, a, b ...) after a warm-up each,
    so both see the same machine load; on a shared machine the best time is the stable one."""
    fa()
    fb()
    ta = tb = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        ta = min(ta, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb = min(tb, time.perf_counter() - t0)
    return ta, tb


def torchvision_twin(model: smi_hub.SMIModel) -> torch.nn.Module:
    """torchvision's ResNet with the model's backbone weights (standard width only)."""
    net = getattr(torchvision.models, model.arch)()
    net.fc = torch.nn.Identity()
    net.load_state_dict(model.backbone_state_dict(), strict=True)
    return net.eval()


class _Files(Dataset):
    def __init__(self, paths, tfm) -> None:
        self.paths, self.tfm = paths, tfm

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return self.tfm(Image.open(self.paths[i]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--index-size", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = smi_hub.SMIModel(arch=args.arch, projector_dims=[], image_size=args.image_size)
    model = model.eval().to(device)
    net = torchvision_twin(model).to(device)
    tfm = smi_hub.get_transforms(model)
    images, _ = fashion_mnist.load_arrays("test")
    pils = [Image.fromarray(images[i]) for i in range(args.images)]
    x = torch.stack([tfm(im) for im in pils])
    n, bs = len(x), args.batch_size

    def plain(net=net, memory_format=torch.contiguous_format, dtype=None):
        def run():
            with torch.inference_mode():
                ctx = (
                    torch.autocast(device.type, dtype=dtype)
                    if dtype
                    else torch.autocast(device.type, enabled=False)
                )
                with ctx:
                    for i in range(0, n, bs):
                        net(x[i : i + bs].to(device, memory_format=memory_format)).float().cpu()

        return run

    def ours(**kw):
        return lambda: smi_hub.extract_features(model, x, batch_size=bs, progress=False, **kw)

    rows = []

    def add(name, seconds, ref=None):
        row = {"variant": name, "images_per_s": round(n / seconds, 1)}
        if ref is not None:
            row["ratio_vs_plain"] = round(ref / seconds, 3)
        rows.append(row)
        return seconds

    r = args.repeats
    # interleave the pair so both see the same machine load
    t_plain = timed(plain(), r)
    t_ours = timed(ours(), r)
    t_plain = min(t_plain, timed(plain(), r))
    add("plain torchvision forward (fp32)", t_plain)
    add("extract_features (fp32)", t_ours, t_plain)
    cl = torch.channels_last
    net.to(memory_format=cl)
    t_plain_cl = timed(plain(memory_format=cl), r)
    net.to(memory_format=torch.contiguous_format)
    add("plain torchvision forward (channels_last)", t_plain_cl)
    add("extract_features (channels_last)", timed(ours(channels_last=True), r), t_plain_cl)
    t_plain_bf = timed(plain(dtype=torch.bfloat16), r)
    add("plain torchvision forward (bf16 autocast)", t_plain_bf)
    add("extract_features (bf16 autocast)", timed(ours(amp_dtype=torch.bfloat16), r), t_plain_bf)
    if args.compile:
        compiled = torch.compile(net)
        add("plain torchvision forward (torch.compile)", timed(plain(net=compiled), r))

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(pils):
            paths.append(Path(tmp) / f"{i:05d}.png")
            im.save(paths[-1])
        loader = DataLoader(_Files(paths, tfm), batch_size=bs)

        def plain_files():
            with torch.inference_mode():
                for b in loader:
                    net(b.to(device)).cpu()

        t_pf, t_of = paired(
            plain_files,
            lambda: smi_hub.extract_features(model, tmp, batch_size=bs, progress=False),
            r,
        )
        add("plain DataLoader + forward from PNG files", t_pf)
        add("extract_features from PNG files", t_of, t_pf)

    # retrieval
    g = torch.Generator().manual_seed(0)
    db = torch.randn(args.index_size, model.num_features, generator=g)
    q = torch.randn(args.queries, model.num_features, generator=g)
    index = smi_hub.EmbeddingIndex().add(db)
    search: list[dict] = []
    try:
        fidx = smi_hub.EmbeddingIndex(backend="faiss").add(db)
        t_torch, t_faiss = paired(lambda: index.search(q, k=10), lambda: fidx.search(q, k=10), r)
        search.append({"backend": "torch", "queries_per_s": round(len(q) / t_torch, 1)})
        same = torch.equal(index.search(q, 10).indices, fidx.search(q, 10).indices)
        search.append({"backend": "faiss IndexFlatIP", "queries_per_s": round(len(q) / t_faiss, 1)})
        search[0]["same_results_as_faiss"] = same
    except ImportError:
        t_torch = timed(lambda: index.search(q, k=10), r)
        search.append({"backend": "torch", "queries_per_s": round(len(q) / t_torch, 1)})

    result = {
        "data": f"Fashion-MNIST test photos, {n} images at {args.image_size} px (RGB-replicated)",
        "model": f"{args.arch} (random init; speed does not depend on the weights)",
        "batch_size": bs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "extraction": rows,
        "search": {"index_size": args.index_size, "dim": model.num_features, "k": 10},
        "search_results": search,
    }
    print(f"{result['data']}; {result['model']}; batch {bs}; {device}, {result['threads']} threads")
    print(f"{'variant':<46} {'images/s':>9} {'ratio':>7}")
    for row in rows:
        ratio = f"{row['ratio_vs_plain']:.3f}" if "ratio_vs_plain" in row else ""
        print(f"{row['variant']:<46} {row['images_per_s']:>9.1f} {ratio:>7}")
    print(f"\nsearch: {args.index_size} x {model.num_features} index, {len(q)} queries, k=10")
    for s in search:
        print(f"  {s['backend']:<20} {s['queries_per_s']:>10.1f} queries/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
