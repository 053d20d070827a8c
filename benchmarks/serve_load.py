"""Loopback load test of ``smi-hub serve``: latency and throughput of ``POST /v1/search``.

Gallery: ``--per-class`` Fashion-MNIST test images per class (``smi_hub.default_gallery``),
indexed by ``smi-hub index`` as a flat and as an IVF index, embedded default model. For each
index and worker count, a server is started on 127.0.0.1, its workers' memory is read from
``/proc`` (RSS, and PSS: shared pages divided among the processes sharing them), and
``--requests`` image uploads (held-out Fashion-MNIST test images, PNG) are sent at each
concurrency by as many client threads. Reported: p50 / p99 latency and requests/s. Client and
server share the machine's cores, so absolute numbers are of this machine only.

    python benchmarks/serve_load.py --per-class 100 --requests 200 \\
        --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from smi_hub import fashion_mnist
from smi_hub.gallery import default_gallery

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict[str, float]:
    """MiB of RSS and PSS of each worker process under ``pid`` (uvicorn's parent excluded when
    it has workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # the multiprocessing resource tracker is a child too: workers are the ones that loaded torch
    rows = []
    for p in [int(k) for k in kids] or [pid]:
        fields = {}
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) / 1024
        if fields.get("Rss", 0) > 100:
            rows.append(
                {"pid": p, "rss_mib": round(fields["Rss"]), "pss_mib": round(fields["Pss"])}
            )
    return rows


def drive(base: str, queries: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    """``total`` searches by ``concurrency`` threads: latency percentiles and requests/s."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = client.post("/v1/search", files={"image": ("q.png", queries[i % len(queries)])})
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": total,
        "errors": errors[0],
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "requests_per_s": round(total / wall, 1),
    }


def serve(index: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smi_hub.cli", "serve", str(index), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", str(workers)], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/healthz").status_code == 200:
                # every worker answers once it is up; give the others time to load too
                for _ in range(4 * workers):
                    httpx.get(f"{base}/v1/healthz", timeout=600)
                return proc, base
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("serve did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--kinds", default="flat,ivf")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    images, _ = fashion_mnist.load_arrays("test")
    queries = []
    for a in images[-100:]:  # held out: the gallery takes the first images of each class
        buf = io.BytesIO()
        Image.fromarray(a, mode="L").save(buf, format="PNG")
        queries.append(buf.getvalue())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gallery = default_gallery(root=Path(tmp) / "gallery", per_class=args.per_class)
        for kind in args.kinds.split(","):
            index = Path(tmp) / kind
            cmd = [sys.executable, "-m", "smi_hub.cli", "index", str(gallery), "-o", str(index)]
            subprocess.run(
                [*cmd, "--kind", kind], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            for workers in map(int, args.workers.split(",")):
                proc, base = serve(index, workers)
                try:
                    mem = memory(proc.pid)
                    drive(base, queries, 4, 20)  # warm-up
                    for c in map(int, args.concurrency.split(",")):
                        row = {
                            "kind": kind,
                            "workers": workers,
                            **drive(base, queries, c, args.requests),
                        }
                        row["worker_rss_mib"] = [m["rss_mib"] for m in mem]
                        row["worker_pss_mib"] = [m["pss_mib"] for m in mem]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
    report = {
        "gallery_images": 10 * args.per_class,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    print(
        f"\n{'kind':5} {'workers':>7} {'conc':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'errors':>6}  RSS / PSS MiB per worker"
    )
    for r in rows:
        print(
            f"{r['kind']:5} {r['workers']:7d} {r['concurrency']:5d} {r['p50_ms']:8.1f} "
            f"{r['p99_ms']:8.1f} {r['requests_per_s']:7.1f} {r['errors']:6d}  "
            f"{r['worker_rss_mib']} / {r['worker_pss_mib']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
