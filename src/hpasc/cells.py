"""Cells of a segmented image: boxes, crops, a feature table and the on-disk crop cache.

One crop function serves training (through the cache) and inference (directly), so the model sees the
same pixels in both. A crop is the cell's bounding box plus padding, with the other cells inside it
kept, zeroed or blurred, resized keeping the aspect ratio onto a square ``size x size`` canvas, all 4
channels, uint8.

The cache (``build_cell_cache``/``load_cell_cache``) holds one ``crops-<token>.npy`` (N, S, S, 4) uint8
array that loads memory-mapped, ``cells.csv`` (one row per crop, same order), ``labels.csv`` (ID, Label,
fold: rewritten cheaply when the labels change) and ``meta.json``, written last, which names the crops
file and records the cache key and a fingerprint of every image's masks. A changed crop setting or a
re-segmented image therefore never reads stale crops; an interrupted build resumes from per-image parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import cv2
import numba
import numpy as np
import pandas as pd
from tqdm import tqdm

from .fsutil import atomic_path, read_csv, write_text_atomic
from .io import CHANNELS, integer_to_unit, read_image
from .paths import check_id

CACHE_VERSION = 1
TABLE_NAME = "cells.csv"
LABELS_NAME = "labels.csv"
META_NAME = "meta.json"
MIN_IMAGES_PER_WORKER = 8  # starting a worker process (imports) costs about as much as 8 small images
SHAPE_FEATURES = {  # table column -> skimage regionprops property
    "perimeter": "perimeter",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
    "extent": "extent",
    "orientation": "orientation",
    "major_axis_length": "axis_major_length",
    "minor_axis_length": "axis_minor_length",
}


class CellCacheError(OSError):
    """A cache folder that is missing, incomplete or inconsistent. Names the file."""


# --------------------------------------------------------------------------- boxes and crops

def _check_label_map(labels: np.ndarray, what: str = "label map") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected a 2-D integer array, got {labels.dtype} {labels.shape}")
    return labels


@numba.njit(cache=True, nogil=True)
def _label_boxes(labels, n):  # pragma: no cover - numba
    """One pass over the label map: min/max row and column of every label 1..n.

    Plain per-label arrays instead of a row view per pixel: 2-3x faster on a 2048 px map. Rows are
    visited in order, so a label's last row is simply the current one.
    """
    height, width = labels.shape
    y0 = np.full(n + 1, height, np.int64)
    x0 = np.full(n + 1, width, np.int64)
    y1 = np.zeros(n + 1, np.int64)
    x1 = np.zeros(n + 1, np.int64)
    for y in range(height):
        for x in range(width):
            lab = labels[y, x]
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


def cell_boxes(labels: np.ndarray) -> np.ndarray:
    """(n, 4) int64 boxes ``[y0, x0, y1, x1)`` of cells 1..n (row k = cell k+1; absent ids -> zeros)."""
    labels = _check_label_map(labels)
    n = int(labels.max()) if labels.size else 0
    if n <= 0:
        return np.zeros((0, 4), dtype=np.int64)
    return _label_boxes(labels, n)


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
def _masked_window(pixels, labels, y0, x0, y1, x1, keep):  # pragma: no cover - numba
    """Copy of ``pixels[y0:y1, x0:x1]`` with the pixels of cells other than ``keep`` set to 0.

    ``pixels`` is the uint8 RGBY image viewed as one uint32 per pixel: one move per pixel.
    """
    out = np.empty((y1 - y0, x1 - x0), np.uint32)
    for y in range(y1 - y0):
        for x in range(x1 - x0):
            lab = labels[y0 + y, x0 + x]
            out[y, x] = 0 if (lab != 0 and lab != keep) else pixels[y0 + y, x0 + x]
    return out


def _resize(region: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    interp = cv2.INTER_AREA if dsize[0] < region.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(region, dsize, interpolation=interp)


def _keep_neighbours(image, labels, window, cell_id, dsize):
    y0, x0, y1, x1 = window
    return _resize(np.ascontiguousarray(image[y0:y1, x0:x1]), dsize)


def _zero_neighbours(image, labels, window, cell_id, dsize):
    # masked at full resolution, so no neighbour pixel leaks into the crop through interpolation
    pixels = image.view(np.uint32).reshape(image.shape[:2])
    region = _masked_window(pixels, labels, *window, cell_id)
    return _resize(region.view(np.uint8).reshape(region.shape + (4,)), dsize)


def _blur_neighbours(image, labels, window, cell_id, dsize):
    # blurred at crop resolution: the neighbour's texture (its protein pattern) is gone, its presence
    # still shows; blurring at full resolution would cost ~50x more for the same look
    y0, x0, y1, x1 = window
    crop = _keep_neighbours(image, labels, window, cell_id, dsize)
    small = cv2.resize(np.ascontiguousarray(labels[y0:y1, x0:x1], dtype=np.int32), dsize,
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


def extract_crops(image: np.ndarray, labels: np.ndarray, size: int = 128, padding: float = 0.05,
                  neighbours: str = "zero") -> np.ndarray:
    """uint8 ``(n, size, size, 4)`` crops of cells 1..n (row k = cell k+1).

    ``image``: ``H x W x 4`` float in [0, 1] (``hpasc.io.read_image``), uint8 or uint16. The padded
    box is scaled so its longer side becomes ``size`` and centred on a zero canvas (aspect ratio
    kept). ``neighbours``: keep | zero | blur for the pixels of other cells inside the window;
    background pixels are always kept. An id without pixels gives an all-zero crop.
    """
    image = np.asarray(image)
    labels = _check_label_map(labels)
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"image: expected H x W x 4, got shape {image.shape}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"label map shape {labels.shape} differs from image shape {image.shape[:2]}")
    if neighbours not in NEIGHBOUR_MODES:
        raise ValueError(f"neighbours={neighbours!r}: expected one of {', '.join(NEIGHBOUR_MODES)}")
    if size < 1 or padding < 0:
        raise ValueError(f"size must be >= 1 and padding >= 0, got size={size}, padding={padding}")
    crop_fn = NEIGHBOUR_MODES[neighbours]
    boxes = cell_boxes(labels)
    out = np.zeros((len(boxes), size, size, 4), dtype=np.uint8)
    if len(boxes) == 0:
        return out
    image8 = _to_uint8(image)
    height, width = labels.shape
    for k, box in enumerate(boxes):
        if box[2] <= box[0]:
            continue  # id without pixels
        window = padded_window(box, padding, height, width)
        rh, rw = window[2] - window[0], window[3] - window[1]
        factor = size / max(rh, rw)
        nh, nw = max(1, min(size, round(rh * factor))), max(1, min(size, round(rw * factor)))
        oy, ox = (size - nh) // 2, (size - nw) // 2
        out[k, oy:oy + nh, ox:ox + nw] = crop_fn(image8, labels, window, k + 1, (nw, nh))
    return out


# --------------------------------------------------------------------------- cell table

@numba.njit(cache=True, nogil=True)
def _channel_stats(image: np.ndarray, labels: np.ndarray, n: int):  # pragma: no cover - numba
    """Per label: pixel count, per-channel sum and max, in one pass over the image."""
    h, w, c = image.shape
    count = np.zeros(n + 1, np.int64)
    sums = np.zeros((n + 1, c), np.float64)
    maxs = np.zeros((n + 1, c), np.float32)
    for y in range(h):
        for x in range(w):
            lab = labels[y, x]
            if lab <= 0 or lab > n:
                continue
            count[lab] += 1
            for ch in range(c):
                v = image[y, x, ch]
                sums[lab, ch] += v
                if v > maxs[lab, ch]:
                    maxs[lab, ch] = v
    return count, sums, maxs


def _unit_float(image: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] whatever the input type, so table features compare across bit depths."""
    scaled = integer_to_unit(image)
    return scaled if scaled is not None else np.asarray(image, dtype=np.float32)


def cell_table(image_id: str, image: np.ndarray, cells: np.ndarray, nuclei: np.ndarray) -> pd.DataFrame:
    """One row per cell 1..n: ID, cell_id, box, area, nucleus_area, border, rel_area, per-channel
    ``mean_<colour>``/``max_<colour>`` (image in [0, 1]) and regionprops shape features."""
    from .segmentation import (
        cell_stats,  # the border/relative-area rule lives with the segmentation
    )

    cells = _check_label_map(cells, f"{image_id}: cell label map")
    nuclei = _check_label_map(nuclei, f"{image_id}: nucleus label map")
    image = _unit_float(np.asarray(image))
    if image.ndim != 3 or image.shape[2] != 4 or image.shape[:2] != cells.shape or nuclei.shape != cells.shape:
        raise ValueError(f"{image_id}: image {image.shape}, cells {cells.shape} and nuclei {nuclei.shape} "
                         "do not fit together (expected H x W x 4 and two H x W maps)")
    n = int(cells.max()) if cells.size else 0
    boxes = cell_boxes(cells)
    count, sums, maxs = _channel_stats(np.ascontiguousarray(image), np.ascontiguousarray(cells, np.int32), n)
    border, rel_area = cell_stats(cells)
    table: dict[str, Any] = {
        "ID": [image_id] * n,
        "cell_id": np.arange(1, n + 1, dtype=np.int64),
        "y0": boxes[:, 0], "x0": boxes[:, 1], "y1": boxes[:, 2], "x1": boxes[:, 3],
        "area": count[1:],
        "nucleus_area": np.bincount(nuclei[nuclei > 0].ravel(), minlength=n + 1)[1:n + 1],
        "border": np.asarray(border, dtype=bool)[:n],
        "rel_area": np.asarray(rel_area, dtype=np.float32)[:n],
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[1:] / count[1:, None]
    for ch, colour in enumerate(CHANNELS):
        table[f"mean_{colour}"] = means[:, ch].astype(np.float32)
    for ch, colour in enumerate(CHANNELS):
        table[f"max_{colour}"] = maxs[1:, ch]
    table.update(_shape_features(cells, n, boxes, count[1:]))
    return pd.DataFrame(table)


SHAPE_WORKING_SIDE = 512  # moment/perimeter features are measured on a label map subsampled to about this side


def _shape_features(cells: np.ndarray, n: int, boxes: np.ndarray, areas: np.ndarray) -> dict[str, np.ndarray]:
    """Shape features: regionprops on the label map subsampled by an integer step, solidity exact.

    At full resolution regionprops costs ~1.5 s per 2048 px image (mostly solidity's convex hull
    image); subsampled by 4 it costs ~0.1 s and differs by a few percent (lengths are scaled back).
    Cells too small to survive the subsampling are measured at full resolution on their own box.
    """
    from skimage.measure import regionprops_table

    out = {name: np.full(n, np.nan, dtype=np.float32) for name in SHAPE_FEATURES}
    if n == 0:
        return out
    step = max(1, max(cells.shape) // SHAPE_WORKING_SIDE)
    lengths = ("perimeter", "major_axis_length", "minor_axis_length")
    props_of = {name: prop for name, prop in SHAPE_FEATURES.items() if name != "solidity"}

    def measure(label_map: np.ndarray, scale: float, offset: int = 0) -> None:
        props = regionprops_table(label_map, properties=("label", *props_of.values()))
        rows = np.asarray(props["label"], dtype=np.int64) - 1 + offset
        for name, prop in props_of.items():
            values = np.asarray(props[prop], dtype=np.float32)
            out[name][rows] = values * scale if name in lengths else values

    measure(np.ascontiguousarray(cells[::step, ::step]), float(step))
    for k in np.flatnonzero(np.isnan(out["eccentricity"]) & (areas > 0)):
        y0, x0, y1, x1 = boxes[k]
        measure((cells[y0:y1, x0:x1] == k + 1).astype(np.int32), 1.0, offset=int(k))
    out["solidity"] = _solidity(cells, boxes, areas)
    return out


_PIXEL_CORNERS = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.int32)


def _solidity(cells: np.ndarray, boxes: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Pixel area over the area of the convex hull of the cell's pixel squares (1.0 for a rectangle).

    cv2 outer contour -> the four corners of each contour pixel -> convex hull polygon area: the same
    quantity as skimage's ``solidity`` at ~1/30 of its cost.
    """
    out = np.full(len(boxes), np.nan, dtype=np.float32)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        if areas[k] == 0:
            continue
        mask = (cells[y0:y1, x0:x1] == k + 1).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        points = np.concatenate([c.reshape(-1, 2) for c in contours])
        corners = (points[:, None, :] + _PIXEL_CORNERS[None]).reshape(-1, 2)
        hull_area = cv2.contourArea(cv2.convexHull(corners))
        out[k] = areas[k] / hull_area if hull_area > 0 else 1.0
    return out


# --------------------------------------------------------------------------- the cache

@dataclass
class CellCache:
    """A loaded cache: ``table`` (one row per crop: ID, cell_id, features, Label, fold when known) and
    ``crops`` ((N, S, S, 4) uint8, memory-mapped unless loaded with ``mmap=False``)."""

    root: Path
    table: pd.DataFrame
    crops: np.ndarray
    key: dict

    def __len__(self) -> int:
        return len(self.crops)


def cache_key(cells_cfg: Any) -> dict:
    """What changes the crops: the crop geometry and neighbour handling (segmentation changes are
    caught by the per-image mask fingerprints)."""
    return {"version": CACHE_VERSION, "size": int(cells_cfg.size), "padding": float(cells_cfg.padding),
            "neighbours": str(cells_cfg.neighbours)}


def _fingerprint(masks_dir: Path, image_id: str) -> str:
    """Size and mtime of the mask files: re-segmenting an image changes them."""
    from .segmentation.folder import mask_paths

    parts = []
    for path in mask_paths(masks_dir, image_id):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CellCacheError(f"{path}: mask file missing (run `hpasc segment` first)") from None
        parts.append(f"{st.st_size}-{st.st_mtime_ns}")
    return "_".join(parts)


def _part_paths(parts_dir: Path, image_id: str, key: dict, fp: str) -> tuple[Path, Path]:
    """Part files named by key + mask fingerprint: a part of other settings is never reused."""
    check_id(image_id, str(parts_dir))
    digest = hashlib.sha1((json.dumps(key, sort_keys=True) + fp).encode()).hexdigest()[:12]
    return parts_dir / f"{image_id}.{digest}.npy", parts_dir / f"{image_id}.{digest}.csv"


def _build_part(job: tuple) -> tuple[str, int]:
    """Worker: one image -> its crops and table rows as a part file pair. Returns (ID, n cells)."""
    images_dir, masks_dir, image_id, key, fp, parts_dir = job
    from .segmentation import read_masks

    npy_path, csv_path = _part_paths(parts_dir, image_id, key, fp)
    if npy_path.is_file() and csv_path.is_file():  # done by an interrupted earlier build
        return image_id, len(np.load(npy_path, mmap_mode="r"))
    image = read_image(images_dir, image_id)
    cells, nuclei = read_masks(masks_dir, image_id)
    crops = extract_crops(image, cells, key["size"], key["padding"], key["neighbours"])
    table = cell_table(image_id, image, cells, nuclei)
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, crops)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return image_id, len(crops)


def _read_meta(out_dir: Path) -> dict | None:
    path = out_dir / META_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a broken meta means "rebuild", not a crash


def _labels_frame(labels: pd.DataFrame) -> pd.DataFrame:
    if "ID" not in labels or "Label" not in labels:
        raise ValueError(f"labels: expected columns ID, Label[, fold], got {', '.join(map(str, labels.columns))}")
    cols = ["ID", "Label"] + (["fold"] if "fold" in labels else [])
    frame = labels[cols].drop_duplicates("ID").reset_index(drop=True)
    frame["ID"] = frame["ID"].astype(str)
    frame["Label"] = [None if pd.isna(v) else str(v) for v in frame["Label"]]  # unlabelled stays empty
    return frame


def _write_labels(out_dir: Path, labels: pd.DataFrame | None) -> None:
    """Store the image labels beside the crops; rewritten only when they changed."""
    if labels is None:
        return
    text = _labels_frame(labels).to_csv(index=False)
    path = out_dir / LABELS_NAME
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)


def build_cell_cache(images_dir: os.PathLike | str, masks_dir: os.PathLike | str, ids: list[str],
                     cells_cfg: Any, out_dir: os.PathLike | str, labels: pd.DataFrame | None = None,
                     workers: int = 1) -> CellCache:
    """Crops + cell table of ``ids`` into ``out_dir`` (incremental) and the loaded cache.

    Nothing is recomputed when the key and every image's mask fingerprint match; images that are new
    or re-segmented are processed (up to ``workers`` processes, at least ``MIN_IMAGES_PER_WORKER``
    images each) and merged with the crops still valid.
    ``labels`` (ID, Label[, fold]) are stored beside the crops and joined to the table on load.
    """
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("build_cell_cache: ids contain duplicates")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(cells_cfg)
    fps = {i: _fingerprint(masks_dir, i) for i in ids}
    meta = _read_meta(out_dir)
    old_ok = (meta is not None and meta.get("key") == key and (out_dir / meta.get("crops", "")).is_file()
              and (out_dir / TABLE_NAME).is_file())  # a lost table means "rebuild", as a broken meta does
    old_images: dict = meta["images"] if old_ok else {}
    if old_ok and meta.get("ids") == ids and all(old_images.get(i, {}).get("fp") == fps[i] for i in ids):
        _write_labels(out_dir, labels)
        return load_cell_cache(out_dir)

    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    reuse = {i for i in ids if old_images.get(i, {}).get("fp") == fps[i]}
    todo = [i for i in ids if i not in reuse]
    jobs = [(images_dir, masks_dir, i, key, fps[i], parts_dir) for i in todo]
    counts: dict[str, int] = {i: int(old_images[i]["count"]) for i in reuse}
    bar = dict(total=len(jobs), desc="cells", unit="img", disable=None)
    workers = min(workers, len(jobs) // MIN_IMAGES_PER_WORKER)
    if workers > 1:
        # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child would deadlock on
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for image_id, n in tqdm(pool.map(_build_part, jobs, chunksize=1), **bar):
                counts[image_id] = n
    else:
        for image_id, n in tqdm(map(_build_part, jobs), **bar):
            counts[image_id] = n
    _consolidate(out_dir, ids, fps, counts, reuse, key, meta if old_ok else None, parts_dir)
    _write_labels(out_dir, labels)
    return load_cell_cache(out_dir)


def _consolidate(out_dir: Path, ids: list[str], fps: dict, counts: dict, reuse: set, key: dict,
                 old_meta: dict | None, parts_dir: Path) -> None:
    """Write one crops file + table in ``ids`` order from reused rows and new parts; meta.json last."""
    size = key["size"]
    total = sum(counts[i] for i in ids)
    old_crops = old_table = None
    if old_meta is not None and reuse:
        old_crops = np.load(out_dir / old_meta["crops"], mmap_mode="r")
        old_table = pd.read_csv(out_dir / TABLE_NAME, dtype={"ID": str})
    crops_name = f"crops-{uuid.uuid4().hex[:8]}.npy"
    images: dict[str, dict] = {}
    tables = []
    with atomic_path(out_dir / crops_name) as tmp:
        dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, size, size, 4))
        row = 0
        for image_id in ids:
            n = counts[image_id]
            if image_id in reuse:
                start = int(old_meta["images"][image_id]["start"])
                dest[row:row + n] = old_crops[start:start + n]
                tables.append(old_table.iloc[start:start + n])
            else:
                npy_path, csv_path = _part_paths(parts_dir, image_id, key, fps[image_id])
                dest[row:row + n] = np.load(npy_path)
                tables.append(pd.read_csv(csv_path, dtype={"ID": str}))
            images[image_id] = {"fp": fps[image_id], "start": row, "count": n}
            row += n
        dest.flush()
        del dest
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["ID", "cell_id"])
    with atomic_path(out_dir / TABLE_NAME) as tmp:
        table.to_csv(tmp, index=False)
    meta = {"key": key, "crops": crops_name, "n": total, "ids": ids, "images": images}
    write_text_atomic(out_dir / META_NAME, json.dumps(meta))
    del old_crops
    for path in out_dir.glob("crops-*.npy"):  # older crops files are now unreferenced
        if path.name != crops_name:
            path.unlink(missing_ok=True)
    shutil.rmtree(parts_dir, ignore_errors=True)


def load_cell_cache(out_dir: os.PathLike | str, mmap: bool = True) -> CellCache:
    """Open a cache written by ``build_cell_cache``; crops memory-mapped (read-only) by default."""
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if meta is None or "crops" not in meta:
        raise CellCacheError(f"{out_dir / META_NAME}: missing or unreadable; not a built cell cache")
    crops_path, table_path = out_dir / meta["crops"], out_dir / TABLE_NAME
    for path in (crops_path, table_path):
        if not path.is_file():
            raise CellCacheError(f"{path}: missing from the cell cache (rebuild it)")
    crops = np.load(crops_path, mmap_mode="r" if mmap else None)
    table = pd.read_csv(table_path, dtype={"ID": str})
    if len(table) != len(crops):
        raise CellCacheError(f"{table_path}: {len(table)} rows but {crops_path.name} holds {len(crops)} crops")
    labels_path = out_dir / LABELS_NAME
    if labels_path.is_file():
        labels = pd.read_csv(labels_path, dtype={"ID": str, "Label": str})
        table = table.drop(columns=[c for c in ("Label", "fold") if c in table]).merge(labels, on="ID", how="left")
    return CellCache(root=out_dir, table=table, crops=crops, key=meta["key"])


def masked_ids(masks_dir: os.PathLike | str) -> list[str]:
    """Image ids with a cell label map in ``masks_dir`` (``{ID}.png``, not the ``_nuclei`` files)."""
    return sorted(p.stem for p in Path(masks_dir).glob("*.png") if not p.stem.endswith("_nuclei"))


def build_cells(images_dir: os.PathLike | str, masks_dir: os.PathLike | str, out_dir: os.PathLike | str,
                cells_cfg: Any, labels_csv: os.PathLike | str | None = None, max_images: int | None = None,
                workers: int = 1) -> CellCache:
    """``hpasc cells``: the cache of every image listed in ``labels_csv`` (ID, Label[, fold]), or of
    every image with masks when no labels are given; ``max_images`` keeps the first N."""
    if not Path(masks_dir).is_dir():
        raise FileNotFoundError(f"{masks_dir}: masks folder not found (run `hpasc segment` first)")
    labels = None
    if labels_csv is not None:
        labels_csv = Path(labels_csv)
        if not labels_csv.is_file():
            raise FileNotFoundError(f"{labels_csv}: labels CSV not found")
        labels = read_csv(labels_csv, "labels CSV", dtype={"ID": str, "Label": str})
        missing = {"ID", "Label"} - set(labels.columns)
        if missing:
            raise ValueError(f"{labels_csv}: missing column(s) {', '.join(sorted(missing))}")
        ids = labels["ID"].drop_duplicates().tolist()
    else:
        ids = masked_ids(masks_dir)
    if max_images is not None:
        ids = ids[:max_images]
    if not ids:
        raise ValueError(f"no images to process (labels {labels_csv}, masks {masks_dir})")
    return build_cell_cache(images_dir, masks_dir, ids, cells_cfg, out_dir, labels=labels, workers=workers)
