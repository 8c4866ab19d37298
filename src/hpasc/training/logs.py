"""The run's ``log.csv`` (one row per epoch) and ``curves.png`` (losses and validation scores)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..fsutil import atomic_path

LOG_COLUMNS = ("epoch", "lr", "bce", "triplet", "val_loss", "val_map", "val_auc", "val_comp_map", "seconds")


def write_log(path: Path, rows: list[dict]) -> None:
    """All epochs so far (rewritten whole, atomically: a resumed run keeps one consistent file)."""
    frame = pd.DataFrame([{k: row.get(k, math.nan) for k in LOG_COLUMNS} for row in rows], columns=LOG_COLUMNS)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def plot_curves(path: Path, rows: list[dict], title: str = "") -> None:
    """Training/validation loss and validation mAP/AUC per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows)
    if frame.empty:
        return
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for col, label in (("bce", "train BCE"), ("triplet", "train triplet"), ("val_loss", "val BCE")):
        if col in frame and frame[col].notna().any():
            rows_ = frame[frame[col].notna()]  # validation columns exist only on validated epochs
            ax_loss.plot(rows_["epoch"], rows_[col], marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for col, label in (("val_map", "cell proxy mAP"), ("val_auc", "cell proxy AUC"),
                       ("val_comp_map", "competition mAP")):
        if col in frame and frame[col].notna().any():
            rows_ = frame[frame[col].notna()]
            ax_score.plot(rows_["epoch"], rows_[col], marker="o", label=label)
    ax_score.set_xlabel("epoch")
    ax_score.set_ylim(0, 1)
    ax_score.set_title("validation")
    ax_score.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
