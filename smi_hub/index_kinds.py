"""Index kinds: their faiss factory strings for a vector count and a memory budget, their
search knobs, what to change when a build misses its recall target, and faiss itself
(:func:`import_faiss`: the approximate kinds need it).

Kinds (faiss ``index_factory`` strings on L2-normalized vectors, inner product):

- ``flat``: exact search, vectors in memory (torch matmul + top-k, or faiss ``IndexFlatIP``);
- ``ivf`` (``IVF{nlist},Flat``), ``ivfsq`` (``IVF{nlist},SQfp16``: 2 bytes per dimension, or
  ``SQ8``: 1 byte, when 16-bit does not fit the memory budget),
  ``ivfpq`` (``IVF{nlist},PQ{m}x4fs``: 4-bit fast-scan PQ, m / 2 bytes per vector),
  ``hnsw`` (``HNSW32,Flat``);
- ``auto``: picks one from the vector count and a memory budget, as autofaiss does: exact
  ``flat`` up to :data:`FLAT_MAX` vectors, else the most precise IVF kind whose vectors fit.
"""

from __future__ import annotations

import warnings
from typing import Any

from smi_hub.argtypes import in_range

KINDS = ("flat", "ivf", "ivfsq", "ivfpq", "hnsw", "auto")
FLAT_MAX = 100_000  # auto: exact search up to this many vectors (a few ms per query)
DEFAULT_BUDGET = 2 << 30
KNOBS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PQ_MIN_TRAIN = 39 * 16  # ivfpq: faiss' 39 points for each of a 4-bit codebook's 16 centroids


def check_knob(value: Any, name: str) -> int | None:
    """A search knob (``nprobe``, ``ef_search``, ``train_size``): None or an integer >= 1."""
    return None if value is None else int(in_range(value, name, 1, integer=True))


def warn_unused_knobs(
    kind: str, nprobe: int | None, ef_search: int | None, refine: Any = None
) -> None:
    """One warning for a search knob the index ``kind`` does not have (it would be ignored)."""
    unused = [
        name
        for name, value, kinds in (("nprobe", nprobe, ("ivf", "ivfsq", "ivfpq")),
                                   ("ef_search", ef_search, ("hnsw",)),
                                   ("refine", refine or None, ("ivfsq", "ivfpq")))
        if value is not None and kind not in kinds
    ]  # fmt: skip
    if unused:
        what = "exact search" if kind == "flat" else "no such knob"
        warnings.warn(
            f"{' and '.join(unused)} ignored: a {kind} index has {what} (nprobe is for IVF "
            "kinds, ef_search for hnsw, refine for compressed codes: ivfsq, ivfpq).",
            stacklevel=3,
        )


def nlist(n: int) -> int:
    """IVF cells: a power of two near 4 sqrt(n), at most n / 39 (faiss' training minimum)."""
    target = max(1, min(4 * int(n**0.5), n // 39))
    return 1 << max(0, target.bit_length() - 1)


def ivf_bytes(n: int, dim: int, code_bytes: float) -> float:
    """Memory of an IVF index of ``n`` vectors stored in ``code_bytes`` per dimension: the codes
    with a 10% margin for inverted lists growing as vectors are added, plus the centroids, the
    ids and some slack."""
    return 1.1 * n * dim * code_bytes + nlist(n) * dim * 4 + n * 8 + (64 << 20)


def factory_string(kind: str, n: int, dim: int, memory_budget: int = DEFAULT_BUDGET) -> str:
    """The faiss ``index_factory`` string of ``kind`` for ``n`` vectors of ``dim``
    (``auto``: chosen for the budget; see the module docstring)."""
    cells = nlist(n)
    if kind == "auto":
        if n <= FLAT_MAX and n * dim * 4 <= memory_budget:
            kind = "flat"
        elif ivf_bytes(n, dim, 4) <= memory_budget:
            kind = "ivf"
        elif ivf_bytes(n, dim, 1) <= memory_budget:
            kind = "ivfsq"
        else:
            kind = "ivfpq"
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{cells},Flat"
    if kind == "ivfsq":  # 16-bit floats when they fit the budget, else 8-bit codes
        fp16 = ivf_bytes(n, dim, 2) <= memory_budget
        return f"IVF{cells},{'SQfp16' if fp16 else 'SQ8'}"
    if kind == "ivfpq":  # 4-bit fast-scan PQ: m / 2 bytes per vector
        m = dim // 2 if dim % 2 == 0 else dim
        while m % 4 == 0 and n * (m // 2 + 8) > memory_budget:
            m //= 2
        return f"IVF{cells},PQ{m}x4fs"
    if kind == "hnsw":
        return "HNSW32,Flat"
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}.")


def kind_of(factory: str) -> str:
    """The kind of a factory string (the inverse of :func:`factory_string`)."""
    if factory == "Flat":
        return "flat"
    if factory.startswith("HNSW"):
        return "hnsw"
    return {"Flat": "ivf", "SQ8": "ivfsq", "SQfp16": "ivfsq"}.get(factory.split(",")[1], "ivfpq")


def shortfall_reason(
    kind: str,
    factory: str,
    n: int,
    dim: int,
    memory_budget: int,
    refine: int,
    knob: str,
    value: int,
    given: bool,
) -> str:
    """Why a build's tuned recall stayed below its target, and what to change: the given knob,
    the codes' compression (the next, less compressed codes and the budget they need, or
    re-ranking) or the knob's plateau."""
    if given:
        return f"with the given {knob} {value}; a larger one raises recall"
    if kind not in ("ivfpq", "ivfsq"):
        return f"at the best {knob} ({value}; a larger one stopped helping)"
    # the next, less compressed codes: bytes per dimension and their kind
    if kind == "ivfpq":
        code, name = 1, "8-bit scalar codes (kind='ivfsq')"
    elif "SQ8" in factory:
        code, name = 2, "16-bit floats (kind='ivfsq')"
    else:
        code, name = 4, "uncompressed vectors (kind='ivf')"
    need = ivf_bytes(n, dim, code)
    fix = (
        f"{name} fit the memory_budget"
        if need <= memory_budget
        else f"{name} need a memory_budget of about {need / 2**30:.1f} GiB "
        f"(now {memory_budget / 2**30:.2f} GiB)"
    )
    redo = f"a larger refine than {refine}" if refine else "refine=8"
    return (
        f"at the best {knob} ({value}): the codes' compression is the limit; {fix}"
        f", or re-rank on the float vectors ({redo})"
    )


def import_faiss() -> Any:
    """The faiss module, or an ImportError saying how to install it (approximate kinds and
    ``backend='faiss'`` need it)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "faiss is needed for backend='faiss' and approximate kinds: pip install faiss-cpu "
            "(or smi-hub[faiss]); kind='flat' with backend='torch' needs nothing."
        ) from e
    return faiss
