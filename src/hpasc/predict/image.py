"""One image: read, segment (or the cached masks), crop and encode; its PredictionString."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..confidence import combine
from ..config import CellsConfig, InferenceConfig, SegmentationConfig
from ..submission import prediction_string
from .chunks import crop_key


@dataclass
class Prepared:
    """One image ready for the models: its crops and mask strings (the pixels are gone)."""

    image_id: str
    error: str | None = None
    skipped: bool = False
    crops: dict[tuple, np.ndarray] = field(default_factory=dict)
    cell_ids: np.ndarray | None = None
    encodings: dict[int, str] = field(default_factory=dict)
    border: np.ndarray | None = None
    rel_area: np.ndarray | None = None
    stain: np.ndarray | None = None  # relative protein signal per cell (hpasc.confidence.relative_stain)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return 0 if self.cell_ids is None else len(self.cell_ids)


def _segment(image: np.ndarray, image_id: str, seg_cfg: SegmentationConfig, masks_dir: Path | None):
    """Cached masks when present, else segment (and cache when ``masks_dir`` is given)."""
    from ..segmentation import Segmentation, cell_stats, read_masks, segment
    from ..segmentation.folder import mask_paths, write_masks

    if masks_dir is not None and mask_paths(masks_dir, image_id)[0].is_file():
        label_map, nuclei = read_masks(masks_dir, image_id)
        return Segmentation(label_map, nuclei, *cell_stats(label_map))
    seg = segment(image, seg_cfg)
    if masks_dir is not None:
        write_masks(masks_dir, image_id, seg)
    return seg


def prepare_image(images_dir: Path, image_id: str, size: tuple[int, int], seg_cfg: SegmentationConfig,
                  crop_cfgs: Sequence[CellsConfig], masks_dir: Path | None = None, stain: bool = False) -> Prepared:
    """Read, segment, crop and encode one image (with ``stain``: also each cell's relative protein signal,
    for ``inference.stain_negative``). Failures become ``Prepared.error`` (never raised)."""
    from ..cells import extract_crops
    from ..cells.features import cell_channel_mean
    from ..confidence import relative_stain
    from ..io import read_image
    from ..rle import encode_label_map

    out = Prepared(image_id)
    clock = time.perf_counter
    try:
        t = clock()
        image = read_image(images_dir, image_id)
        out.seconds["read"] = clock() - t
        if image.shape[:2] != size:
            out.error = (f"image is {image.shape[1]}x{image.shape[0]} px but the sample submission says "
                         f"{size[1]}x{size[0]}")
            return out
        t = clock()
        seg = _segment(image, image_id, seg_cfg, masks_dir)
        out.seconds["segment"] = clock() - t
        label_map = np.asarray(seg.cells)
        if label_map.shape != size:
            out.error = f"segmentation has shape {label_map.shape}, image {size}"
            return out
        t = clock()
        out.encodings = encode_label_map(label_map)
        out.seconds["encode"] = clock() - t
        if not out.encodings:
            out.error = "no cells found"
            return out
        t = clock()
        # row k of the crops and of border/rel_area is cell k+1; an id without pixels (not in a
        # consecutive map, but cheap to guard) has no mask and is left out
        ids = np.array(sorted(out.encodings), np.int64)
        for cells_cfg in crop_cfgs:
            key = crop_key(cells_cfg)
            if key not in out.crops:
                crops = extract_crops(image, label_map, cells_cfg.size, cells_cfg.padding, cells_cfg.neighbours)
                out.crops[key] = crops[ids - 1]
        if stain:
            out.stain = relative_stain(cell_channel_mean(image, label_map)[ids - 1])
        del image
        out.seconds["crop"] = clock() - t
        out.cell_ids = ids
        out.border = np.asarray(seg.border, bool)[ids - 1]
        out.rel_area = np.asarray(seg.rel_area, np.float32)[ids - 1]
    except Exception as exc:  # noqa: BLE001 - one image must never stop the run
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _row(encodings: dict[int, str], ids: np.ndarray, probs: np.ndarray, infer_cfg: InferenceConfig,
         border, rel_area, image_probs) -> str:
    if len(ids) == 0:
        return ""
    conf = combine(probs, infer_cfg, border, rel_area, image_probs)
    return prediction_string(encodings, conf, ids, infer_cfg.floor)
