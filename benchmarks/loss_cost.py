"""Cost of the loss alone: SMI vs Barlow Twins vs VICReg, forward + backward on N x D embeddings.

    python benchmarks/loss_cost.py --out benchmarks/results/loss_cost.json   # full grid, CPU
    python benchmarks/loss_cost.py --quick                                     # N 128/256
    python benchmarks/loss_cost.py --device cuda --out loss_cost_gpu.json     # one GPU

Every objective runs on the same random float32 ``z_a, z_b`` (requires_grad) in the same
process; after one warm-up call per objective the objectives are timed alternately, call by
call, so machine load affects them alike. Reported per case and objective:

* ``seconds``: median wall time of ``loss(z_a, z_b).backward()`` (3 calls; 2 when one call
  takes over 2 s, 1 over 8 s, to keep the full grid within minutes);
* ``peak_bytes``: peak memory above the level just before the call, during one call (after a
  warm-up call on a tiny batch of the same width). On CPU (Linux) it is measured in a separate
  child process: its peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each call) minus its resident size before the call, with
  glibc's malloc told (``mallopt``) to serve every allocation over 64 KiB by ``mmap`` and to
  return freed memory at once, so the resident size follows the live tensors instead of
  malloc's free lists (a separate process because those settings slow the timed calls down).
  On CUDA it is ``max_memory_allocated`` minus ``memory_allocated`` before the call. Both
  include the two N x D input gradients (``2 N D 4`` bytes, reported as ``grad_bytes``),
  which every objective produces;
* ``time_ratio_to_smi`` / ``memory_ratio_to_smi``: the objective's cost over SMI's.

SMI builds N x N matrices (O(N^2 D) time, O(N^2) memory beyond the N x D inputs), Barlow
Twins and VICReg D x D ones (O(N D^2), O(D^2)); the crossover N where SMI becomes the costlier
one is reported per D, measured when inside the grid, else extrapolated from the largest N
measured (the time ratio falls as 1/N once both costs are dominated by their matmuls).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.losses import build_loss  # noqa: E402

LOSSES = ("smi", "barlow_twins", "vicreg")
FULL_N = (128, 256, 512, 1024, 2048)
QUICK_N = (128, 256)
DIMS = (2048, 8192)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class PeakMemory:
    """Peak memory of a call above the level before it (see the module docstring)."""

    def __init__(self, device: torch.device, tune_malloc: bool = False) -> None:
        self.device = device
        self.method = "unavailable (needs Linux /proc/self/clear_refs)"
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the call"
        elif sys.platform.startswith("linux") and self._can_reset_hwm():
            self.method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the call"
            if tune_malloc:
                try:
                    libc = ctypes.CDLL("libc.so.6")
                    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
                    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)
                    self.method += "; glibc mallopt mmap and trim thresholds 64 KiB"
                except (OSError, AttributeError):  # not glibc: RSS may hide reused memory
                    pass

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self._base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current VmRSS

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if not self.method.startswith("VmHWM"):
            return None
        return self._status("VmHWM") - self._base


def make_inputs(n: int, d: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Two correlated views (a shared signal plus noise), float32, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    z_a = (base + 0.5 * torch.randn(n, d, generator=g)).to(device).requires_grad_(True)
    z_b = (base + 0.5 * torch.randn(n, d, generator=g)).to(device).requires_grad_(True)
    return z_a, z_b


def _call(fn, z_a: torch.Tensor, z_b: torch.Tensor) -> float:
    z_a.grad = z_b.grad = None
    t0 = time.perf_counter()
    fn(z_a, z_b).backward()
    if z_a.device.type == "cuda":
        torch.cuda.synchronize(z_a.device)
    return time.perf_counter() - t0


def measure_times(
    n: int, d: int, losses: list[str], device: torch.device, seed: int, max_reps: int = 3
) -> dict:
    """Median forward+backward seconds of each objective, measured alternately (``max_reps``
    calls each; 2 when the warm-up call took over 2 s, 1 over 8 s)."""
    z_a, z_b = make_inputs(n, d, device, seed)
    fns = {name: build_loss(name, gather=False) for name in losses}
    warm = {name: _call(fns[name], z_a, z_b) for name in losses}  # warm-up, not recorded
    reps = {
        name: 1 if warm[name] > 8 else min(2, max_reps) if warm[name] > 2 else max_reps
        for name in losses
    }
    times: dict[str, list[float]] = {name: [] for name in losses}
    for rep in range(max(reps.values())):
        for name in losses if rep % 2 == 0 else losses[::-1]:
            if rep < reps[name]:
                times[name].append(_call(fns[name], z_a, z_b))
    return {name: {"seconds": statistics.median(t), "times": t} for name, t in times.items()}


def measure_memory(
    n: int, d: int, losses: list[str], device: torch.device, seed: int, meter: PeakMemory
) -> dict[str, int | None]:
    """Peak extra bytes of one forward+backward of each objective, after a warm-up call on a
    tiny batch of the same width (first-call buffers of the libraries are not counted)."""
    out: dict[str, int | None] = {}
    for name in losses:
        fn = build_loss(name, gather=False)
        _call(fn, *make_inputs(8, d, device, seed))
        z_a, z_b = make_inputs(n, d, device, seed)
        z_a.grad = z_b.grad = None
        meter.start()
        _call(fn, z_a, z_b)
        out[name] = meter.stop()
        del z_a, z_b
    return out


def memory_in_child(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> dict:
    """Run the memory pass in a fresh process: its malloc settings (see PeakMemory) would slow
    down the timings, and a fresh heap holds nothing freed by the timing pass."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", "--device", "cpu"]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed), "--losses", *args.losses]
    cmd += ["--sizes", *[f"{n}x{d}" for n, d in sizes]]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"memory pass failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def add_ratios(case: dict) -> dict:
    ref = case["losses"].get("smi")
    for row in case["losses"].values():
        if ref is None:
            continue
        row["time_ratio_to_smi"] = row["seconds"] / ref["seconds"]
        row["memory_ratio_to_smi"] = (
            row["peak_bytes"] / ref["peak_bytes"]
            if row.get("peak_bytes") is not None and ref.get("peak_bytes")
            else None
        )
    return case


def _fit2(xs: list[float], ys: list[float], f1, f2) -> tuple[float, float]:
    """Least-squares ``y ~ p * f1(x) + q * f2(x)``."""
    s11 = sum(f1(x) ** 2 for x in xs)
    s12 = sum(f1(x) * f2(x) for x in xs)
    s22 = sum(f2(x) ** 2 for x in xs)
    t1 = sum(f1(x) * y for x, y in zip(xs, ys, strict=True))
    t2 = sum(f2(x) * y for x, y in zip(xs, ys, strict=True))
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def crossover(cases: list[dict], d: int) -> dict | None:
    """The N where SMI's time reaches Barlow Twins' at width ``d``: interpolated when it lies
    inside the measured sizes; else extrapolated from fits of the cost models at this D,
    SMI ``a N^2 + b N`` (matmuls O(N^2 D), elementwise O(N D)) and Barlow Twins ``c + e N``
    (elementwise O(D^2), matmuls O(N D^2)), and, as a cross-check, from the time ratio at the
    largest N assuming it falls as 1/N."""
    rows = sorted(
        (c for c in cases if c["d"] == d and {"smi", "barlow_twins"} <= set(c["losses"])),
        key=lambda c: c["n"],
    )
    if not rows:
        return None
    ratios = [(c["n"], c["losses"]["barlow_twins"]["time_ratio_to_smi"]) for c in rows]
    for (n0, r0), (n1, r1) in zip(ratios, ratios[1:], strict=False):
        if r0 >= 1 > r1:  # log-linear interpolation between the bracketing sizes
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return {"n": round(n0 * (n1 / n0) ** t), "how": f"measured between N={n0} and {n1}"}
    if ratios[0][1] < 1:
        return {"n": ratios[0][0], "how": "SMI already costlier at the smallest N measured"}
    n_max, r_max = ratios[-1]
    by_ratio = round(n_max * r_max)
    out = {
        "n": by_ratio,
        "n_ratio_rule": by_ratio,
        "how": f"extrapolated: time ratio {r_max:.2f} at N={n_max} falling as 1/N",
    }
    if len(rows) >= 3:
        ns = [float(c["n"]) for c in rows]
        a, b = _fit2(
            ns, [c["losses"]["smi"]["seconds"] for c in rows], lambda n: n * n, lambda n: n
        )
        c0, e = _fit2(
            ns, [c["losses"]["barlow_twins"]["seconds"] for c in rows], lambda n: 1.0, lambda n: n
        )
        if a > 0 and c0 > 0:  # a N^2 + (b - e) N - c0 = 0
            n_fit = (-(b - e) + math.sqrt((b - e) ** 2 + 4 * a * c0)) / (2 * a)
            out.update(
                n=round(n_fit),
                n_fit=round(n_fit),
                how=(
                    f"extrapolated from fitted cost models (SMI a N^2 + b N, Barlow Twins "
                    f"c + e N at D={d}); the time ratio {r_max:.2f} at N={n_max} falling as "
                    f"1/N gives {by_ratio:,}"
                ),
            )
    return out


def fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.1f}x"


def markdown(cases: list[dict], losses: list[str]) -> str:
    lines = [
        "| N | D | " + " | ".join(f"{n} ms" for n in losses) + " | "
        + " | ".join(f"{n} MiB" for n in losses) + " | "
        + " | ".join(f"{n}/smi time | {n}/smi memory" for n in losses if n != "smi") + " |",
    ]  # fmt: skip
    lines.append("|" + "---|" * (2 + 2 * len(losses) + 2 * (len(losses) - 1)))
    for c in cases:
        row = c["losses"]
        cells = [str(c["n"]), str(c["d"])]
        cells += [f"{row[n]['seconds'] * 1e3:,.0f}" for n in losses]
        cells += [fmt_bytes(row[n]["peak_bytes"]) for n in losses]
        for n in losses:
            if n != "smi":
                cells += [
                    fmt_ratio(row[n].get("time_ratio_to_smi")),
                    fmt_ratio(row[n].get("memory_ratio_to_smi")),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_N} only")
    p.add_argument("--n", type=int, nargs="+", help=f"batch sizes (default {FULL_N})")
    p.add_argument("--d", type=int, nargs="+", help=f"embedding widths (default {DIMS})")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, extra intra-op threads wait "
        "for busy cores and the timings measure the load, not the objective; 0: torch's choice)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", nargs="+", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    losses = (
        ["smi", *[n for n in args.losses if n != "smi"]] if "smi" in args.losses else args.losses
    )

    if args.memory_child:  # internal: the CPU memory pass, JSON on stdout
        meter = PeakMemory(device, tune_malloc=True)
        result = {"method": meter.method, "peaks": {}}
        for size in args.sizes:
            n, d = (int(v) for v in size.split("x"))
            result["peaks"][size] = measure_memory(n, d, losses, device, args.seed, meter)
        print(json.dumps(result))
        return 0

    sizes = [
        (n, d) for d in (args.d or DIMS) for n in (args.n or (QUICK_N if args.quick else FULL_N))
    ]
    t_start = time.perf_counter()
    cases = []
    for n, d in sizes:
        case = {"n": n, "d": d, "grad_bytes": 2 * n * d * 4}
        case["losses"] = measure_times(n, d, losses, device, args.seed)
        cases.append(case)
        print(
            f"N={n} D={d}: "
            + ", ".join(f"{k} {v['seconds'] * 1e3:,.0f} ms" for k, v in case["losses"].items()),
            file=sys.stderr,
            flush=True,
        )
    method = "not measured (--no-memory)"
    if not args.no_memory:
        if device.type == "cuda":
            meter = PeakMemory(device)
            peaks = {
                f"{n}x{d}": measure_memory(n, d, losses, device, args.seed, meter) for n, d in sizes
            }
            method = meter.method
        else:
            child = memory_in_child(args, sizes)
            peaks, method = child["peaks"], child["method"]
        for case in cases:
            for name, peak in peaks[f"{case['n']}x{case['d']}"].items():
                case["losses"][name]["peak_bytes"] = peak
    for case in cases:
        for row in case["losses"].values():
            row.setdefault("peak_bytes", None)
        add_ratios(case)
    crossovers = {str(d): crossover(cases, d) for d in dict.fromkeys(d for _, d in sizes)}
    print(markdown(cases, losses))
    for d, c in crossovers.items():
        if c is not None:
            print(f"\nD={d}: SMI costlier than Barlow Twins from N ~ {c['n']:,} ({c['how']})")
    meta = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "timing": "median of loss(z_a, z_b).backward() wall times after one warm-up call",
        "memory_method": method,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"settings": meta, "cases": cases, "crossover": crossovers}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
