"""Post-processing shared by every backend, and smooth label-map resizing.

``finalize`` applies the rules every backend's output goes through: objects below a minimum area and
cells without (enough) nucleus are dropped, the survivors are relabelled 1..n, nuclei take the label of
the cell they lie in, and the per-cell border flag and relative area are computed. All of it is a few
``bincount`` look-up tables over the pixels, whatever the number of cells.
"""
from __future__ import annotations

import numba
import numpy as np

from ..config import SegmentationConfig
from .base import Segmentation

# hpacellseg's area cut-offs (full-resolution pixels of a 2048 px image); scaled with the image side
REFERENCE_SIDE = 2048
DEFAULT_MIN_CELL_AREA = 5500
DEFAULT_MIN_NUCLEUS_AREA = 2500


def min_areas(shape: tuple[int, int], cfg: SegmentationConfig) -> tuple[int, int]:
    """(min cell area, min nucleus area) in full-resolution pixels for an image of ``shape``.

    A config value of 0 means the default above, scaled by the squared image side relative to 2048 px.
    """
    factor = (max(shape[:2]) / REFERENCE_SIDE) ** 2
    cell = cfg.min_cell_area or max(1, round(DEFAULT_MIN_CELL_AREA * factor))
    nucleus = cfg.min_nucleus_area or max(1, round(DEFAULT_MIN_NUCLEUS_AREA * factor))
    return int(cell), int(nucleus)


def _on_edge(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """bool ``(n_labels,)``: label value ``i`` has a pixel on the first/last row/column."""
    flags = np.zeros(n_labels, dtype=bool)
    if labels.size:  # an empty (0 x N) map has no edge pixels to index
        flags[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    return flags


def cell_stats(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(border bool (n,), rel_area float32 (n,)) of a consecutive label map with cells 1..n.

    ``border[i]``: cell ``i + 1`` has a pixel on the first/last row/column. ``rel_area[i]``: its area over
    the median cell area (empty arrays for an image without cells).
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {cells.shape}")
    n = int(cells.max(initial=0))
    area = np.bincount(cells.ravel(), minlength=n + 1)[1:].astype(np.float64)
    border = _on_edge(cells, n + 1)
    median = float(np.median(area)) if n else 1.0
    rel_area = (area / median if median > 0 else area).astype(np.float32)
    return border[1:], rel_area


def relabel_consecutive(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Map the labels present (and allowed by the boolean ``keep[label]``) to 1..n in order; others to 0."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel())
    present = counts > 0
    if keep is not None:
        present[: len(keep)] &= keep[: len(present)]
        present[len(keep):] = False
    present[:1] = False  # background; [:1] also fits an empty map
    lut = np.zeros(len(counts), dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels]


def finalize(cells: np.ndarray, nuclei: np.ndarray, min_cell_area: int = 1,
             min_nucleus_area: int = 1) -> Segmentation:
    """Apply the shared rules to a raw (cells, nuclei) pair of full-resolution label maps.

    ``nuclei`` is read as a foreground mask (any label > 0); the nucleus of a cell is the nuclear
    foreground inside it. A cell is kept when its area is at least ``min_cell_area`` and its nucleus
    area at least ``min_nucleus_area`` (at least one pixel: a cell without a nucleus always goes).
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape or cells.ndim != 2:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} must be 2-D of the same shape")
    if cells.size and cells.min() < 0:
        raise ValueError("cell labels must be non-negative")
    nuc_mask = nuclei > 0
    n_labels = int(cells.max(initial=0)) + 1
    area = np.bincount(cells.ravel(), minlength=n_labels)
    nuc_area = np.bincount(cells[nuc_mask], minlength=n_labels)
    keep = (area >= max(1, min_cell_area)) & (nuc_area >= max(1, min_nucleus_area))
    keep[0] = False
    lut = np.zeros(n_labels, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out_cells = lut[cells]
    out_nuclei = np.where(nuc_mask, out_cells, 0).astype(np.int32)
    # border flags and relative areas from the counts above (no second pass over the pixels)
    on_edge = _on_edge(cells, n_labels)
    kept_area = area[keep].astype(np.float64)
    median = float(np.median(kept_area)) if kept_area.size else 1.0
    return Segmentation(out_cells, out_nuclei, on_edge[keep], (kept_area / median).astype(np.float32))


def empty_segmentation(shape: tuple[int, int]) -> Segmentation:
    """No cells."""
    zeros = np.zeros(shape[:2], dtype=np.int32)
    return Segmentation(zeros, zeros.copy(), np.zeros(0, bool), np.zeros(0, np.float32))


@numba.njit(cache=True, nogil=True)
def _resize_labels_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    # Per output pixel, the label whose indicator map has the largest bilinear interpolation: the
    # interpolated indicator of label L is the summed weight of the (up to 4) neighbours carrying L.
    in_h, in_w = src.shape
    out = np.empty((out_h, out_w), dtype=src.dtype)
    sy = in_h / out_h
    sx = in_w / out_w
    for y in range(out_h):
        fy = (y + 0.5) * sy - 0.5
        fy = min(max(fy, 0.0), in_h - 1.0)
        y0 = int(fy)
        y1 = min(y0 + 1, in_h - 1)
        wy = fy - y0
        for x in range(out_w):
            fx = (x + 0.5) * sx - 0.5
            fx = min(max(fx, 0.0), in_w - 1.0)
            x0 = int(fx)
            x1 = min(x0 + 1, in_w - 1)
            wx = fx - x0
            a = src[y0, x0]
            b = src[y0, x1]
            c = src[y1, x0]
            d = src[y1, x1]
            if a == b and a == c and a == d:
                out[y, x] = a
                continue
            wa = (1 - wy) * (1 - wx)
            wb = (1 - wy) * wx
            wc = wy * (1 - wx)
            wd = wy * wx
            best = a
            best_w = -1.0
            for cand in (a, b, c, d):
                w = 0.0
                if a == cand:
                    w += wa
                if b == cand:
                    w += wb
                if c == cand:
                    w += wc
                if d == cand:
                    w += wd
                if w > best_w:
                    best_w = w
                    best = cand
            out[y, x] = best
    return out


def resize_labels(labels: np.ndarray, shape: tuple[int, int], method: str = "smooth") -> np.ndarray:
    """Resize an int label map to ``shape`` (h, w).

    ``smooth`` (default) is equivalent to bilinearly resizing each label's indicator map and taking the
    arg-max, so an upscaled boundary follows the interpolated contour instead of the source pixel
    staircase; ``nearest`` copies the nearest source pixel.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {labels.shape}")
    out_h, out_w = int(shape[0]), int(shape[1])
    if (out_h, out_w) == labels.shape:
        return labels.copy()
    if method == "nearest":
        rows = np.minimum((np.arange(out_h) + 0.5) * labels.shape[0] / out_h, labels.shape[0] - 1)
        cols = np.minimum((np.arange(out_w) + 0.5) * labels.shape[1] / out_w, labels.shape[1] - 1)
        return labels[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]]
    if method != "smooth":
        raise ValueError(f"unknown label resize method {method!r} (smooth | nearest)")
    return _resize_labels_bilinear(labels, out_h, out_w)
