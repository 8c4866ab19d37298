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
from .config import Config, ConfigError, load_config
from .training.distributed import DistInfo, barrier, cleanup, init_distributed
from .training.fold_data import FoldData, fold_data, prepare_cells
from .training.loop import Trainer
from .training.pseudo import round_config

__all__ = ["run_dir", "train_fold", "train_folds", "train_on", "run_training", "FoldData"]


def run_dir(cfg: Config, fold: int, round_: int = 0) -> Path:
    """``<train.out_dir>/<name>/fold<k>``; ``.../round<r>/fold<k>`` for pseudo-label round r >= 1."""
    return runs.run_dir(cfg, fold, round_)


def train_on(cfg: Config, data: FoldData, out: Path, resume: bool = False, info: DistInfo | None = None,
             stop_after_steps: int | None = None) -> Path:
    """Train on already prepared fold data into ``out`` (the loop without the dataset plumbing)."""
    info = info or init_distributed(cfg.train.device)
    return Trainer(cfg, data, out, info).fit(resume=resume, stop_after_steps=stop_after_steps)


def train_fold(cfg: Config, fold: int, resume: bool = False, stop_after_steps: int | None = None,
               round_: int = 0) -> Path:
    """Train fold ``fold`` of ``cfg`` (in pseudo-label round ``round_``); returns the run folder.

    Segments the training images into ``<data.work_dir>/masks/train`` and builds the cell cache when
    they are missing (rank 0 only; the other ranks wait). ``resume`` continues from ``last.pt`` (also
    mid-epoch); ``stop_after_steps`` stops on purpose after that many optimizer steps, leaving last.pt.
    A round >= 1 trains with ``round_config`` (its epochs, learning rate and starting weights).
    """
    cfg = round_config(cfg, fold, round_)
    info = init_distributed(cfg.train.device)
    if info.is_main:
        cache, images_dir, masks_dir = prepare_cells(cfg, build=True)
    barrier(info)
    if not info.is_main:
        cache, images_dir, masks_dir = prepare_cells(cfg, build=False)
    data = fold_data(cfg, fold, cache, images_dir, masks_dir, round_)
    return train_on(cfg, data, run_dir(cfg, fold, round_), resume, info, stop_after_steps)


def train_folds(cfg: Config, folds: str | Sequence[int] = "all", resume: bool = False,
                rounds: Sequence[int] | None = None) -> list[Path]:
    """Train several folds one after the other (``"all"`` -> ``cfg.train.folds``), round by round:
    ``rounds`` (default every round, 0 .. ``pseudo.rounds``); returns the folders of the last round."""
    chosen = list(cfg.train.folds) if folds == "all" else [int(k) for k in folds]
    todo = list(range(cfg.pseudo.rounds + 1)) if rounds is None else [int(r) for r in rounds]
    bad = [r for r in todo if not 0 <= r <= cfg.pseudo.rounds]
    if bad:
        raise ConfigError(f"{cfg.name}: round {bad[0]}: this config has rounds 0..{cfg.pseudo.rounds} "
                          "(pseudo.rounds)")
    info = init_distributed(cfg.train.device)
    try:
        out: list[Path] = []
        for r in todo:
            out = [train_fold(cfg, k, resume=resume, round_=r) for k in chosen]
        return out
    finally:
        cleanup(info)


def run_training(config: str | Path, folds: str | Sequence[int] = "all", resume: bool = False,
                 overrides: Sequence[str] = (), rounds: Sequence[int] | None = None) -> list[Path]:
    """``hpasc train``: load the YAML config with ``key=value`` overrides and train the folds (every
    pseudo-label round unless ``rounds`` names some)."""
    return train_folds(load_config(config, tuple(overrides)), folds, resume=resume, rounds=rounds)
