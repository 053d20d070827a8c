"""Fault injection at every commit point of one output-writing operation (run by
tests/test_outputs_faults.py in a subprocess: ``python tests/fault_driver.py OP FAULT DIR``).

A commit point is a call that changes what a reader sees: ``os.replace``, ``os.link`` and the
atomic folder exchange (``smi_hub.fileio._exchange``). For every point ``n`` the operation is
run in a forked child that is killed (``os._exit(137)``, no cleanup, like SIGKILL) just before
or just after call ``n``, or that gets ``ENOSPC`` there (a full disk). The parent then reads the
output with the real reader and records whether it is the old output, the new one, none (the
reader refuses it with smi-hub's error) or anything else; checks the user's file and the run's
own files; re-runs the operation without a fault and records the result and any litter left
beside the folder. Prints one JSON list.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import smi_hub
from smi_hub import fileio
from smi_hub.errors import SMIHubError
from smi_hub.outputs import claim_output_dir

torch.set_num_threads(1)


def _model(seed: int) -> smi_hub.SMIModel:
    torch.manual_seed(seed)
    cfg = dict(arch="resnet18", base_width=8, small_stem=True, projector_dims=[16], image_size=28)
    return smi_hub.SMIModel(**cfg).eval()


def _ops(base: Path):
    """(write(version, folder, overwrite), read(folder) -> comparable, values per version)."""
    images = {
        v: torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(v)) for v in (0, 1)
    }
    model = _model(0)
    ckpts = {}
    for v in (0, 1):
        path = base / f"run{v}" / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        m = _model(v)
        state = {"format": "smi-hub-checkpoint", "version": 1, "model": m.state_dict()}
        torch.save({**state, "model_config": m.config}, path)
        ckpts[v] = path

    def index_write(v, folder, overwrite):
        vec = torch.randn(7, 16, generator=torch.Generator().manual_seed(v))
        idx = smi_hub.EmbeddingIndex(kind="flat").add(vec, labels=[f"{v}-{i}" for i in range(7)])
        idx.save(folder, overwrite=overwrite)

    def extract_write(v, folder, overwrite):
        smi_hub.extract_features(
            model, images[v], out=folder, shard_size=2, progress=False, overwrite=overwrite
        )

    def export_write(v, folder, overwrite):
        from smi_hub.export import export_checkpoint

        export_checkpoint(ckpts[v], folder, overwrite=overwrite)

    def finetune_write(v, folder, overwrite):  # the final commit of training.finetune
        claim = claim_output_dir(folder, "weights", overwrite)
        try:
            (claim.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            (claim.path / "checkpoints" / "last.pt").write_text("run file")
            smi_hub.save_weights_folder(_model(v), claim.path, claim=claim)
            fileio.atomic_write_text(claim.path / "metrics.json", json.dumps({"v": v}))
        finally:
            claim.release()

    firsts = {v: next(iter(_model(v).parameters())).detach() for v in (0, 1)}

    def weights_read(folder):
        got = next(iter(smi_hub.load(folder).parameters())).detach()  # sha256-checked load
        return next((v for v, r in firsts.items() if torch.equal(got, r)), "other")

    refs = {v: smi_hub.extract_features(model, images[v], progress=False).features for v in (0, 1)}

    def extract_read(folder):
        got = smi_hub.FeatureStore.open(folder).to_tensor()
        close = [v for v, r in refs.items() if got.shape == r.shape and torch.allclose(got, r)]
        return close[0] if len(close) == 1 else "other"

    return {
        "index": (index_write, lambda f: int(smi_hub.EmbeddingIndex.load(f).labels[0][0])),
        "extract": (extract_write, extract_read),
        "export": (export_write, weights_read),
        "finetune": (finetune_write, weights_read),
    }


def _inject(n: int, when: str, fault: str) -> list[int]:
    """Make commit point ``n`` (1-based) fail; a counter of points is kept in ``calls``."""
    calls = [0]

    def hit() -> None:
        if fault == "kill":
            os._exit(137)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def wrap(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == n and when == "before":
                hit()
            result = fn(*a, **k)
            if calls[0] == n and when == "after":
                hit()
            return result

        return wrapped

    os.replace = wrap(os.replace)
    os.link = wrap(os.link)
    fileio._exchange = wrap(fileio._exchange)
    return calls


def _run(fn) -> int:
    """Run ``fn`` in a forked child; its exit status (0 ok, 1 error, 137 killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def main(op: str, fault: str, base: Path) -> None:
    write, read = _ops(base)[op]
    rows = []
    for variant in ("own", "shared"):
        root = base / variant
        root.mkdir()
        folder = root / "out"
        overwrite = variant == "shared"
        if overwrite:
            folder.mkdir()
            (folder / "notes.txt").write_text("the user's notes")
        write(0, folder, overwrite)
        snapshot = base / f"{variant}.snapshot"
        shutil.copytree(folder, snapshot, symlinks=True)
        kept = {k: v for k, v in _tree(folder).items() if k in ("notes.txt", "checkpoints/last.pt")}

        job = functools.partial(write, 1, folder, overwrite)

        def state(folder: Path = folder) -> str:
            try:
                value = read(folder)
            except SMIHubError as e:
                return f"none ({type(e).__name__})"
            except Exception as e:  # noqa: BLE001 - anything else is a failure to report
                return f"crash ({type(e).__name__}: {e})"
            return {0: "old", 1: "new"}.get(value, f"mixed ({value})")

        total = _count(job)
        _restore(root, snapshot, folder)
        for n in range(1, total + 1):
            for when in ("before", "after"):

                def faulty(n=n, when=when, job=job):
                    _inject(n, when, fault)
                    job()

                code = _run(faulty)
                row = {"variant": variant, "points": total, "point": n, "when": when}
                row["exit"] = code
                row["state"] = state()
                tree = _tree(folder) if folder.is_dir() else {}
                row["user_files_kept"] = all(tree.get(k) == v for k, v in kept.items())
                row["litter_after_fault"] = sorted(
                    p.name for p in root.iterdir() if p.name != "out"
                )
                row["rerun_exit"] = _run(job)
                row["rerun_state"] = state()
                row["litter_after_rerun"] = sorted(
                    p.name for p in root.iterdir() if p.name != "out"
                )
                tree = _tree(folder)
                row["user_files_kept_after_rerun"] = all(tree.get(k) == v for k, v in kept.items())
                rows.append(row)
                _restore(root, snapshot, folder)
    print(json.dumps(rows))


def _restore(root: Path, snapshot: Path, folder: Path) -> None:
    """Back to the old output (and nothing beside it) for the next point."""
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.copytree(snapshot, folder, symlinks=True)


def _count(fn) -> int:
    """Commit points of a fault-free run of ``fn`` (in a forked child)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        calls = _inject(0, "never", "none")
        fn()
        os.write(w, str(calls[0]).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return int(data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
