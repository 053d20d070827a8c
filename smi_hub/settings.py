"""smi-hub's settings from the environment: the cache folder and the offline switches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of smi-hub's cache: ``$SMI_HUB_CACHE`` or ``~/.cache/smi_hub`` (not created)."""
    env = os.environ.get("SMI_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "smi_hub"


def env_flag(var: str) -> bool:
    """True when the environment variable ``var`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when ``SMI_HUB_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return env_flag("SMI_HUB_OFFLINE") or env_flag("HF_HUB_OFFLINE")
