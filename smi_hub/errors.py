"""Exceptions raised by smi_hub. Each message says what was wrong and how to fix it."""

import re

# torch's weights_only unpickler names the global it refused ("Unsupported global: GLOBAL x.y"
# in some versions, "unsupported GLOBAL x.y" in others)
_REFUSED_GLOBAL = re.compile(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)


def refused_global(error: BaseException) -> str | None:
    """The Python global a ``torch.load(weights_only=True)`` refused to unpickle, if that is
    what ``error`` reports (its message also advises ``weights_only=False``: never relay it)."""
    found = _REFUSED_GLOBAL.search(str(error))
    return found.group(1) if found else None


class SMIHubError(Exception):
    """Base class of every smi_hub error."""


class WeightsError(SMIHubError, ValueError):
    """A weights folder or file is missing, corrupt, tampered with or for another architecture."""


class ChecksumError(WeightsError):
    """A weights file's sha256 differs from the one it was published with."""


class UnsupportedFormatError(WeightsError):
    """config.json was written by a newer smi-hub than the one installed."""


class WeightsNotPublishedError(SMIHubError):
    """A registry entry whose weights have not been trained and published yet."""


class ImageLoadError(SMIHubError, ValueError):
    """An image file could not be read or is unusable (corrupt, truncated, too large)."""


class DownloadError(SMIHubError, OSError):
    """A download failed: bad URL, HTTP error, network unreachable, or offline mode."""


class UploadError(DownloadError):
    """An upload to the Hugging Face Hub failed: network unreachable, offline mode, HTTP error
    (a ``DownloadError``, so one ``except`` handles every failed transfer)."""


class CheckpointError(SMIHubError, ValueError):
    """A file is not a usable smi-hub training checkpoint (wrong format, pickled objects, keys)."""


class NonFiniteError(SMIHubError, ValueError):
    """NaN or infinite values (or an all-zero vector) where finite vectors are required."""
