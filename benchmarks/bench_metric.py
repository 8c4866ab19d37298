"""Scorer speed: full ``hpasc.metric.score`` on synthetic 2048 px images, plus its IoU stage against a
pixel baseline (pycocotools full-size decode into label maps + joint histogram with np.bincount).

    python benchmarks/bench_metric.py [--images 200] [--cells 25] [--preds-per-cell 6]

The issue's target is 1,000 images of 2048 px, 25 cells, 6 predictions per cell "well under a minute";
the time for --images is measured and extrapolated linearly to 1,000. A few distinct label maps are
cycled over the image IDs (making 2048 px maps is slower than scoring them); the scorer still decodes
every image's strings, since its mask cache lives per image.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from pycocotools import mask as coco_mask

from bench_rle import synthetic_cells  # the sibling script (its folder is on sys.path when run)
from hpasc.metric import intersection_table, score
from hpasc.rle import counts_bytes, encode_label_map, mask_runs

SIZE = 2048


def make_data(n_images: int, n_cells: int, per_cell: int, n_maps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = []
    for k in range(n_maps):
        labels = synthetic_cells(SIZE, n_cells, seed=k)
        shifted = np.roll(labels, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
        maps.append((encode_label_map(labels), encode_label_map(shifted)))
    truth_rows, sub_rows = [], []
    for i in range(n_images):
        truth_enc, pred_enc = maps[i % n_maps]
        image_classes = rng.choice(19, size=3, replace=False)
        t_parts, s_parts = [], []
        for cid, enc in truth_enc.items():
            labels = rng.choice(image_classes, size=int(rng.integers(1, 3)), replace=False)
            t_parts.append(f"{'|'.join(map(str, sorted(labels)))} {enc}")
        for cid, enc in pred_enc.items():
            classes = np.r_[image_classes, rng.choice(19, size=per_cell - 3, replace=False)][:per_cell]
            s_parts += [f"{c} {p:.6g} {enc}" for c, p in zip(classes, rng.random(per_cell))]
        truth_rows.append((f"img{i:05d}", SIZE, SIZE, " ".join(t_parts)))
        sub_rows.append((f"img{i:05d}", SIZE, SIZE, " ".join(s_parts)))
    cols = ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    return pd.DataFrame(truth_rows, columns=cols), pd.DataFrame(sub_rows, columns=cols)


def pixel_iou(truth_masks: list[str], pred_masks: list[str]) -> np.ndarray:
    """Baseline: full-size pycocotools decodes painted into two label maps, joint histogram of ids."""
    maps = []
    for masks in (truth_masks, pred_masks):
        lab = np.zeros((SIZE, SIZE), np.int64)
        for j, s in enumerate(masks, start=1):
            lab[coco_mask.decode({"size": [SIZE, SIZE], "counts": counts_bytes(s)}).astype(bool)] = j
        maps.append(lab)
    n_t, n_p = len(truth_masks) + 1, len(pred_masks) + 1
    joint = np.bincount((maps[1] * n_t + maps[0]).ravel(), minlength=n_t * n_p).reshape(n_p, n_t)
    inter = joint[1:, 1:]
    union = joint[1:, :].sum(1)[:, None] + joint[:, 1:].sum(0)[None, :] - inter
    return inter / union


def runs_iou(truth_masks: list[str], pred_masks: list[str]) -> np.ndarray:
    t_runs = [mask_runs(s, SIZE, SIZE) for s in truth_masks]
    p_runs = [mask_runs(s, SIZE, SIZE) for s in pred_masks]
    inter = intersection_table(t_runs, p_runs)
    t_area = np.array([(e - s).sum() for s, e in t_runs])
    p_area = np.array([(e - s).sum() for s, e in p_runs])
    return inter / (p_area[:, None] + t_area[None, :] - inter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--cells", type=int, default=25)
    parser.add_argument("--preds-per-cell", type=int, default=6)
    parser.add_argument("--maps", type=int, default=8, help="distinct label maps cycled over the images")
    parser.add_argument("--baseline-images", type=int, default=4)
    args = parser.parse_args()

    t = time.perf_counter()
    truth, sub = make_data(args.images, args.cells, args.preds_per_cell, args.maps)
    n_preds = sum(len(s.split()) // 3 for s in sub.PredictionString)
    print(f"data: {args.images} images {SIZE} px, {n_preds} predictions ({time.perf_counter() - t:.1f} s to make)")

    score(truth.head(2), sub.head(2))  # compile numba outside the timing
    for verified in ("gt", "all"):
        t = time.perf_counter()
        result = score(truth, sub, verified=verified, progress=False)
        dt = time.perf_counter() - t
        print(
            f"score --verified {verified}: {dt:.2f} s = {dt / args.images * 1e3:.1f} ms/image"
            f" -> 1,000 images ~ {dt / args.images * 1000:.1f} s (mAP {result.mAP:.4f})"
        )

    # IoU stage alone, same images: run sweep vs pixel label maps
    pairs = []
    for i in range(args.baseline_images):
        t_tok, s_tok = truth.PredictionString[i].split(), sub.PredictionString[i].split()
        pairs.append((t_tok[1::2], list(dict.fromkeys(s_tok[2::3]))))
    t = time.perf_counter()
    fast = [runs_iou(a, b) for a, b in pairs]
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    slow = [pixel_iou(a, b) for a, b in pairs]
    t_slow = time.perf_counter() - t
    assert all(np.allclose(f, s) for f, s in zip(fast, slow)), "IoU tables disagree"
    print(
        f"IoU table per image: pixel label maps + bincount {t_slow / len(pairs) * 1e3:.1f} ms,"
        f" runs sweep {t_fast / len(pairs) * 1e3:.2f} ms -> {t_slow / t_fast:.0f}x"
    )


if __name__ == "__main__":
    main()
