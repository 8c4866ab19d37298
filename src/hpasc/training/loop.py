"""The training loop of one fold: ``Trainer(cfg, fold_data, run_dir).fit()``.

AdamW with a warm-up + cosine schedule, gradient accumulation and clipping, optional EMA, AMP on CUDA,
DDP under torchrun, validation each epoch on rank 0, best/last checkpoints, early stopping, and resume
from the last checkpoint — also from the middle of an epoch, ending with the same weights as an
uninterrupted run (every random draw is a function of the seed and the position in the run; see
``sampling``). With ``model.image_head`` the batches are made of whole images, so the image head sees
several cells of each image it is trained on; the multiple-instance term (``loss.mil_weight``) keeps
random batches and pools over the last logits of the images' other cells (``mil_bank``).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import runs
from ..cells.features import table_stain
from ..config import Config, ConfigError, load_config, save_config, to_dict
from ..labels import NUM_CLASSES
from ..losses import Criterion
from ..models import build_model, unwrap
from .distributed import DistInfo, barrier, broadcast_object, mean_over_ranks
from .fold_data import FoldData
from .logs import plot_curves, write_log
from .mil_bank import LogitBank
from .sampling import EpochSampler, SeededItems, _mix
from .state import (
    CheckpointError,
    ModelEma,
    load_checkpoint,
    lr_factor,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_lr,
    set_rng_state,
)
from .validation import CompetitionScorer, evaluate


@dataclass
class Progress:
    """Where the run is; saved in last.pt so a resumed run continues exactly here."""

    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # batches of this epoch already trained (a multiple of accum_steps)
    step: int = 0  # optimizer steps so far
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # bce, triplet, batches this epoch
    seconds: float = 0.0  # training seconds spent in this epoch before an interruption
    history: list[dict] = field(default_factory=list)  # log rows of finished epochs
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False  # early stopping fired


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


log = logging.getLogger(__name__)

SELECT_METRICS = ("auto", "comp_map", "map", "auc")  # train.select_metric (checked when a config loads)
# sections a resumed run may not change: they define the weights' shapes and what the weights have seen
FROZEN_ON_RESUME = ("model", "cells", "segmentation", "pseudo")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Before ``--resume`` writes anything: a run folder trained with other model, cells or segmentation
    settings cannot be continued with these; a ConfigError names the changed keys. Other
    changes (more epochs, another lr) are allowed and logged."""
    saved_path = run_dir / runs.CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = _flat(to_dict(load_config(saved_path)))
    now = _flat(to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    frozen = [k for k in changed if k.split(".")[0] in FROZEN_ON_RESUME]
    if frozen:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in frozen[:6])
        raise ConfigError(f"{saved_path}: --resume with changed settings ({detail}); this run cannot "
                          "continue with them: use another train.out_dir or drop --resume")
    if changed:
        log.warning("--resume: continuing %s with changed %s", run_dir, ", ".join(changed))


def sweep_stale_temporaries(run_dir: Path) -> None:
    """Remove the ``.NAME.*.tmp`` files a killed atomic write leaves behind."""
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def select_metric_name(cfg: Config, has_truth: bool) -> str:
    name = cfg.train.select_metric
    if name == "auto":
        return "val_comp_map" if has_truth else "val_map"
    if name not in SELECT_METRICS:
        raise ValueError(f"train.select_metric={name!r}: expected one of {', '.join(SELECT_METRICS)}")
    if name == "comp_map" and not has_truth:
        raise ValueError("train.select_metric=comp_map needs data.truth_csv (cell-level truth)")
    return f"val_{name}"


class Trainer:
    """Trains one fold into ``run_dir``; ``fit()`` returns the run folder."""

    def __init__(self, cfg: Config, data: FoldData, run_dir: Path, info: DistInfo | None = None):
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.info = info or DistInfo()
        self.device = self.info.device
        tc = cfg.train
        if tc.accum_steps < 1 or tc.batch_size < 1 or tc.epochs < 1:
            raise ValueError("train.batch_size, train.accum_steps and train.epochs must be >= 1")
        self.metric = select_metric_name(cfg, cfg.data.truth_csv is not None)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not tc.deterministic
        seed_everything(tc.seed)
        self.amp = tc.amp and self.device.type == "cuda"
        # channels-last on every device, as inference: a training step of the demo's model on 2 CPU cores
        # takes 31 ms instead of 41 ms (and tensor cores prefer it on GPU)
        model = build_model(cfg.model).to(self.device).to(memory_format=torch.channels_last)
        self.ema = ModelEma(model, tc.ema) if tc.ema else None
        # the fused kernel: one pass over all parameters (a CPU step of the demo's model 6.5 -> 1.3 ms)
        self.optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr,
                                           fused=self.device.type in ("cpu", "cuda"))
        if self.info.distributed:
            if self.device.type == "cuda":  # per-GPU batches of the big models are small
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # every parameter takes part in every step (the image head too: training batches always
            # carry image groups), so DDP needs no unused-parameter search
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.model = model
        self.criterion = Criterion(cfg.loss).to(self.device)
        # the image head pools the cells of one image: each crop row's image, as an integer code
        codes = pd.factorize(data.table["ID"])[0].astype("int64")
        self.image_codes = torch.from_numpy(codes) if cfg.model.image_head else None
        # the multiple-instance term pools each image's cells: the batch's, and the others' last logits
        self.bank = (LogitBank(codes, np.asarray(data.train_rows), NUM_CLASSES, self.device)
                     if cfg.loss.mil_weight > 0 else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loader, self.sampler = self._train_loader()
        # the batch half of the augmentation (cells.augment: standard_batch), applied on the device
        self.batch_augment = getattr(self.loader.dataset.transform, "batch_augment", None)
        self.batches = self.sampler.batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches / tc.accum_steps)
        self.total_steps = self.steps_per_epoch * tc.epochs
        self.warmup_steps = round(tc.warmup_epochs * self.steps_per_epoch)
        # inference's per-cell Negative from the protein signal needs each validation cell's stain
        self.val_stain = table_stain(data.val_table) if cfg.inference.stain_negative else None
        self.scorer = None
        if cfg.data.truth_csv and self.info.is_main:
            self.scorer = CompetitionScorer(cfg.data.truth_csv, data.val_table, data.masks_dir, cfg)
        self.progress = Progress()

    # ------------------------------------------------------------------ set-up

    def _train_loader(self) -> tuple[DataLoader, EpochSampler]:
        from ..data import CellDataset, build_transform, class_balance_weights, collate_items

        cfg, tc, data = self.cfg, self.cfg.train, self.data
        dataset = CellDataset(data.crops, data.train_targets, build_transform(cfg.cells, train=True, seed=tc.seed),
                              indices=data.train_rows)
        weights = class_balance_weights(data.train_targets, cfg.cells.balance_cap) if cfg.cells.balance else None
        if data.train_weights is not None:  # the sources' sampling weights (data.sources)
            weights = data.train_weights * (1.0 if weights is None else np.asarray(weights, np.float64))
        per_rank = None
        if tc.max_steps_per_epoch is not None:
            per_rank = min(len(dataset) // self.info.world, tc.max_steps_per_epoch * tc.accum_steps * tc.batch_size)
        # the image head learns from the cells of one image together: batches of whole images
        grouped = cfg.model.image_head if tc.group_by_image is None else tc.group_by_image
        groups = pd.factorize(data.table["ID"])[0][data.train_rows] if grouped else None
        sampler = EpochSampler(len(dataset), tc.batch_size, tc.seed, weights, self.info.rank, self.info.world,
                               drop_last=len(dataset) > tc.batch_size, num_samples=per_rank, groups=groups)
        loader = DataLoader(
            SeededItems(dataset, tc.seed), batch_size=tc.batch_size, sampler=sampler, collate_fn=collate_items,
            num_workers=tc.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=tc.num_workers > 0,
            # its own generator: creating an epoch's iterator must not consume the global RNG that
            # drives dropout, or a resumed run would drift from an uninterrupted one
            generator=torch.Generator().manual_seed(tc.seed))
        return loader, sampler

    # ------------------------------------------------------------------ checkpoints

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def _save_last(self) -> None:
        if not self.info.is_main:
            return
        p = self.progress
        save_checkpoint({
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": {k: getattr(p, k) for k in Progress.__dataclass_fields__},
            "config": to_dict(self.cfg),
            "mil_bank": self.bank.state_dict() if self.bank is not None else None,
        }, self.run_dir / runs.LAST_FILE)

    def _resume(self) -> bool:
        """Load last.pt when there is one; False when starting fresh."""
        path = self.run_dir / runs.LAST_FILE
        if not path.is_file():
            return False
        # on the CPU: RNG states must stay CPU tensors; weights and optimizer state move to their
        # parameters' device when loaded
        state = load_checkpoint(path, "cpu")
        try:
            unwrap(self.model).load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not fit this config's model ({str(exc).splitlines()[0]})") from None
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict({"weights": state["ema"], "updates": state.get("ema_updates", 0)})
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None and state.get("mil_bank") is not None:
            self.bank.load_state_dict(state["mil_bank"])
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"])
        return True

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False, stop_after_steps: int | None = None) -> Path:
        """Train (or continue) to the end; ``stop_after_steps`` saves last.pt and returns after that many
        optimizer steps — an interruption on purpose (tests, time-boxed sessions)."""
        if resume:  # everything is checked before the run folder is touched
            check_resume_config(self.cfg, self.run_dir)
            if not self._resume() and self.info.is_main:
                log.warning("--resume: %s has no last.pt; starting this fold from scratch", self.run_dir)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                sweep_stale_temporaries(self.run_dir)
            save_config(self.cfg, self.run_dir / runs.CONFIG_FILE)
        barrier(self.info)
        threads = torch.get_num_threads()
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        try:
            p = self.progress
            while p.epoch < self.cfg.train.epochs and not p.stopped:
                if not self._train_epoch(stop_after_steps):
                    break
                self._end_epoch()
        finally:
            torch.set_num_threads(threads)
        return self.run_dir

    def _train_epoch(self, stop_after_steps: int | None) -> bool:
        """One epoch from ``progress.batch`` on; False when stopped on purpose mid-epoch."""
        tc, p = self.cfg.train, self.progress
        self.sampler.set_epoch(p.epoch, p.batch)
        self.model.train()
        started = time.perf_counter()
        bar = tqdm(self.loader, total=self.batches - p.batch, desc=f"{self.cfg.name} epoch {p.epoch + 1}",
                   unit="batch", disable=None if self.info.is_main else True, leave=False)
        for batch in bar:
            accumulating = (p.batch + 1) % tc.accum_steps != 0 and p.batch + 1 < self.batches
            losses = self._micro_step(batch, accumulating)
            p.sums[0] += float(losses["bce"])
            p.sums[1] += float(losses["triplet"])
            p.sums[2] += 1
            p.batch += 1
            if p.batch % tc.accum_steps == 0 or p.batch == self.batches:
                self._optimizer_step()
                bar.set_postfix(bce=f"{p.sums[0] / p.sums[2]:.4f}", trip=f"{p.sums[1] / p.sums[2]:.4f}")
                interrupt = stop_after_steps is not None and p.step >= stop_after_steps
                every = tc.checkpoint_every
                if p.batch < self.batches and (interrupt or (every and p.step % every == 0)):
                    p.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self._save_last()
                if interrupt and p.batch < self.batches:
                    bar.close()
                    return False
        bar.close()
        p.seconds += time.perf_counter() - started
        return True

    def _micro_step(self, batch: dict, accumulating: bool) -> dict:
        """Forward + backward of one batch; while ``accumulating`` DDP skips the gradient all-reduce."""
        batch = self.with_groups(batch)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        x = batch["image"]
        if self.batch_augment is not None:  # seeded by (seed, epoch, batch, rank): a resumed run draws the same
            p, info = self.progress, self.info
            x = self.batch_augment(x, _mix(self.cfg.train.seed, p.epoch, p.batch * info.world + info.rank))
        x = x.contiguous(memory_format=torch.channels_last)
        sync = self.model.no_sync() if (self.info.distributed and accumulating) else nullcontext()
        with sync:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                outputs = self.model(x, batch.get("group"))
                losses = self.criterion(outputs, batch)
            if self.bank is not None:
                self.bank.update(batch["index"], outputs["logits"], self.info)
            self.scaler.scale(losses["loss"] / self.cfg.train.accum_steps).backward()
        if not torch.isfinite(losses["loss"].detach()):
            raise FloatingPointError(f"{self.cfg.name}: loss is {float(losses['loss'])} at step "
                                     f"{self.progress.step} (lower train.lr?)")
        return losses

    def with_groups(self, batch: dict) -> dict:
        """The batch + what the image-level terms pool over: ``group`` (each cell's image, 0..G-1) for the
        image head; for the multiple-instance term also the stored logits of those images' other cells."""
        if self.bank is not None:
            return {**batch, **self.bank.pool_inputs(batch["index"])}
        if self.image_codes is not None:
            return {**batch, "group": torch.unique(self.image_codes[batch["index"]], return_inverse=True)[1]}
        return batch

    def _optimizer_step(self) -> None:
        tc, p = self.cfg.train, self.progress
        set_lr(self.optimizer, tc.lr * lr_factor(p.step, self.total_steps, self.warmup_steps, tc.min_lr_ratio))
        if tc.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        p.step += 1

    def _end_epoch(self) -> None:
        """Validate (rank 0; every ``train.val_every`` epochs and after the last), log, keep the best
        weights, decide on early stopping (``patience`` counts validations), save last.pt."""
        tc, p = self.cfg.train, self.progress
        sums = mean_over_ranks(torch.tensor(p.sums, dtype=torch.float64), self.info).tolist()
        row = {"epoch": p.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
               "bce": sums[0] / max(sums[2], 1), "triplet": sums[1] / max(sums[2], 1)}
        validate = (p.epoch + 1) % tc.val_every == 0 or p.epoch + 1 >= tc.epochs
        if self.info.is_main and not validate:  # log the training losses only
            row["seconds"] = round(p.seconds, 2)
            p.history.append(row)
            write_log(self.run_dir / runs.LOG_FILE, p.history)
            tqdm.write(f"{self.cfg.name} {self.run_dir.name} {_describe(row)}", file=sys.stderr)
        elif self.info.is_main:
            started = time.perf_counter()
            metrics, probs = evaluate(self.eval_model, self.data.crops, self.data.val_rows, self.data.val_targets,
                                      self.cfg, self.device, self.scorer, self.val_stain)
            row.update(metrics)
            row["seconds"] = round(p.seconds + time.perf_counter() - started, 2)
            p.history.append(row)
            value = row.get(self.metric, math.nan)
            value = -math.inf if value is None or math.isnan(value) else value
            if value > p.best or p.best_epoch < 0:
                p.best, p.best_epoch, p.bad_epochs = value, p.epoch, 0
                self._save_best(row)
                val = self.data.val_table
                runs.write_oof(self.run_dir / runs.OOF_FILE, val["ID"].to_numpy(), val["cell_id"].to_numpy(), probs)
            else:
                p.bad_epochs += 1
            p.stopped = tc.patience is not None and p.bad_epochs >= tc.patience
            write_log(self.run_dir / runs.LOG_FILE, p.history)
            plot_curves(self.run_dir / runs.CURVES_FILE, p.history, f"{self.cfg.name} {self.run_dir.name}")
            tqdm.write(f"{self.cfg.name} {self.run_dir.name} {_describe(row)}", file=sys.stderr)
        p.stopped = broadcast_object(p.stopped, self.info)
        p.epoch, p.batch, p.sums, p.seconds = p.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
        self._save_last()
        barrier(self.info)

    def _save_best(self, row: dict) -> None:
        save_checkpoint({"model": self.eval_model.state_dict(), "epoch": row["epoch"],
                         "metrics": {k: float(v) for k, v in row.items()}, "config": to_dict(self.cfg)},
                        self.run_dir / runs.BEST_FILE)


def _describe(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"] + [f"{k} {row[k]:.4f}" for k in
                                         ("bce", "triplet", "val_loss", "val_map", "val_auc", "val_comp_map")
                                         if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))]
    return "  ".join(parts) + f"  ({row.get('seconds', 0):.0f} s)"
