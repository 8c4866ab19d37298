"""Boxes and crops of a segmented image: one crop function for training (through the cache) and
inference (directly), so the model sees the same pixels in both.

A crop is the cell's bounding box plus padding, with the other cells inside it kept, zeroed or blurred
(``NEIGHBOUR_MODES``), resized keeping the aspect ratio onto a square ``size x size`` canvas, all 4
channels, uint8; row k of ``extract_crops`` is cell k+1.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numba
import numpy as np

# --------------------------------------------------------------------------- boxes and crops

def check_label_map(label_map: np.ndarray, what: str = "label map") -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected a 2-D integer array, got {label_map.dtype} {label_map.shape}")
    return label_map


@numba.njit(cache=True, nogil=True)
def _label_boxes(label_map, n):  # pragma: no cover - numba
    """One pass over the label map: min/max row and column of every label 1..n.

    Plain per-label arrays instead of a row view per pixel: 2-3x faster on a 2048 px map. Rows are
    visited in order, so a label's last row is simply the current one.
    """
    height, width = label_map.shape
    y0 = np.full(n + 1, height, np.int64)
    x0 = np.full(n + 1, width, np.int64)
    y1 = np.zeros(n + 1, np.int64)
    x1 = np.zeros(n + 1, np.int64)
    for y in range(height):
        for x in range(width):
            lab = label_map[y, x]
            if lab <= 0 or lab > n:
                continue
            if y < y0[lab]:
                y0[lab] = y
            y1[lab] = y + 1
            if x < x0[lab]:
                x0[lab] = x
            if x >= x1[lab]:
                x1[lab] = x + 1
    boxes = np.zeros((n, 4), np.int64)
    for k in range(n):
        if y1[k + 1] > 0:  # absent ids keep an all-zero box
            boxes[k, 0] = y0[k + 1]
            boxes[k, 1] = x0[k + 1]
            boxes[k, 2] = y1[k + 1]
            boxes[k, 3] = x1[k + 1]
    return boxes


def cell_boxes(label_map: np.ndarray) -> np.ndarray:
    """(n, 4) int64 boxes ``[y0, x0, y1, x1)`` of cells 1..n (row k = cell k+1; absent ids -> zeros)."""
    label_map = check_label_map(label_map)
    n = int(label_map.max()) if label_map.size else 0
    if n <= 0:
        return np.zeros((0, 4), dtype=np.int64)
    return _label_boxes(label_map, n)


def padded_window(box: np.ndarray, padding: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The crop window of one box: each side grown by ``padding`` x the longer box side, clipped."""
    y0, x0, y1, x1 = (int(v) for v in box)
    pad = int(round(padding * max(y1 - y0, x1 - x0)))
    return max(0, y0 - pad), max(0, x0 - pad), min(height, y1 + pad), min(width, x1 + pad)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """The whole image to uint8 once (a few ms, SIMD); every crop is then cut from 8-bit data."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        return cv2.convertScaleAbs(np.ascontiguousarray(image, dtype=np.float32), alpha=255.0)
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    raise ValueError(f"image: unsupported pixel type {image.dtype} (expected float in [0, 1] or uint8)")


@numba.njit(cache=True, nogil=True)
def _masked_window(pixels, label_map, y0, x0, y1, x1, keep):  # pragma: no cover - numba
    """Copy of ``pixels[y0:y1, x0:x1]`` with the pixels of cells other than ``keep`` set to 0.

    ``pixels`` is the uint8 RGBY image viewed as one uint32 per pixel: one move per pixel.
    """
    out = np.empty((y1 - y0, x1 - x0), np.uint32)
    for y in range(y1 - y0):
        for x in range(x1 - x0):
            lab = label_map[y0 + y, x0 + x]
            out[y, x] = 0 if (lab != 0 and lab != keep) else pixels[y0 + y, x0 + x]
    return out


def _resize(region: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    interp = cv2.INTER_AREA if dsize[0] < region.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(region, dsize, interpolation=interp)


def _keep_neighbours(image, label_map, window, cell_id, dsize):
    y0, x0, y1, x1 = window
    return _resize(np.ascontiguousarray(image[y0:y1, x0:x1]), dsize)


def _zero_neighbours(image, label_map, window, cell_id, dsize):
    # masked at full resolution, so no neighbour pixel leaks into the crop through interpolation
    pixels = image.view(np.uint32).reshape(image.shape[:2])
    region = _masked_window(pixels, label_map, *window, cell_id)
    return _resize(region.view(np.uint8).reshape(region.shape + (4,)), dsize)


def _blur_neighbours(image, label_map, window, cell_id, dsize):
    # blurred at crop resolution: the neighbour's texture (its protein pattern) is gone, its presence
    # still shows; blurring at full resolution would cost ~50x more for the same look
    y0, x0, y1, x1 = window
    crop = _keep_neighbours(image, label_map, window, cell_id, dsize)
    small = cv2.resize(np.ascontiguousarray(label_map[y0:y1, x0:x1], dtype=np.int32), dsize,
                       interpolation=cv2.INTER_NEAREST)
    others = (small != 0) & (small != cell_id)
    if others.any():
        # down 8x and back up: a wide blur at the cost of two tiny resizes (a Gaussian of this
        # width costs ~3 ms per crop)
        w, h = dsize
        coarse = cv2.resize(crop, (max(1, w // 8), max(1, h // 8)), interpolation=cv2.INTER_AREA)
        blurred = cv2.resize(coarse, dsize, interpolation=cv2.INTER_LINEAR)
        crop[others] = blurred[others]
    return crop


# what happens to the pixels of other cells inside a crop window (CellsConfig.neighbours):
# fn(uint8 image, labels, window (y0, x0, y1, x1), cell id, (width, height)) -> resized uint8 crop
NEIGHBOUR_MODES: dict[str, Callable[..., np.ndarray]] = {
    "zero": _zero_neighbours,
    "keep": _keep_neighbours,
    "blur": _blur_neighbours,
}


def extract_crops(image: np.ndarray, label_map: np.ndarray, size: int = 128, padding: float = 0.05,
                  neighbours: str = "zero") -> np.ndarray:
    """uint8 ``(n, size, size, 4)`` crops of cells 1..n (row k = cell k+1).

    ``image``: ``H x W x 4`` float in [0, 1] (``hpasc.io.read_image``), uint8 or uint16. The padded
    box is scaled so its longer side becomes ``size`` and centred on a zero canvas (aspect ratio
    kept). ``neighbours``: keep | zero | blur for the pixels of other cells inside the window;
    background pixels are always kept. An id without pixels gives an all-zero crop.
    """
    image = np.asarray(image)
    label_map = check_label_map(label_map)
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"image: expected H x W x 4, got shape {image.shape}")
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"label map shape {label_map.shape} differs from image shape {image.shape[:2]}")
    if neighbours not in NEIGHBOUR_MODES:
        raise ValueError(f"neighbours={neighbours!r}: expected one of {', '.join(NEIGHBOUR_MODES)}")
    if size < 1 or padding < 0:
        raise ValueError(f"size must be >= 1 and padding >= 0, got size={size}, padding={padding}")
    crop_fn = NEIGHBOUR_MODES[neighbours]
    boxes = cell_boxes(label_map)
    out = np.zeros((len(boxes), size, size, 4), dtype=np.uint8)
    if len(boxes) == 0:
        return out
    image8 = _to_uint8(image)
    height, width = label_map.shape
    for k, box in enumerate(boxes):
        if box[2] <= box[0]:
            continue  # id without pixels
        window = padded_window(box, padding, height, width)
        rh, rw = window[2] - window[0], window[3] - window[1]
        factor = size / max(rh, rw)
        nh, nw = max(1, min(size, round(rh * factor))), max(1, min(size, round(rw * factor)))
        oy, ox = (size - nh) // 2, (size - nw) // 2
        out[k, oy:oy + nh, ox:ox + nw] = crop_fn(image8, label_map, window, k + 1, (nw, nh))
    return out


