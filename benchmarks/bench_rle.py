"""Mask codec speed: batch label-map encoder vs the per-cell pycocotools path, run decoder vs pycocotools.

    python benchmarks/bench_rle.py [--size 2048] [--cells 50] [--repeat 3]

Prints times and ratios measured in this run (the issue asks for >= 20x on 2048 px with 50 cells), and
repeats the comparison on the real hpacellseg masks in ../shared/hpa/sample when present.
"""
from __future__ import annotations

import argparse

import numpy as np
from pycocotools import mask as coco_mask

from hpasc.rle import counts_bytes, encode_label_map, encode_mask, mask_runs
from common import SHARED_SAMPLE, best_of



def synthetic_cells(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """Touching Voronoi-like cells: each pixel takes the nearest of n seeds within a radius."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (n_cells, 2))
    radius = size / np.sqrt(n_cells) * 0.7
    yy, xx = np.mgrid[0:size:4, 0:size:4]  # nearest seed on a coarse grid, then upsampled
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    labels = (np.argmin(d, axis=-1) + 1).astype(np.int32)
    labels[np.min(d, axis=-1) > radius**2] = 0
    return np.repeat(np.repeat(labels, 4, 0), 4, 1)[:size, :size]


def compare(name: str, labels: np.ndarray, repeat: int) -> None:
    ids = [int(i) for i in np.unique(labels) if i > 0]
    encode_label_map(labels)  # compile outside the timing
    t_batch = best_of(lambda: encode_label_map(labels), repeat)
    t_ref = best_of(lambda: {i: encode_mask(labels == i) for i in ids}, max(1, repeat // 2))
    enc = encode_label_map(labels)
    assert enc == {i: encode_mask(labels == i) for i in ids}, "batch encoder differs from pycocotools"
    h, w = labels.shape
    strings = list(enc.values())
    t_runs = best_of(lambda: [mask_runs(s, h, w) for s in strings], repeat)
    t_coco = best_of(
        lambda: [coco_mask.decode({"size": [h, w], "counts": counts_bytes(s)}) for s in strings], repeat
    )
    print(
        f"{name}: {h}x{w}, {len(ids)} cells\n"
        f"  encode  per-cell pycocotools {t_ref * 1e3:8.1f} ms   encode_label_map {t_batch * 1e3:6.1f} ms"
        f"   -> {t_ref / t_batch:5.1f}x\n"
        f"  decode  pycocotools full mask {t_coco * 1e3:7.1f} ms   mask_runs        {t_runs * 1e3:6.1f} ms"
        f"   -> {t_coco / t_runs:5.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    compare("synthetic", synthetic_cells(args.size, args.cells), args.repeat)
    for path in sorted(SHARED_SAMPLE.glob("*_cellmask.png")):
        import cv2

        compare(f"real {path.name[:8]}", cv2.imread(str(path), cv2.IMREAD_UNCHANGED), args.repeat)


if __name__ == "__main__":
    main()
