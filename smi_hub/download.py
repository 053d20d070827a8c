"""Downloading weights folders from http(s) URLs into a local cache, with sha256 checks.

A URL names either a weights **archive** (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) or a
**folder** (a URL ending in ``/``, or any other URL: then ``config.json``, ``model.safetensors``
and ``README.md`` are fetched from it). A ``#sha256=<hex>`` fragment (as pip uses) or the
``sha256`` argument pins the archive, or for a folder URL ``model.safetensors``; the sha256
recorded in ``config.json`` is always checked as well. Downloads go to a temporary file next to
their destination and are renamed into place only once complete and verified, so an
interrupted download never leaves a half-written file in the cache.

The cache is ``$SMI_HUB_CACHE`` or ``~/.cache/smi_hub``. ``SMI_HUB_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) turns downloads off: only cached entries are used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from smi_hub.errors import ChecksumError, DownloadError, WeightsError
from smi_hub.fileio import sha256_file
from smi_hub.settings import cache_dir, is_offline

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
_REQUIRED = ("config.json", "model.safetensors")
USER_AGENT = "smi-hub"


def is_url(value: object) -> bool:
    """True for strings starting with ``http://`` or ``https://``."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def split_sha256(url: str) -> tuple[str, str | None]:
    """Split a ``#sha256=<hex>`` fragment off ``url``: ``(url_without_fragment, hex or None)``."""
    base, _, fragment = url.partition("#")
    if fragment.startswith("sha256="):
        return base, _check_hex(fragment[len("sha256=") :], url)
    return base, None


def _check_hex(value: str, where: str) -> str:
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise DownloadError(f"{where}: sha256 must be 64 hex digits, got {value!r}.")
    return value


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file + rename), checking ``sha256``.

    Raises ``DownloadError`` for bad URLs, HTTP and network errors, and ``ChecksumError`` when
    the downloaded bytes do not have the expected sha256 (nothing is left behind then).
    """
    if not is_url(url):
        raise DownloadError(f"{url!r} is not an http(s) URL.")
    if is_offline():
        raise DownloadError(
            f"Cannot download {url}: offline mode is on (SMI_HUB_OFFLINE / HF_HUB_OFFLINE) and "
            f"it is not in the cache {cache_dir()}. Unset it or download once while online."
        )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"Downloading {url} failed: HTTP {e.code} {e.reason}.") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(
                f"Downloading {url} failed: {reason}. Check the URL and your network."
            ) from e
        from tqdm.auto import tqdm

        with response, os.fdopen(fd, "wb") as f:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar:
                try:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                except (OSError, urllib.error.URLError) as e:
                    raise DownloadError(f"Downloading {url} was interrupted: {e}.") from e
            f.flush()
            os.fsync(f.fileno())
            if total and total.isdigit() and f.tell() != int(total):
                raise DownloadError(
                    f"Downloading {url} was cut short: got {f.tell()} of {total} bytes."
                )
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ChecksumError(
                f"sha256 of {url} is {got}, expected {sha256.lower()}: the download is corrupt "
                "or the file on the server changed. Nothing was cached; check the URL and hash."
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _url_name(url: str) -> str:
    path = urllib.parse.urlparse(url).path
    return Path(path).name or "download"


def _archive_kind(url: str) -> str | None:
    path = urllib.parse.urlparse(url).path.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if path.endswith(suffix):
            return suffix
    return None


def _find_weights_root(folder: Path) -> Path:
    """The folder holding ``config.json`` inside an extracted archive (top level or one down)."""
    if (folder / "config.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise WeightsError(
        f"The archive extracted to {folder} holds {len(found) or 'no'} config.json files at its "
        "top level or one folder down; a weights archive must hold exactly one weights folder "
        "(config.json + model.safetensors + README.md)."
    )


def _safe_extract(archive: Path, kind: str, dest: Path) -> None:
    """Extract regular files only, refusing absolute paths, ``..`` and links."""
    try:
        if kind == ".zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = Path(info.filename)
                    if name.is_absolute() or ".." in name.parts:
                        raise WeightsError(f"{archive}: unsafe path {info.filename!r} in archive.")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise WeightsError(
            f"{archive} is not a readable {kind} archive ({type(e).__name__}: {e}); it may be "
            "truncated. Delete it from the cache and download again."
        ) from e


def fetch_weights_url(url: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download (or reuse from the cache) the weights folder at ``url``; return the local folder.

    ``sha256`` (or a ``#sha256=`` fragment) pins the archive, or ``model.safetensors`` for a
    folder URL. The cache entry is ``<cache_dir>/url/<hash of the URL>/``.
    """
    url, fragment_sha = split_sha256(url)
    if sha256 is not None:
        sha256 = _check_hex(sha256, url)
        if fragment_sha is not None and fragment_sha != sha256:
            raise DownloadError(f"{url}: the #sha256 fragment and the sha256 argument differ.")
    sha256 = sha256 or fragment_sha
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DownloadError(f"{url!r} is not a valid http(s) URL.")
    entry = cache_dir() / "url" / _url_key(url)
    kind = _archive_kind(url)
    if kind is not None:
        done = entry / "weights"
        marker = entry / "archive.sha256"
        cached = done.is_dir() and marker.is_file()
        if cached and (sha256 is None or marker.read_text().strip() == sha256):
            return _find_weights_root(done)
        entry.mkdir(parents=True, exist_ok=True)
        archive = download_file(url, entry / _url_name(url), sha256=sha256, progress=progress)
        got = sha256_file(archive)
        staging = Path(tempfile.mkdtemp(dir=entry, prefix=".extract."))
        try:
            _safe_extract(archive, kind, staging)
            _find_weights_root(staging)  # validate before publishing
            if done.exists():
                shutil.rmtree(done)
            os.replace(staging, done)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
            archive.unlink(missing_ok=True)
        marker.write_text(got + "\n")
        return _find_weights_root(done)

    # A folder URL: fetch the files of the weights folder one by one.
    base = url if url.endswith("/") else url + "/"
    entry.mkdir(parents=True, exist_ok=True)
    weights = entry / "model.safetensors"
    cached = weights.is_file() and (entry / "config.json").is_file()
    if cached and (sha256 is None or sha256_file(weights) == sha256):
        return entry
    for name in FOLDER_FILES:
        want = sha256 if name == "model.safetensors" else None
        try:
            download_file(base + name, entry / name, sha256=want, progress=progress)
        except DownloadError:
            if name in _REQUIRED:
                raise
    return entry
