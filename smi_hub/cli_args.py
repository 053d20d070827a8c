"""The checks of ``smi-hub``'s arguments made before any work starts (``UsageError``, exit
status 2), and the settings several commands read from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smi_hub.errors import SMIHubError


class UsageError(SMIHubError):
    """A command-line argument that cannot work (exit status 2, before any work is done)."""


def check_device(device: str) -> None:
    """``UsageError`` unless ``device`` names a device that exists here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"--device {device!r} is not a device name ({e}); use cpu, cuda, cuda:N or mps."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(
                f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                "False); use --device cpu, or install a CUDA build of PyTorch on a GPU machine."
            )
        if dev.index is not None and dev.index >= count:
            raise UsageError(
                f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to "
                f"cuda:{count - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: smi-hub runs on cpu, cuda or mps.")


OUTPUT_KINDS = {"extract": "features", "index": "index", "export": "weights"}


def check_output(path: str, flag: str, kind: str | None = None, overwrite: bool = False) -> None:
    """``UsageError`` unless an output folder can be created or replaced at ``path`` under the
    output policy of ``kind`` (``smi_hub.outputs``): checked before any work so that a bad
    ``-o`` does not throw away a long computation."""
    import tempfile

    from smi_hub.outputs import OutputFolderError, folder_mode, resolve_output

    if not path.strip():
        raise UsageError(f"{flag} is empty; give the folder to write, e.g. {flag} out/.")
    try:
        out = resolve_output(path, flag)
        if kind is not None and out.is_dir():
            folder_mode(out, kind, overwrite, flag)
    except OutputFolderError as e:
        raise UsageError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{flag} {out} exists and is not a folder; pick another path or remove the file."
        )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is a file, so no folder can be created there.")
    for where in [out] * out.is_dir() + [parent]:
        try:
            Path(tempfile.mkdtemp(dir=where, prefix=".smi-hub-write-test.")).rmdir()
        except OSError as e:
            raise UsageError(
                f"{flag} {out}: cannot write in {where} ({e.strerror or e}); pick a folder you "
                "can write to."
            ) from None


def check_args(args: argparse.Namespace) -> None:
    """Checks every argument that can be checked before the work starts (``UsageError``)."""
    for attr in ("input", "folder", "index_dir", "checkpoint", "model"):
        if getattr(args, attr, None) == "":
            raise UsageError(f"the {attr.upper()} argument is empty; give a path or name.")
    for attr in ("query", "images"):
        values = getattr(args, attr, None)
        if isinstance(values, list) and any(not v.strip() for v in values):
            raise UsageError(f"an {attr.upper()} argument is empty; give image paths.")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "command", None) == "index":
        from smi_hub.refine import refine_conflict

        conflict = refine_conflict(args.kind, args.refine)
        if conflict:
            raise UsageError(
                f"--refine {args.refine} with --kind {args.kind}: {conflict}. Drop --refine (or "
                "--refine 0), or re-rank compressed codes: --kind ivfpq or ivfsq."
            )
    for attr, flag in (("out", "-o/--out"), ("out_dir", "OUT_DIR")):
        if getattr(args, attr, None) is not None:
            kind = OUTPUT_KINDS.get(args.command)
            check_output(getattr(args, attr), flag, kind, getattr(args, "overwrite", False))


def amp_dtype(args: argparse.Namespace) -> Any:
    """The autocast dtype ``--bf16`` asks for (None: full precision)."""
    import torch

    return torch.bfloat16 if getattr(args, "bf16", False) else None
