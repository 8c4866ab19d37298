"""Train cell classifiers fold by fold: ``hpasc train CONFIG [--fold K|all] [--resume] [key=value ...]``.

A run folder ``<train.out_dir>/<cfg.name>/fold<k>/`` holds:

- ``config.yaml`` — the resolved config (all that inference needs besides the weights);
- ``best.pt`` — the weights (EMA weights when ``train.ema``) of the epoch with the best validation mAP
  (``train.select_metric``: the competition mAP when ``data.truth_csv`` gives cell truth, else the
  cell-level proxy mAP); ``last.pt`` — everything needed to resume, saved atomically at the end of each
  epoch and every ``train.checkpoint_every`` optimizer steps;
- ``log.csv`` — epoch, lr, bce, triplet, val_loss, val_map, val_auc, val_comp_map, seconds;
- ``oof.csv`` — ``ID, cell_id, p0..p18`` for every cell of the validation images (best epoch);
- ``curves.png`` — losses and validation scores per epoch.

Checkpoints hold tensors and plain data only (``torch.load(weights_only=True)``). Under ``torchrun`` each
process trains on its share of every epoch (DDP; gloo on CPU); rank 0 validates and writes the files.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import runs
from .config import Config, load_config
from .training.distributed import DistInfo, barrier, cleanup, init_distributed
from .training.fold_data import FoldData, fold_data, prepare_cells
from .training.loop import Trainer

__all__ = ["run_dir", "train_fold", "train_folds", "train_on", "run_training", "FoldData"]


def run_dir(cfg: Config, fold: int) -> Path:
    """``<train.out_dir>/<name>/fold<k>`` (``hpasc.runs.run_dir``)."""
    return runs.run_dir(cfg, fold)


def train_on(cfg: Config, data: FoldData, out: Path, resume: bool = False, info: DistInfo | None = None,
             stop_after_steps: int | None = None) -> Path:
    """Train on already prepared fold data into ``out`` (the loop without the dataset plumbing)."""
    info = info or init_distributed(cfg.train.device)
    return Trainer(cfg, data, out, info).fit(resume=resume, stop_after_steps=stop_after_steps)


def train_fold(cfg: Config, fold: int, resume: bool = False, stop_after_steps: int | None = None) -> Path:
    """Train fold ``fold`` of ``cfg``; returns the run folder.

    Segments the training images into ``<data.work_dir>/masks/train`` and builds the cell cache when
    they are missing (rank 0 only; the other ranks wait). ``resume`` continues from ``last.pt`` (also
    mid-epoch); ``stop_after_steps`` stops on purpose after that many optimizer steps, leaving last.pt.
    """
    info = init_distributed(cfg.train.device)
    if info.is_main:
        cache, images_dir, masks_dir = prepare_cells(cfg, build=True)
    barrier(info)
    if not info.is_main:
        cache, images_dir, masks_dir = prepare_cells(cfg, build=False)
    data = fold_data(cfg, fold, cache, images_dir, masks_dir)
    return train_on(cfg, data, run_dir(cfg, fold), resume, info, stop_after_steps)


def train_folds(cfg: Config, folds: str | Sequence[int] = "all", resume: bool = False) -> list[Path]:
    """Train several folds one after the other (``"all"`` -> ``cfg.train.folds``)."""
    chosen = list(cfg.train.folds) if folds == "all" else [int(k) for k in folds]
    info = init_distributed(cfg.train.device)
    try:
        return [train_fold(cfg, k, resume=resume) for k in chosen]
    finally:
        cleanup(info)


def run_training(config: str | Path, folds: str | Sequence[int] = "all", resume: bool = False,
                 overrides: Sequence[str] = ()) -> list[Path]:
    """``hpasc train``: load the YAML config with ``key=value`` overrides and train the folds."""
    return train_folds(load_config(config, tuple(overrides)), folds, resume=resume)
