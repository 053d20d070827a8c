"""The one output-folder policy of every command that writes a folder.

A command writes only into a folder that is new, empty, or one the same kind of command wrote
itself (recognised by its signature file: ``index.json``, ``manifest.json``, a ``config.json``
of smi-hub, a training ``config.yaml``). Anything else is refused with an
:class:`OutputFolderError` that names ``--overwrite``. With ``overwrite=True`` the command writes
its own files beside the others and replaces only files of its own kind: it never deletes or
overwrites a file it did not write. While a command writes, it holds an exclusive OS lock
(``fcntl.flock`` on ``.NAME.lock`` beside the folder, released at exit or crash), so a second
run on the same output is refused instead of mixing two runs.

``claim_output_dir(path, kind)`` checks and locks; :func:`commit_folder` puts the new files in
place: a whole-folder atomic swap when the folder holds only the command's own files, else file
by file (signature file removed first and written last, so a reader sees the old output, the
new one, or none, never a mix).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smi_hub.errors import SMIHubError
from smi_hub.fileio import atomic_folder, current_umask, fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; no lock there
    fcntl = None  # type: ignore[assignment]

NAME_MAX = 200  # longest folder name accepted (its siblings add up to 13 characters)


class OutputFolderError(SMIHubError, ValueError):
    """An output folder cannot be written without losing someone else's files."""


@dataclass(frozen=True)
class Kind:
    """What one kind of command writes into its output folder."""

    signature: str  # the file that marks a folder as this kind's (written last)
    replaced: tuple[str, ...]  # name patterns a commit replaces as a set (stale ones removed)
    kept: tuple[str, ...] = ()  # run files the command manages itself (never removed here)
    marker: tuple[str, str] | None = None  # (key, value) the signature file's JSON holds

    def owns(self, name: str) -> bool:
        """Whether ``name`` is one of this kind's files (or a temporary file of one of them
        that a killed atomic write left, ``.NAME.XXXXXXXX.tmp``)."""
        tmp = _TMP.fullmatch(name)
        if tmp:
            name = tmp.group(1)
        return name == self.signature or any(
            re.fullmatch(p, name) for p in self.replaced + self.kept
        )


_TMP = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")


def _json_with(key: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and key in data

    return check


_CHECKPOINT = re.compile(r"(checkpoint_\d{8,}\.pt|last\.pt)(\.sha256)?|\..+\.tmp")
# run files that a user may also have: without the folder's signature, they count as a killed
# run's only when they hold what the run writes (a user's labels.json or checkpoints/ do not)
_RUN_FILE_CONTENT: dict[str, Callable[[Path], bool]] = {
    "labels.json": _json_with("label_fraction"),
    "metrics.json": _json_with("protocol"),
    "checkpoints": lambda p: p.is_dir() and all(_CHECKPOINT.fullmatch(c.name) for c in p.iterdir()),
}


def _is_run_file(path: Path, kind: Kind) -> bool:
    """Whether ``path`` is one of ``kind``'s run files, by name and, where a user's file could
    share the name, by content."""
    if not any(re.fullmatch(p, path.name) for p in kind.kept):
        return False
    check = _RUN_FILE_CONTENT.get(path.name)
    return check is None or check(path)


KINDS = {
    "index": Kind(
        "index.json",
        (r"embeddings\.safetensors", r"index\.faiss", r"vectors\.npy"),
        (),
        ("format", "smi-hub-index"),
    ),
    "features": Kind(
        "manifest.json",
        (r"shard-\d+\.safetensors", r"features\.npy", r"features\.safetensors", r"paths\.json"),
        (),
        ("format", "smi-hub-features"),
    ),
    "weights": Kind(
        "config.json",
        (r"model\.safetensors", r"README\.md"),
        (r"checkpoints", r"labels\.json", r"metrics\.json"),
        ("library", "smi-hub"),
    ),
    "pretrain": Kind(
        "config.yaml", (), (r"checkpoints", r"metrics\.jsonl", r"tb", r"eval", r"plots")
    ),
}


@dataclass
class Claim:
    """A checked, locked output folder. ``mode``: new, empty, own or shared (foreign files
    present, ``overwrite`` given: only own files are written)."""

    path: Path
    kind: str
    mode: str
    _lock: int | None = field(default=None, repr=False)
    _lock_path: Path | None = field(default=None, repr=False)

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file is removed while still held."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            if self._lock_path is not None:
                self._lock_path.unlink()
        os.close(self._lock)
        self._lock = None


def resolve_output(path: str | os.PathLike, flag: str = "the output folder") -> Path:
    """``path`` with ``~`` expanded and symlinks followed (writes go through a link to its
    target, the link stays); a clear error for empty or over-long names."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputFolderError(f"{flag} is empty; name the folder to write, e.g. out/.")
    p = Path(os.path.realpath(os.path.expanduser(text)))
    long = [part for part in p.parts if len(part) > NAME_MAX]
    if long or len(str(p)) > 4000:
        what = f"the name {long[0][:40]}... has {len(long[0])}" if long else "it is too long"
        raise OutputFolderError(
            f"{flag} {text[:60]}...: {what} characters; folder names may have at most "
            f"{NAME_MAX}. Choose a shorter name."
        )
    return p


def _is_signed(folder: Path, kind: Kind) -> bool:
    sig = folder / kind.signature
    if not sig.is_file():
        return False
    try:
        text = sig.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if kind.marker is None:  # training config.yaml: written by pretrain (output_dir key)
        return re.search(r"^output_dir:", text, re.MULTILINE) is not None
    try:
        data = json.loads(text)
    except ValueError:
        return False
    key, value = kind.marker
    return isinstance(data, dict) and data.get(key) == value


def folder_mode(folder: Path, kind: str, overwrite: bool, flag: str = "-o") -> str:
    """new, empty, own or shared; ``OutputFolderError`` when writing would risk other files."""
    spec = KINDS[kind]
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise OutputFolderError(f"{folder} is a file, not a folder; choose another output folder.")
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "empty"
    foreign = [n for n in names if not spec.owns(n)]
    run_files_only = all(_is_run_file(folder / n, spec) for n in names)
    if not foreign and (_is_signed(folder, spec) or run_files_only):
        return "own"  # a folder it wrote (or a run of it killed before its signature file)
    signed = _is_signed(folder, spec)
    clash = [n for n in names if spec.owns(n)]
    if overwrite and (signed or not clash):
        return "shared"
    if overwrite:  # files named like ours that we did not write: never overwritten
        raise OutputFolderError(
            f"{folder} holds {', '.join(clash[:3])}, which smi-hub {kind} did not write "
            f"(no valid {spec.signature} of its own); they are never overwritten, not even "
            "with --overwrite. Choose another output folder."
        )
    what = (
        f"files that smi-hub {kind} did not write ({', '.join(foreign[:3])}"
        f"{' ...' if len(foreign) > 3 else ''})"
        if foreign
        else f"files without a valid {spec.signature} of smi-hub {kind}"
    )
    raise OutputFolderError(
        f"{folder} holds {what}; it is not replaced. Choose a new or empty folder, or pass "
        "--overwrite (overwrite=True) to write beside them: then only smi-hub's own files of "
        "this kind are replaced, nothing else is deleted."
    )


def _lock(folder: Path) -> tuple[int | None, Path]:
    """Take the exclusive lock of ``folder`` (``.NAME.lock`` beside it)."""
    lock_path = folder.parent / f".{folder.name}.lock"
    if fcntl is None:
        return None, lock_path
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputFolderError(
                    f"Another smi-hub run is writing {folder} (it holds {lock_path}); wait for "
                    "it to finish or choose another output folder."
                ) from None
            raise
        try:  # the holder before us may have removed the file: lock the one on disk
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, lock_path
        os.close(fd)


def claim_output_dir(
    path: str | os.PathLike, kind: str, overwrite: bool = False, flag: str = "-o"
) -> Claim:
    """Check ``path`` against the policy and lock it; call ``.release()`` when done."""
    folder = resolve_output(path, flag)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd, lock_path = _lock(folder)
    try:
        mode = folder_mode(folder, kind, overwrite, flag)
        _clean_stale(folder, KINDS[kind])
    except BaseException:
        Claim(folder, kind, "new", fd, lock_path).release()
        raise
    return Claim(folder, kind, mode, fd, lock_path)


def _clean_stale(folder: Path, kind: Kind) -> None:
    """Remove temporary files a killed run of ours left beside and inside ``folder`` (we hold
    the lock, so none is in use)."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    for p in folder.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    for p in folder.iterdir() if folder.is_dir() else []:
        if _TMP.fullmatch(p.name) and kind.owns(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()


@contextlib.contextmanager
def commit_folder(claim: Claim, swap: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to write the new output into, then put it in place.

    ``swap`` and a folder holding only our files: the whole folder is exchanged atomically.
    Otherwise file by file: new files are renamed in, the new signature file last (until
    then the old one's checksums no longer match, so readers refuse the folder instead of
    mixing; the signature stays, so a re-run may finish the job), then stale files of our
    kind are removed."""
    if swap and claim.mode != "shared":
        with atomic_folder(claim.path) as tmp:
            yield tmp
        return
    spec = KINDS[claim.kind]
    parent = claim.path.parent
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{claim.path.name}.", suffix=".tmp"))
    try:
        yield tmp
        new = sorted(p.name for p in tmp.iterdir())
        for name in new:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp / name, 0o666 & ~current_umask())
        claim.path.mkdir(exist_ok=True)
        for name in new:
            if name != spec.signature:
                os.replace(tmp / name, claim.path / name)
        if spec.signature in new:
            fsync_dir(claim.path)
            os.replace(tmp / spec.signature, claim.path / spec.signature)
        for p in claim.path.iterdir():
            if p.name not in new and any(re.fullmatch(r, p.name) for r in spec.replaced):
                p.unlink()
        fsync_dir(claim.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
