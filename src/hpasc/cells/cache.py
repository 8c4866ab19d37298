"""The on-disk crop cache.

``build_cell_cache``/``load_cell_cache`` hold one ``crops-<token>.npy`` (N, S, S, 4) uint8 array that
loads memory-mapped, ``cells.csv`` (one row per crop, same order), ``labels.csv`` (ID, Label, fold:
rewritten cheaply when the labels change) and ``meta.json``, written last, which names the crops file and
records the cache key and a fingerprint of every image's masks. A changed crop setting or a re-segmented
image therefore never reads stale crops; an interrupted build resumes from per-image parts.
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
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..fsutil import atomic_path, read_csv, write_text_atomic
from ..io import image_folder, read_image
from ..paths import check_id
from ..sharding import shard_items
from .crops import extract_crops
from .features import cell_table

CACHE_VERSION = 1
TABLE_NAME = "cells.csv"
LABELS_NAME = "labels.csv"
META_NAME = "meta.json"
MIN_IMAGES_PER_WORKER = 8  # starting a worker process (imports) costs about as much as 8 small images


class CellCacheError(OSError):
    """A cache folder that is missing, incomplete or inconsistent. Names the file."""

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
    from ..segmentation.folder import mask_paths

    parts = []
    for path in mask_paths(masks_dir, image_id):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CellCacheError(f"{path}: mask file missing (run `hpasc segment` first)") from None
        parts.append(f"{st.st_size}-{st.st_mtime_ns}")
    return "_".join(parts)


def _content_digest(masks_dir: Path, image_id: str, key: dict) -> str:
    """The crop settings and the bytes of an image's masks: what a part's crops are a function of. By
    content, not by mtime, so parts built on several machines (``hpasc cells --shard``) from copied masks
    are found again by name."""
    from ..segmentation.folder import mask_paths

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode())
    for path in mask_paths(masks_dir, image_id):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _part_paths(parts_dir: Path, image_id: str, digest: str) -> tuple[Path, Path]:
    check_id(image_id, str(parts_dir))
    return parts_dir / f"{image_id}.{digest}.npy", parts_dir / f"{image_id}.{digest}.csv"


def _build_part(job: tuple) -> tuple[str, int, Path, Path]:
    """Worker: one image -> its crops and table rows as a part file pair (reused when present).
    Returns (ID, n cells, crops part, table part)."""
    images_dir, masks_dir, image_id, key, parts_dir = job
    from ..segmentation import read_masks

    npy_path, csv_path = _part_paths(parts_dir, image_id, _content_digest(masks_dir, image_id, key))
    if npy_path.is_file() and csv_path.is_file():  # an interrupted earlier build or another shard's
        return image_id, len(np.load(npy_path, mmap_mode="r")), npy_path, csv_path
    image = read_image(images_dir, image_id)
    cells, nuclei = read_masks(masks_dir, image_id)
    crops = extract_crops(image, cells, key["size"], key["padding"], key["neighbours"])
    table = cell_table(image_id, image, cells, nuclei)
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, crops)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return image_id, len(crops), npy_path, csv_path


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
    cols = ["ID", "Label"] + [c for c in ("fold", "source") if c in labels]
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


def build_cell_cache(images_dir, masks_dir: os.PathLike | str, ids: list[str],
                     cells_cfg: Any, out_dir: os.PathLike | str, labels: pd.DataFrame | None = None,
                     workers: int = 1, shard: tuple[int, int] | str | None = None) -> CellCache | int:
    """Crops + cell table of ``ids`` into ``out_dir`` (incremental) and the loaded cache.

    ``images_dir`` is one folder or a mapping ID -> folder (images of several sources). Nothing is
    recomputed when the key and every image's mask fingerprint match; images that are new or
    re-segmented are processed (up to ``workers`` processes, at least ``MIN_IMAGES_PER_WORKER`` images
    each) into per-image parts and merged with the crops still valid, streamed into one memory-mapped
    file. ``labels`` (ID, Label[, fold][, source]) are stored beside the crops and joined to the table on
    load. With ``shard`` only that shard's parts are built (``out_dir/parts/``, named by content) and
    their number returned: a later run without ``shard`` over the same folder (parts of every shard
    copied in) merges them without recomputing.
    """
    masks_dir, out_dir = Path(masks_dir), Path(out_dir)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("build_cell_cache: ids contain duplicates")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(cells_cfg)
    mine = shard_items(ids, shard)  # a shard's machine may hold only its own shard's masks
    fps = {i: _fingerprint(masks_dir, i) for i in mine}
    meta = _read_meta(out_dir)
    old_ok = (meta is not None and meta.get("key") == key and (out_dir / meta.get("crops", "")).is_file()
              and (out_dir / TABLE_NAME).is_file())  # a lost table means "rebuild", as a broken meta does
    old_images: dict = meta["images"] if old_ok else {}
    if shard is None and old_ok and meta.get("ids") == ids and all(old_images.get(i, {}).get("fp") == fps[i] for i in ids):
        _write_labels(out_dir, labels)
        return load_cell_cache(out_dir)

    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    reuse = {i for i in mine if old_images.get(i, {}).get("fp") == fps[i]}
    todo = [i for i in mine if i not in reuse]
    jobs = [(image_folder(images_dir, i), masks_dir, i, key, parts_dir) for i in todo]
    counts: dict[str, int] = {i: int(old_images[i]["count"]) for i in reuse}
    parts: dict[str, tuple[Path, Path]] = {}
    bar = dict(total=len(jobs), desc="cells", unit="img", disable=None)
    workers = min(workers, len(jobs) // MIN_IMAGES_PER_WORKER)
    if workers > 1:
        # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child would deadlock on
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(tqdm(pool.map(_build_part, jobs, chunksize=1), **bar))
    else:
        results = list(tqdm(map(_build_part, jobs), **bar))
    for image_id, n, npy_path, csv_path in results:
        counts[image_id] = n
        parts[image_id] = (npy_path, csv_path)
    if shard is not None:
        return len(results)
    _consolidate(out_dir, ids, fps, counts, reuse, key, meta if old_ok else None, parts, parts_dir)
    _write_labels(out_dir, labels)
    return load_cell_cache(out_dir)


def _consolidate(out_dir: Path, ids: list[str], fps: dict, counts: dict, reuse: set, key: dict,
                 old_meta: dict | None, parts: dict[str, tuple[Path, Path]], parts_dir: Path) -> None:
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
                npy_path, csv_path = parts[image_id]
                dest[row:row + n] = np.load(npy_path, mmap_mode="r")
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
        table = table.drop(columns=[c for c in ("Label", "fold", "source") if c in table]).merge(labels, on="ID", how="left")
    return CellCache(root=out_dir, table=table, crops=crops, key=meta["key"])


def masked_ids(masks_dir: os.PathLike | str) -> list[str]:
    """Image ids with a cell label map in ``masks_dir`` (``{ID}.png``, not the ``_nuclei`` files)."""
    return sorted(p.stem for p in Path(masks_dir).glob("*.png") if not p.stem.endswith("_nuclei"))


def build_cells(images_dir: os.PathLike | str, masks_dir: os.PathLike | str, out_dir: os.PathLike | str,
                cells_cfg: Any, labels_csv: os.PathLike | str | None = None, max_images: int | None = None,
                workers: int = 1, shard: tuple[int, int] | str | None = None) -> CellCache | int:
    """``hpasc cells``: the cache of every image listed in ``labels_csv`` (ID, Label[, fold]), or of
    every image with masks when no labels are given; ``max_images`` keeps the first N; ``shard`` builds
    only that shard's parts (``build_cell_cache``)."""
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
    return build_cell_cache(images_dir, masks_dir, ids, cells_cfg, out_dir, labels=labels, workers=workers,
                            shard=shard)
