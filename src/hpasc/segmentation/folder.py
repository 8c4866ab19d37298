"""Segmenting a folder of images to 16-bit label PNGs, and reading them back.

Layout: ``MASKS_DIR/{ID}.png`` (cells) and ``MASKS_DIR/{ID}_nuclei.png`` (nuclei, the cell's label), both
uint16 at full image size, 0 = background; ``MASKS_DIR/overlay/{ID}.png`` with ``overlay=True``.
An image whose two PNGs exist is skipped, so an interrupted run resumes. A failing image is reported
with a warning that names it and is skipped; the others go on.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..config import SegmentationConfig
from ..fsutil import read_csv
from ..io import CHANNELS, EXTENSIONS, ImageReadError, image_folder, read_image, write_png_atomic
from ..paths import check_id, is_plain_id
from .base import Segmentation, segment

MAX_LABEL = np.iinfo(np.uint16).max


def mask_paths(masks_dir: os.PathLike | str, image_id: str) -> tuple[Path, Path]:
    """(cells PNG, nuclei PNG) of one image."""
    masks_dir = Path(masks_dir)
    check_id(image_id, str(masks_dir))
    return masks_dir / f"{image_id}.png", masks_dir / f"{image_id}_nuclei.png"


def list_image_ids(images_dir: os.PathLike | str) -> list[str]:
    """IDs of the images in a folder (those with a red channel file), sorted."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found")
    suffixes = tuple(f"_{CHANNELS[0]}{ext}" for ext in EXTENSIONS)
    ids = {p.name[: -len(s)] for p in images_dir.iterdir() for s in suffixes if p.name.endswith(s)}
    plain = {i for i in ids if is_plain_id(i)}
    for odd in sorted(ids - plain)[:5]:
        warnings.warn(f"{images_dir}: skipping {odd!r}: not a plain image ID", RuntimeWarning, stacklevel=2)
    return sorted(plain)


def read_id_list(ids: Sequence[str] | str | os.PathLike) -> list[str]:
    """IDs given as a sequence, or as a CSV file with an ``ID`` column (train.csv, sample_submission)."""
    if isinstance(ids, (str, os.PathLike)):
        path = Path(ids)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ID list not found")
        frame = read_csv(path, "ID list", dtype=str)  # a malformed file -> ValueError naming it
        if "ID" not in frame.columns:
            raise ValueError(f"{path}: no ID column (columns: {', '.join(frame.columns)})")
        found = list(frame["ID"])
        for r, image_id in enumerate(found, start=1):
            check_id(image_id, f"{path}: row {r}")
        return list(dict.fromkeys(found))
    return list(dict.fromkeys(check_id(str(i), "ID list") for i in ids))


def write_masks(masks_dir: os.PathLike | str, image_id: str, seg: Segmentation) -> None:
    """Write one image's cells and nuclei as 16-bit PNGs (atomically; nuclei first, cells mark done)."""
    if seg.n > MAX_LABEL:
        raise ValueError(f"{image_id}: {seg.n} cells do not fit a 16-bit label PNG")
    cells_path, nuclei_path = mask_paths(masks_dir, image_id)
    write_png_atomic(nuclei_path, seg.nuclei.astype(np.uint16))
    write_png_atomic(cells_path, seg.cells.astype(np.uint16))


def _read_label_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(path, "missing mask file (run `hpasc segment` first)")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "unreadable or truncated mask PNG")
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(path, f"expected a single-channel 8/16-bit label map, got {arr.dtype} "
                                   f"shape {arr.shape}")
    return arr.astype(np.int32)


def read_masks(masks_dir: os.PathLike | str, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(cells, nuclei) int32 label maps written by :func:`segment_folder`."""
    cells_path, nuclei_path = mask_paths(masks_dir, image_id)
    cells = _read_label_png(cells_path)
    nuclei = _read_label_png(nuclei_path)
    if cells.shape != nuclei.shape:
        raise ImageReadError(nuclei_path, f"shape {nuclei.shape} differs from {cells_path.name} "
                                          f"{cells.shape}")
    return cells, nuclei


def read_label_map(masks_dir: str | Path, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached segmentation of one image -> (cell label map, border flags, rel_area), the per-cell
    geometry as the segmentation post-processing records it (``cell_stats``)."""
    from .postprocess import cell_stats

    cells, _ = read_masks(masks_dir, image_id)
    border, rel_area = cell_stats(cells)
    return cells, border, rel_area


def overlay_image(image: np.ndarray, seg: Segmentation, max_side: int = 1024) -> np.ndarray:
    """8-bit BGR picture: red+yellow, green, blue channels with white cell and cyan nucleus outlines."""
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    rgb = np.stack([np.maximum(small[..., 0], small[..., 3]),
                    np.maximum(small[..., 1], small[..., 3] * 0.5), small[..., 2]], axis=2)
    top = np.maximum(np.percentile(rgb, 99.5, axis=(0, 1)), 1e-3)
    bgr = (np.clip(rgb / top, 0, 1)[..., ::-1] * 255).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for labels, color in ((seg.nuclei, (255, 255, 0)), (seg.cells, (255, 255, 255))):
        lab = cv2.resize(labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
        edge = cv2.morphologyEx(lab, cv2.MORPH_GRADIENT, kernel) > 0
        bgr[edge] = color
    return bgr


def segment_one(images_dir: os.PathLike | str, out_dir: os.PathLike | str, image_id: str,
                cfg: SegmentationConfig, overlay: bool = False) -> int:
    """Segment one image of a folder and write its masks; returns the number of cells."""
    image = read_image(images_dir, image_id)
    seg = segment(image, cfg)
    write_masks(out_dir, image_id, seg)
    if overlay:
        write_png_atomic(Path(out_dir) / "overlay" / f"{image_id}.png", overlay_image(image, seg))
    return seg.n


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one image per process; the parallelism is across processes
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _task(args: tuple) -> tuple[str, str | None]:
    images_dir, out_dir, image_id, cfg, overlay = args
    try:
        segment_one(images_dir, out_dir, image_id, cfg, overlay)
        return image_id, None
    except Exception as exc:  # reported by the parent, never fatal for the folder
        return image_id, f"{type(exc).__name__}: {exc}"


def segment_folder(images_dir: os.PathLike | str, out_dir: os.PathLike | str,
                   cfg: SegmentationConfig | None = None,
                   ids: Sequence[str] | str | os.PathLike | None = None,
                   workers: int = 1, overlay: bool = False) -> list[str]:
    """Segment every image of ``images_dir`` (or the given IDs / ID CSV) into ``out_dir``. ``images_dir``
    may also map each of the given IDs to its folder (``hpasc.io.image_folder``).

    Images already done (both PNGs present) are skipped. Returns the IDs whose masks are present at the
    end, in input order; failures are warned about and left out.
    """
    cfg = cfg or SegmentationConfig()
    id_list = list_image_ids(images_dir) if ids is None else read_id_list(ids)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    todo = [i for i in id_list if not all(p.is_file() for p in mask_paths(out_dir, i))]
    tasks = [(str(image_folder(images_dir, i)), str(out_dir), i, cfg, overlay) for i in todo]
    failed: set[str] = set()
    bar = dict(total=len(tasks), desc="segment", unit="img", disable=None)
    results: Iterable[tuple[str, str | None]]
    if workers > 1 and len(tasks) > 1:
        ctx = get_context("spawn")  # safe with torch/numba state in the parent
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                                 initializer=_worker_init) as pool:
            results = list(tqdm(pool.map(_task, tasks), **bar))
    else:
        results = [_task(t) for t in tqdm(tasks, **bar)]
    for image_id, error in results:
        if error is not None:
            failed.add(image_id)
            warnings.warn(f"{image_folder(images_dir, image_id) / image_id}: segmentation failed, skipped ({error})",
                          RuntimeWarning, stacklevel=2)
    return [i for i in id_list if i not in failed and all(p.is_file() for p in mask_paths(out_dir, i))]
