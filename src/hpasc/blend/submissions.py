"""Averaging submission files (``hpasc blend submissions``).

Confidences are averaged per (cell, class) with weights, a
class missing from a cell counting 0. Cells are the same when their mask strings are identical; otherwise
they are matched by IoU >= 0.6 (pairs taken in descending IoU, each cell at most once per submission),
with IoUs from the scorer's sweep over mask runs (no full-size masks); unmatched cells stay cells of their
own. The first submission's mask string represents a matched cell.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..labels import NUM_CLASSES
from .errors import BlendError

MATCH_IOU = 0.6


@dataclass
class _Cell:
    """One cell of the blended image: its mask string, weighted confidence sums and (lazily) its runs."""

    mask: str
    conf: np.ndarray
    runs: tuple[np.ndarray, np.ndarray] | None = None  # ``hpasc.rle.mask_runs``: decoded when needed


def cell_confidences(text: object, where: str = "") -> dict[str, np.ndarray]:
    """``"c conf mask c conf mask ..."`` -> {mask: (19,) confidences}, in first-seen order (parsed by
    ``hpasc.submission.parse_prediction_string``; a bad token is a ``BlendError`` naming ``where``)."""
    from ..submission import SubmissionError, parse_prediction_string

    try:
        triples = parse_prediction_string(text, where)
    except SubmissionError as exc:
        raise BlendError(str(exc)) from None
    cells: dict[str, np.ndarray] = {}
    for c, p, mask in zip(triples.classes, triples.conf, triples.masks):
        vec = cells.setdefault(mask, np.zeros(NUM_CLASSES))
        vec[c] = max(vec[c], p)  # a class repeated for one cell counts once, at its best confidence
    return cells


def _runs(mask: str, height: int, width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    from ..rle import MaskDecodeError, mask_runs

    try:
        return mask_runs(mask, height, width)
    except MaskDecodeError as exc:
        raise BlendError(f"{where}: a mask does not decode at {width}x{height} ({exc})") from None


def _match_by_iou(cells: list[_Cell], free: list[int], new_runs: list, height: int, width: int,
                  where: str) -> list[int | None]:
    """For each new mask, the free blended cell it is matched to (IoU >= 0.6), or None. Pairs are taken
    greedily in descending IoU, each cell at most once. IoUs come from the scorer's sweep over runs."""
    from ..metric import runs_iou

    assign: list[int | None] = [None] * len(new_runs)
    if not free or not new_runs:
        return assign
    for j in free:
        if cells[j].runs is None:
            cells[j].runs = _runs(cells[j].mask, height, width, where)
    old_runs = [cells[j].runs for j in free]
    iou = runs_iou(old_runs, new_runs)  # (new, free)
    threshold = np.float32(MATCH_IOU)
    used = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        p, f = divmod(int(flat), len(free))
        if iou[p, f] < threshold:
            break
        if assign[p] is None and f not in used:
            assign[p] = free[f]
            used.add(f)
    return assign


def blend_image(strings: Sequence[object], weights: Sequence[float], height: int, width: int,
                where: str = "") -> list[_Cell]:
    """One image's prediction strings from several submissions -> blended cells (conf = weighted mean).

    Per submission: a mask identical to a blended cell's joins it; the others are matched by IoU to the
    blended cells this submission has not matched yet; the rest become new cells (in order of appearance).
    """
    total = float(np.sum(weights))
    cells: list[_Cell] = []
    by_mask: dict[str, int] = {}
    for s, (text, w) in enumerate(zip(strings, weights)):
        who = f"{where} (submission {s + 1})"
        taken: set[int] = set()  # blended cells already matched by a cell of this submission
        rest = []
        for mask, conf in cell_confidences(text, who).items():
            if mask in by_mask:  # identical masks first: they must not lose their cell to a look-alike
                cells[by_mask[mask]].conf += w * conf
                taken.add(by_mask[mask])
            else:
                rest.append((mask, conf))
        free = [j for j in range(len(cells)) if j not in taken]
        new_runs = [_runs(mask, height, width, who) for mask, _ in rest] if free else [None] * len(rest)
        for (mask, conf), j, runs in zip(rest, _match_by_iou(cells, free, new_runs, height, width, who), new_runs):
            if j is None:
                j = by_mask[mask] = len(cells)
                cells.append(_Cell(mask, np.zeros(NUM_CLASSES), runs))
            cells[j].conf += w * conf
    for cell in cells:
        cell.conf /= total
    return cells


def format_cells(cells: Sequence[_Cell], floor: float = 0.0) -> str:
    """Blended cells -> PredictionString (``hpasc.submission.prediction_string``: classes >= floor, > 0)."""
    from ..submission import prediction_string

    if not cells:
        return ""
    conf = np.stack([cell.conf for cell in cells])
    return prediction_string([cell.mask for cell in cells], conf, np.arange(len(cells)), floor=floor)


def blend_submissions(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                      weights: Sequence[float] | None = None, sample_submission: str | os.PathLike | None = None,
                      floor: float = 0.0, progress: bool = True) -> Path:
    """Weighted average of several submission CSVs -> ``out``, with the IDs, order and sizes of
    ``sample_submission`` (default: the first file). Returns the output path."""
    from tqdm import tqdm

    from ..submission import read_submission, write_submission

    if len(paths) < 1:
        raise BlendError("blend needs at least one submission")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise BlendError(f"{len(weights)} weights for {len(paths)} submissions")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise BlendError(f"weights must be non-negative with a positive sum, got {weights}")
    subs = [read_submission(p) for p in paths]
    sample = read_submission(sample_submission, kind="sample submission") if sample_submission else subs[0]
    texts = []
    for path, sub in zip(paths, subs):
        if sub.ID.duplicated().any():
            raise BlendError(f"{path}: image {sub.ID[sub.ID.duplicated()].iat[0]} appears twice")
        texts.append(dict(zip(sub.ID, sub.PredictionString)))
    rows = {}
    for image_id, width, height in tqdm(zip(sample.ID, sample.ImageWidth, sample.ImageHeight), total=len(sample),
                                        desc="blend", disable=None if progress else True):
        strings = []
        for path, text in zip(paths, texts):
            if image_id not in text:
                raise BlendError(f"{path}: image {image_id} is missing")
            strings.append(text[image_id])
        cells = blend_image(strings, weights, int(height), int(width), f"{image_id}")
        rows[image_id] = format_cells(cells, floor)
    write_submission(rows, sample, out)
    return Path(out)
