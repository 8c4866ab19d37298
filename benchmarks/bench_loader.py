"""Is the cell loader fast enough to feed training? Loader crops/s against an EfficientNet-B0 step.

    python benchmarks/bench_loader.py [--size 128] [--batch 32] [--batches 6] [--preset standard]

Writes a memory-mapped crop file like the cache's, then measures in this run: crops/s of
``make_loader`` over it with the training augmentation (in the main process and with 2 workers), and
crops/s of one training step (forward + backward + AdamW) of a randomly initialised timm
``efficientnet_b0`` with 4 input channels on CPU. Prints the ratio and the loader's share of a serial
step; a ratio well above 1 means the loader is not the bottleneck.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpasc.config import CellsConfig
from hpasc.data import CellDataset, build_transform, class_balance_weights, make_loader, select_cells


def write_crops(path: Path, n: int, size: int) -> np.ndarray:
    """A crops file of cell-like blobs, opened memory-mapped (as ``load_cell_cache`` does)."""
    rng = np.random.default_rng(0)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 4))
    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2)[..., None]
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        arr[start:stop] = rng.integers(0, 256, (stop - start, size, size, 4), dtype=np.uint8) * blob
    arr.flush()
    del arr
    return np.load(path, mmap_mode="r")


def loader_rate(crops: np.ndarray, cfg: CellsConfig, batch: int, batches: int, workers: int) -> float:
    import pandas as pd

    n = len(crops)
    table = pd.DataFrame({"ID": [f"i{k // 20}" for k in range(n)], "Label": [str(k % 19) for k in range(n)]})
    rows, targets = select_cells(table, "single_label")
    ds = CellDataset(crops, targets, build_transform(cfg, train=True, seed=0), indices=rows)
    loader = make_loader(ds, batch, train=True, weights=class_balance_weights(targets, cfg.balance_cap),
                         num_workers=workers, seed=0)
    it = iter(loader)
    next(it)  # worker start-up outside the timing
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def model_rate(size: int, batch: int, steps: int) -> float:
    import timm

    model = timm.create_model("efficientnet_b0", pretrained=False, in_chans=4, num_classes=19)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 4, size, size)
    y = torch.zeros(batch, 19)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model (2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CellsConfig(size=args.size, augment=args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        crops = write_crops(Path(tmp) / "crops.npy", 2048, args.size)
        main_rate = loader_rate(crops, cfg, args.batch, args.batches, workers=0)
        worker_rate = loader_rate(crops, cfg, args.batch, args.batches, workers=2)
        del crops
    step_rate = model_rate(args.size, args.batch, args.steps)
    share = (1 / main_rate) / (1 / main_rate + 1 / step_rate)
    print(f"crop {args.size} px, batch {args.batch}, augmentation '{args.preset}', {torch.get_num_threads()} threads")
    print(f"  loader, main process      {main_rate:8.0f} crops/s")
    print(f"  loader, 2 workers         {worker_rate:8.0f} crops/s")
    print(f"  efficientnet_b0 step      {step_rate:8.0f} crops/s")
    print(f"  loader / model            {main_rate / step_rate:8.1f}x (main process), "
          f"{worker_rate / step_rate:.1f}x (2 workers)")
    print(f"  loader share of a serial step: {share:.1%}")


if __name__ == "__main__":
    main()
