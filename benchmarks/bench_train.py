"""Training throughput on CPU: cells/s of the whole loop vs the bare model step, and the loader's share.

    python benchmarks/bench_train.py [--arch efficientnet_b0] [--size 128] [--batch 32] [--steps 4]

Baseline (measured in the same run): forward + backward + AdamW on a batch already in memory. Then the
loader alone (crops -> standard augmentation -> normalised tensors, in-process), and the full loop
(``hpasc.train.train_on``: sampler, loader, model, loss, optimizer, checkpoint) with 0 and 1 loader
workers. The loader's share is its time per batch over (loader + model step) when run in-process.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hpasc.config import load_config
from hpasc.data import CellDataset, build_transform
from hpasc.labels import multihot_matrix
from hpasc.losses import Criterion
from hpasc.models import build_model
from hpasc.train import FoldData, train_on
from hpasc.training.sampling import EpochSampler, SeededItems


def synthetic_fold(n_train: int, size: int, seed: int = 0) -> FoldData:
    """Random crops with random single labels; 8 validation cells so validation costs next to nothing."""
    rng = np.random.default_rng(seed)
    n = n_train + 8
    crops = rng.integers(0, 255, (n, size, size, 4), dtype=np.uint8)
    labels = [str(c) for c in rng.integers(0, 19, n)]
    table = pd.DataFrame({"ID": [f"im{i // 8}" for i in range(n)], "cell_id": np.arange(n) % 8 + 1,
                          "Label": labels, "fold": [0] * n_train + [1] * 8})
    train, val = np.arange(n_train), np.arange(n_train, n)
    return FoldData(crops, table, train, multihot_matrix(labels[:n_train]), val, multihot_matrix(labels[n_train:]),
                    Path("."), Path("."))


def time_model_step(cfg, size: int, batch: int, steps: int) -> float:
    model = build_model(cfg.model).train()
    crit = Criterion(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, size, size)
    target = torch.zeros(batch, 19)
    target[torch.arange(batch), torch.arange(batch) % 19] = 1
    times = []
    for _ in range(steps + 1):  # the first step warms up allocations
        start = time.perf_counter()
        crit(model(x), {"target": target})["loss"].backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def time_loader(cfg, data: FoldData, batch: int, steps: int) -> float:
    ds = SeededItems(CellDataset(data.crops, data.train_targets, build_transform(cfg.cells, train=True),
                                 indices=data.train_rows), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=EpochSampler(len(ds), batch, 0))
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == steps:
            break
    return (time.perf_counter() - start) / steps


def time_loop(cfg, data: FoldData, batch: int, steps: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = load_config(None, _overrides(cfg, batch, steps, workers, tmp))
        start = time.perf_counter()
        train_on(run_cfg, data, Path(tmp) / "run")
        total = time.perf_counter() - start
        return total / (steps * batch)


def _overrides(cfg, batch: int, steps: int, workers: int, out: str) -> list[str]:
    return [f"model.name={cfg.model.name}", f"cells.size={cfg.cells.size}", "cells.augment=standard",
            f"train.batch_size={batch}", "train.epochs=1", f"train.max_steps_per_epoch={steps}",
            f"train.num_workers={workers}", "train.device=cpu", f"train.out_dir={out}",
            f"train.threads={torch.get_num_threads()}", "train.checkpoint_every=null"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.name={args.arch}", f"cells.size={args.size}", "cells.augment=standard"])
    data = synthetic_fold(args.batch * args.steps, args.size)

    step = time_model_step(cfg, args.size, args.batch, args.steps)
    load = time_loader(cfg, data, args.batch, args.steps)
    print(f"{args.arch} at {args.size} px, batch {args.batch}, {args.threads} thread(s), CPU")
    print(f"  model step (baseline) : {step:7.3f} s/batch  {args.batch / step:8.1f} cells/s")
    print(f"  loader alone          : {load:7.3f} s/batch  {args.batch / load:8.1f} cells/s"
          f"  share of step time {load / (load + step):.1%}")
    for workers in (0, 1):
        per_cell = time_loop(cfg, data, args.batch, args.steps, workers)
        print(f"  full loop, {workers} worker(s): {1 / per_cell:8.1f} cells/s  "
              f"= {step / args.batch / per_cell:.2f} x the bare model step (incl. start-up, checkpoint, validation)")


if __name__ == "__main__":
    main()
