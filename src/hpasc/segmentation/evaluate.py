"""``hpasc segment-eval``: our cell label maps against reference ones, image by image.

Per image: F1 at IoU 0.5 / 0.6 / 0.75 (one-to-one matches: mutual best pairs at or above the threshold;
above 0.5 every such pair is mutual), the mean IoU of the cells matched at 0.5, and the two ways a
segmentation goes wrong that a score hides:

- **merged** (under-segmentation): one of our cells holds at least half of each of two or more
  reference cells;
- **split** (over-segmentation): one reference cell holds at least half of each of two or more of our
  cells.

Overall: the mean of the per-image F1 (what the segmentation targets are stated in) and the F1 pooled over
all cells. Reference maps are ``{ID}.png`` (``hpasc segment``'s layout) or ``{ID}_cellmask.png`` (the HPA
samples); an image with a reference but no mask of ours scores 0 and is named.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..paths import is_plain_id
from .folder import _read_label_png, mask_paths
from .postprocess import relabel_consecutive
from .quality import iou_from_overlap, overlap_matrix

THRESHOLDS = (0.5, 0.6, 0.75)
REFERENCE_SUFFIXES = ("", "_cellmask")  # {ID}.png, {ID}_cellmask.png


@dataclass
class ImageScore:
    image_id: str
    n_pred: int
    n_truth: int
    tp: dict[str, int]  # threshold text ("0.6") -> matched cells
    f1: dict[str, float]
    mean_iou: float | None  # over the cells matched at 0.5
    merged: int
    split: int
    missing: bool = False  # no mask of ours for this image


@dataclass
class SegEvalResult:
    images: list[ImageScore]
    mean_f1: dict[str, float | None] = field(default_factory=dict)
    pooled_f1: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _key(thr: float) -> str:
    return f"{thr:g}"


def score_label_maps(pred: np.ndarray, truth: np.ndarray, image_id: str = "") -> ImageScore:
    """One image's scores (module doc) from our label map and the reference one."""
    pred, truth = relabel_consecutive(np.asarray(pred)), relabel_consecutive(np.asarray(truth))
    overlap = overlap_matrix(pred, truth)
    iou = iou_from_overlap(overlap)[1:, 1:]
    area_p, area_t = overlap.sum(axis=1)[1:], overlap.sum(axis=0)[1:]
    inter = overlap[1:, 1:]
    n_pred, n_truth = len(area_p), len(area_t)
    tp, f1 = {}, {}
    mean_iou = None
    if n_pred and n_truth:
        best_t, best_p = iou.argmax(axis=1), iou.argmax(axis=0)
        mutual = best_p[best_t] == np.arange(n_pred)  # our cell p and its best truth cell choose each other
        best_iou = iou[np.arange(n_pred), best_t]
        for thr in THRESHOLDS:
            tp[_key(thr)] = int(np.count_nonzero(mutual & (best_iou >= thr)))
        matched = mutual & (best_iou >= 0.5)
        mean_iou = float(best_iou[matched].mean()) if matched.any() else None
    else:
        tp = {_key(thr): 0 for thr in THRESHOLDS}
    for thr in THRESHOLDS:
        total = n_pred + n_truth
        f1[_key(thr)] = 1.0 if total == 0 else 2.0 * tp[_key(thr)] / total
    holds_truth = inter >= 0.5 * np.maximum(area_t[None, :], 1)  # our cell p holds half of truth cell t
    holds_pred = inter >= 0.5 * np.maximum(area_p[:, None], 1)  # truth cell t holds half of our cell p
    merged = int(np.count_nonzero(holds_truth.sum(axis=1) >= 2)) if n_pred and n_truth else 0
    split = int(np.count_nonzero(holds_pred.sum(axis=0) >= 2)) if n_pred and n_truth else 0
    return ImageScore(image_id, n_pred, n_truth, tp, f1, mean_iou, merged, split)


def reference_path(truth_dir: Path, image_id: str) -> Path | None:
    for suffix in REFERENCE_SUFFIXES:
        path = truth_dir / f"{image_id}{suffix}.png"
        if path.is_file():
            return path
    return None


def reference_ids(truth_dir: os.PathLike | str) -> list[str]:
    """Image ids with a reference label map in ``truth_dir``; nuclei maps, image channel files
    (``{ID}_red.png``, ...: the HPA samples keep images and masks together) and odd names left out."""
    from ..io import CHANNELS

    skip = tuple(f"_{name}" for name in (*CHANNELS, "nuclei"))
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise FileNotFoundError(f"{truth_dir}: reference masks folder not found")
    ids = set()
    for path in truth_dir.glob("*.png"):
        stem = path.stem
        if stem.endswith(skip):
            continue
        stem = stem[: -len("_cellmask")] if stem.endswith("_cellmask") else stem
        if is_plain_id(stem):
            ids.add(stem)
    return sorted(ids)


def evaluate_folder(masks_dir: os.PathLike | str, truth_dir: os.PathLike | str,
                    ids: list[str] | None = None) -> SegEvalResult:
    """Every image with a reference map (or the given ``ids``) -> per-image and overall scores."""
    from ..io import ImageReadError

    start = time.perf_counter()
    masks_dir, truth_dir = Path(masks_dir), Path(truth_dir)
    ids = reference_ids(truth_dir) if ids is None else list(ids)
    if not ids:
        raise FileNotFoundError(f"{truth_dir}: no reference label maps ({{ID}}.png or {{ID}}_cellmask.png)")
    images = []
    for image_id in ids:
        ref = reference_path(truth_dir, image_id)
        if ref is None:
            raise FileNotFoundError(f"{truth_dir}: no reference map for {image_id}")
        truth = _read_label_png(ref)
        ours_path = mask_paths(masks_dir, image_id)[0]
        if not ours_path.is_file():
            score = score_label_maps(np.zeros_like(truth), truth, image_id)
            score.missing = True
        else:
            pred = _read_label_png(ours_path)
            if pred.shape != truth.shape:
                raise ImageReadError(ours_path, f"shape {pred.shape} differs from the reference {truth.shape}")
            score = score_label_maps(pred, truth, image_id)
        images.append(score)
    result = SegEvalResult(images)
    for thr in THRESHOLDS:
        k = _key(thr)
        result.mean_f1[k] = float(np.mean([s.f1[k] for s in images]))
        total = sum(s.n_pred + s.n_truth for s in images)
        result.pooled_f1[k] = 2.0 * sum(s.tp[k] for s in images) / total if total else None
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def format_result(result: SegEvalResult) -> str:
    keys = [_key(t) for t in THRESHOLDS]
    head = f"{'image':<38} {'ours':>5} {'ref':>5} " + " ".join(f"{'F1@' + k:>7}" for k in keys) \
        + f" {'mIoU':>6} {'merged':>6} {'split':>6}"
    lines = [head]
    for s in result.images:
        iou = "     -" if s.mean_iou is None else f"{s.mean_iou:6.3f}"
        note = "  (no mask of ours)" if s.missing else ""
        lines.append(f"{s.image_id:<38} {s.n_pred:>5} {s.n_truth:>5} "
                     + " ".join(f"{s.f1[k]:7.3f}" for k in keys) + f" {iou} {s.merged:>6} {s.split:>6}{note}")
    lines.append(f"{'mean over images':<50} " + " ".join(f"{result.mean_f1[k]:7.3f}" for k in keys))
    lines.append(f"{'pooled over cells':<50} " + " ".join(
        f"{result.pooled_f1[k]:7.3f}" if result.pooled_f1[k] is not None else "      -" for k in keys))
    lines.append(f"{len(result.images)} images in {result.seconds:.2f} s")
    return "\n".join(lines)
