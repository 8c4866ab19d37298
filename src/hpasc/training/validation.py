"""Validation of one epoch: predict every cell of the held-out images and score the predictions.

Two views: the cell-level proxy (each cell inherits its image's labels; mean AP and ROC AUC over
classes, ``hpasc.metric.cell_proxy_scores``), and — when cell-level truth exists (``data.truth_csv``,
the synthetic data) — the competition mAP of the submission rows these probabilities would make
through the inference confidence recipe (``hpasc.confidence.combine``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config


def predict_crops(model: nn.Module, crops: np.ndarray, rows: np.ndarray, cfg: Config,
                  device: torch.device) -> np.ndarray:
    """Logits (n, 19) float32 of the crop ``rows`` with the inference preprocessing (no augmentation),
    through the model loop inference uses (``hpasc.models.predict_logits``)."""
    from ..data import build_transform
    from ..models import predict_logits

    batch = cfg.train.val_batch_size or 2 * cfg.train.batch_size
    return predict_logits(model, crops, np.asarray(rows), build_transform(cfg.cells, train=False), batch,
                          device, amp=cfg.train.amp)


class CompetitionScorer:
    """The competition mAP of validation-cell probabilities against cell-level truth.

    Mask strings of the validation images are encoded once (they do not change between epochs).
    """

    def __init__(self, truth_csv: str | Path, val_table: pd.DataFrame, masks_dir: Path, cfg: Config):
        from ..metric import read_truth
        from ..rle import encode_label_map
        from ..segmentation import read_masks

        truth = read_truth(truth_csv)
        ids = list(dict.fromkeys(val_table["ID"].astype(str)))
        self.truth = truth[truth["ID"].astype(str).isin(ids)].reset_index(drop=True)
        if len(self.truth) == 0:
            raise ValueError(f"{truth_csv}: none of the {len(ids)} validation images has truth")
        self.infer_cfg = cfg.inference
        self.images = []  # (ID, positions in val order, cell ids, encodings, border, rel_area)
        positions = val_table.reset_index(drop=True).groupby("ID", sort=False).indices
        for image_id in self.truth["ID"].astype(str):
            pos = positions.get(image_id, np.zeros(0, np.int64))
            encodings = encode_label_map(read_masks(masks_dir, image_id)[0])
            sub = val_table.iloc[pos]
            cell_ids = sub["cell_id"].to_numpy(np.int64)
            keep = np.array([int(c) in encodings for c in cell_ids], bool)
            self.images.append((image_id, pos[keep], cell_ids[keep], encodings,
                                _column(sub, "border", keep), _column(sub, "rel_area", keep)))

    def submission(self, probs: np.ndarray) -> pd.DataFrame:
        from ..confidence import combine
        from ..submission import prediction_string

        rows = []
        for image_id, pos, cell_ids, encodings, border, rel_area in self.images:
            text = ""
            if len(pos):
                conf = combine(probs[pos], self.infer_cfg, border, rel_area)
                text = prediction_string(encodings, conf, cell_ids, self.infer_cfg.floor)
            rows.append(text)
        return pd.DataFrame({"ID": self.truth["ID"], "ImageWidth": self.truth["ImageWidth"],
                             "ImageHeight": self.truth["ImageHeight"], "PredictionString": rows})

    def __call__(self, probs: np.ndarray) -> float:
        from ..metric import score

        return float(score(self.truth, self.submission(probs), progress=False).mAP)


def _column(table: pd.DataFrame, name: str, keep: np.ndarray) -> np.ndarray | None:
    return table[name].to_numpy()[keep] if name in table else None


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def evaluate(model: nn.Module, crops: np.ndarray, rows: np.ndarray, targets: np.ndarray, cfg: Config,
             device: torch.device, scorer: CompetitionScorer | None = None,
             stain: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """-> ({"val_loss", "val_map", "val_auc", "val_comp_map"}, probabilities (n, 19)).

    With ``inference.stain_negative`` the probabilities are the ones inference writes: Negative raised
    by ``hpasc.confidence.stain_negative`` with ``stain`` (one value per row); the loss is the model's."""
    from ..confidence import stain_negative
    from ..metric import cell_proxy_scores

    logits = predict_crops(model, crops, rows, cfg, device)
    t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(np.asarray(targets, np.float32))
    loss = float(F.binary_cross_entropy_with_logits(t_logits, t_targets)) if len(logits) else math.nan
    probs = torch.sigmoid(t_logits).numpy()
    if cfg.inference.stain_negative and len(probs):
        if stain is None:
            raise ValueError("inference.stain_negative: validation needs each cell's stain")
        probs = stain_negative(probs, stain, cfg.inference.stain_gate)
    proxy = cell_proxy_scores(targets, probs) if len(probs) else {"mAP": None, "mAUC": None}
    metrics = {"val_loss": loss, "val_map": _nan_if_none(proxy["mAP"]), "val_auc": _nan_if_none(proxy["mAUC"]),
               "val_comp_map": scorer(probs) if scorer is not None else math.nan}
    return metrics, probs
