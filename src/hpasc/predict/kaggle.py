"""The Kaggle kernel's whole job (``kernels/hpasc-inference/kernel.py`` calls it)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..runs import BEST_FILE, CONFIG_FILE, find_runs
from .chunks import available_cpus
from .ensemble import PredictError
from .runner import predict

# segmentation settings that name a local file: on Kaggle it lives in the models dataset instead
SEGMENTATION_FILES = ("nuclei_weights", "cell_weights", "cellpose_model")


def predict_kaggle(time_budget: float | None = None, workers: int | None = None) -> Path:
    """The kernel's whole job: competition test images + the models dataset -> working/submission.csv.

    Runs are the ``<config>/fold<k>`` folders of the models dataset; its ``weights.yaml`` is used when
    present. ``$HPASC_TIME_BUDGET`` (seconds) overrides the default budget (8 h of the 9 h limit).
    """
    from ..paths import COMPETITION, MODELS_DATASET, kaggle_input, kaggle_working

    comp, models = kaggle_input(COMPETITION), kaggle_input(MODELS_DATASET)
    # any depth: a dataset uploaded from a parent folder gains a level
    if not models.is_dir():
        raise PredictError(f"{models}: the models dataset is not attached")
    try:
        runs = find_runs([models], need=(BEST_FILE,), error=PredictError)
    except PredictError:
        raise PredictError(f"{models}: no <config>/fold<k>/ run (config.yaml + best.pt) in the models dataset") from None
    weights = sorted(models.rglob("weights.yaml"), key=lambda p: len(p.parts))
    if time_budget is None:
        time_budget = float(os.environ.get("HPASC_TIME_BUDGET") or 8 * 3600)
    return predict(runs, comp / "test", comp / "sample_submission.csv", kaggle_working() / "submission.csv",
                   weights=weights[0] if weights else None, time_budget=time_budget,
                   seg_overrides=relocated_segmentation_files(runs, models),
                   workers=workers or min(4, available_cpus()), bad_ids="keep")


def relocated_segmentation_files(runs: Sequence[Path], models: Path) -> list[str]:
    """``key=path`` overrides pointing the runs' segmentation weight files at their copies in the models
    dataset (``kernels/build_datasets.sh`` packs them there by file name).

    A config written on the training machine names files by their paths there; on Kaggle those paths do
    not exist, and segmentation would fail on every image (a valid but empty submission). A path that
    exists, or whose file name is not in the dataset, is left alone (the backend then names the problem).
    """
    from ..config import load_config

    cfg = load_config(runs[0] / CONFIG_FILE).segmentation  # predict segments with the first run's settings
    out = []
    for key in SEGMENTATION_FILES:
        value = getattr(cfg, key)
        if not value or Path(value).is_file():
            continue
        found = sorted(models.rglob(Path(value).name), key=lambda p: len(p.parts))
        if found:
            out.append(f"{key}={found[0]}")
    return out
