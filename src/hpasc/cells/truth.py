"""Our segmented cells given the labels of the truth cells they match (worlds with cell-level truth).

The learner ceiling (``cells.selection: truth``) and the cell-level evaluation of out-of-fold
predictions both need to know, for each of *our* cells, which truth cell it is. Cells are matched on the
label maps themselves (``segmentation.quality.iou_matrix``: one ``bincount`` over the pixel pairs); a pair
matches at IoU >= ``min_iou``. With ``min_iou`` >= 0.5 a cell
matches at most one truth cell and the other way round, so no assignment problem arises.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..labels import format_label


def match_label_maps(ours: np.ndarray, truth: np.ndarray, min_iou: float = 0.5
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(our cell ids, their truth cell ids, IoU)`` of the pairs whose IoU >= ``min_iou`` (> 0): each of
    our cells takes the truth cell it overlaps best."""
    from ..segmentation.quality import iou_matrix

    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    iou = iou_matrix(ours, truth)
    iou[0, :] = 0.0  # background is not a cell
    iou[:, 0] = 0.0
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(len(iou)), best]
    mine = np.flatnonzero(best_iou >= min_iou)
    return mine.astype(np.int64), best[mine].astype(np.int64), best_iou[mine]


def truth_cell_labels(truth: os.PathLike | str | pd.DataFrame, masks_dir: os.PathLike | str,
                      ids: list[str] | None = None, min_iou: float = 0.5) -> pd.DataFrame:
    """``ID, cell_id, truth_label, truth_iou``: each of our cells (masks in ``masks_dir``) that matches a
    truth cell, with that cell's labels (``format_label`` text, e.g. ``"0|16"``). ``ids`` limits the
    images (default: every truth image); an image without masks is skipped."""
    from ..metric import _frame, read_truth, truth_cells
    from ..rle import decode_label_map
    from ..segmentation import read_masks
    from ..segmentation.folder import mask_paths

    frame = _frame(truth, read_truth)
    wanted = None if ids is None else set(map(str, ids))
    rows = []
    for row in frame.itertuples(index=False):
        image_id = str(row.ID)
        if (wanted is not None and image_id not in wanted) or not mask_paths(Path(masks_dir), image_id)[0].is_file():
            continue
        masks, labels = truth_cells(image_id, str(row.PredictionString))
        truth_map = decode_label_map(masks, int(row.ImageHeight), int(row.ImageWidth))
        ours = read_masks(masks_dir, image_id)[0]
        mine, theirs, iou = match_label_maps(ours, truth_map, min_iou)
        rows += [(image_id, int(c), format_label(labels[t - 1]), float(v)) for c, t, v in zip(mine, theirs, iou)]
    return pd.DataFrame(rows, columns=["ID", "cell_id", "truth_label", "truth_iou"])
