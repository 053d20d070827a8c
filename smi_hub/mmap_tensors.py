"""A float32 tensor of a safetensors file, memory-mapped instead of read: processes that
open the same file (several ``smi-hub serve`` workers) share its pages in the OS page cache."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch


def mmap_tensor(path: str | os.PathLike, name: str) -> torch.Tensor | None:
    """Tensor ``name`` of the safetensors file ``path`` as a copy-on-write memory map (pages are
    read on first use and shared until written), or None when it is not a C-contiguous float32
    tensor of at least one element (callers then read the file with ``safetensors``)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > 100 << 20:
            return None
        try:
            header = json.loads(f.read(size))
        except ValueError:
            return None
    entry = header.get(name) if isinstance(header, dict) else None
    if not isinstance(entry, dict) or entry.get("dtype") != "F32":
        return None
    shape, (begin, end) = entry.get("shape"), entry.get("data_offsets", (0, -1))
    count = int(np.prod(shape)) if shape else 0
    if count == 0 or end - begin != 4 * count or 8 + size + end > os.path.getsize(path):
        return None
    array = np.memmap(path, dtype="<f4", mode="c", offset=8 + size + begin, shape=tuple(shape))
    return torch.from_numpy(array)
