"""Label subsets named by a file, as the references publish theirs: SimCLR's ImageNet
``1percent.txt`` / ``10percent.txt`` (one training file name per line, e.g.
``n01440764_10026.JPEG``), which Barlow Twins' and VICReg's ``evaluate.py`` map onto the
ImageFolder's ``train/<class>/<name>`` files. Any ImageFolder works the same way: a line names
a file of the training split by its base name (a ``<class>_`` prefix picks among files of the
same name in several classes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class LabelListError(ValueError):
    """A label list file that does not match the training images."""


def read_label_list(path: str | os.PathLike) -> list[str]:
    """The file names of a label list file (blank lines ignored, order kept, no repeats)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LabelListError(f"Cannot read the label list {path}: {e.strerror or e}.") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise LabelListError(f"The label list {path} names no image (one file name per line).")
    return list(dict.fromkeys(names))


def label_list_indices(samples: Sequence[tuple[str, int]], names: Sequence[str]) -> list[int]:
    """Sorted positions in ``samples`` (an ImageFolder's ``(path, label)`` list) of the files
    ``names`` names; ``LabelListError`` naming the first few that match no file, or several."""
    by_name: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(samples):
        by_name.setdefault(os.path.basename(path), []).append(i)
    found: list[int] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    for name in names:
        hits = by_name.get(os.path.basename(name), [])
        if len(hits) > 1:  # the same name in several classes: the class prefix decides
            prefix = name.split("_", 1)[0]
            hits = [i for i in hits if Path(samples[i][0]).parent.name == prefix]
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            found.append(hits[0])
    if missing or ambiguous:
        problems = []
        if missing:
            problems.append(f"{len(missing)} name no training image (e.g. {missing[:3]})")
        if ambiguous:
            problems.append(f"{len(ambiguous)} match several (e.g. {ambiguous[:3]})")
        raise LabelListError(
            f"Of the {len(names)} files the label list names, " + " and ".join(problems)
            + f"; it must name files of this training split ({len(samples)} images)."
        )  # fmt: skip
    return sorted(found)
