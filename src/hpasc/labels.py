"""The 19 HPA single-cell classes and the ``Label`` strings of train.csv."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES = len(CLASS_NAMES)
NEGATIVE = 18


class LabelError(ValueError):
    """A label string or class id that is not one of the 19 classes."""


def parse_label(text: str | int) -> tuple[int, ...]:
    """``"8|5|0"`` -> ``(0, 5, 8)``: sorted, repeated ids (``17|17``) collapse.

    Raises LabelError for an empty string, a non-integer or an id outside 0..18.
    """
    parts = str(text).strip().split("|")
    ids = set()
    for part in parts:
        part = part.strip()
        try:
            cid = int(part)
        except ValueError:
            raise LabelError(f"label {text!r}: {part!r} is not a class id") from None
        if not 0 <= cid < NUM_CLASSES:
            raise LabelError(f"label {text!r}: class id {cid} is outside 0..{NUM_CLASSES - 1}")
        ids.add(cid)
    return tuple(sorted(ids))


def format_label(ids: Iterable[int]) -> str:
    """``(16, 0)`` -> ``"0|16"`` (sorted, unique)."""
    uniq = sorted({int(i) for i in ids})
    if not uniq:
        raise LabelError("a label needs at least one class id")
    return "|".join(str(i) for i in uniq)


def to_multihot(ids: Iterable[int]) -> np.ndarray:
    """Class ids -> float32 vector of length 19."""
    vec = np.zeros(NUM_CLASSES, dtype=np.float32)
    for cid in ids:
        vec[int(cid)] = 1.0
    return vec


def multihot_matrix(labels: Iterable[str]) -> np.ndarray:
    """Label strings -> (N, 19) float32 multi-hot matrix."""
    rows = [to_multihot(parse_label(s)) for s in labels]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), np.float32)
