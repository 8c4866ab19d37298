"""How much faster is one CV evaluation through ``hpasc.cv.fast_map`` than writing and scoring a submission?

The blend search evaluates the competition mAP hundreds of times for new confidences on the same cells.
Baseline (measured in the same run): encode every image's prediction string
(``hpasc.submission.image_prediction_string``) and score it with ``hpasc.metric.score``. Fast path: the
TP flags are matched once (``hpasc.cv.match_image``), then each evaluation is ``fast_map``. Both give the
same mAP (asserted).

    python benchmarks/bench_cv.py [--images 100] [--size 512] [--grid 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from hpasc.cv import CompetitionTruth, fast_map, match_image
from hpasc.labels import NUM_CLASSES, format_label
from hpasc.metric import score
from hpasc.rle import encode_mask
from hpasc.submission import image_prediction_string


def grid_cells(size: int, grid: int, shift: int = 0) -> np.ndarray:
    """A grid x grid label map of square cells (optionally shifted right by ``shift`` px)."""
    labels = np.zeros((size, size), np.int32)
    step = size // grid
    side = int(step * 0.8)
    for k in range(grid * grid):
        y, x = (k // grid) * step + 2, (k % grid) * step + 2 + shift
        labels[y:y + side, x:min(x + side, size)] = k + 1
    return labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pred = grid_cells(args.size, args.grid)
    n_cells = args.grid ** 2
    truth_rows, labels_per_image = [], []
    for i in range(args.images):
        # truth: the same grid, shifted a little (most cells match), 1-2 classes per cell
        truth_map = grid_cells(args.size, args.grid, shift=int(rng.integers(0, 12)))
        labs = [tuple(sorted(set(rng.choice(NUM_CLASSES, size=rng.integers(1, 3)).tolist())))
                for _ in range(n_cells)]
        labels_per_image.append(labs)
        pairs = [f"{format_label(lab)} {encode_mask(truth_map == k + 1)}" for k, lab in enumerate(labs)]
        truth_rows.append((f"img{i:04d}", args.size, args.size, " ".join(pairs)))
    truth_df = pd.DataFrame(truth_rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])

    t0 = time.perf_counter()
    parts = [match_image(pred, labs, text.split()[1::2])
             for (_, _, _, text), labs in zip(truth_rows, labels_per_image)]
    tp = np.concatenate([p[0] for p in parts])
    n_truth = np.stack([p[1] for p in parts])
    relevant = np.repeat(n_truth > 0, n_cells, axis=0)
    truth = CompetitionTruth(tp, relevant, n_truth, np.zeros(len(tp), bool), np.ones(len(tp)))
    t_match = time.perf_counter() - t0

    fast_times, ref_times = [], []
    for _ in range(args.repeats):
        conf = rng.uniform(0, 1, (len(tp), NUM_CLASSES)).astype(np.float32)
        t0 = time.perf_counter()
        fast, _ = fast_map(conf, truth)
        fast_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = [(f"img{i:04d}", args.size, args.size,
                 image_prediction_string(pred, conf[i * n_cells:(i + 1) * n_cells]))
                for i in range(args.images)]
        sub = pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])
        ref = score(truth_df, sub, progress=False).mAP
        ref_times.append(time.perf_counter() - t0)
        assert abs(fast - ref) < 1e-9, (fast, ref)
    fast_s, ref_s = min(fast_times), min(ref_times)
    print(f"{args.images} images of {args.size} px, {n_cells} cells each; mAP {fast:.4f} (both paths)")
    print(f"one-off TP matching: {t_match:.3f} s")
    print(f"write + score (baseline): {ref_s * 1000:.1f} ms / evaluation")
    print(f"fast_map:                 {fast_s * 1000:.1f} ms / evaluation")
    print(f"speed-up: {ref_s / fast_s:.0f}x  (break-even after {t_match / max(ref_s - fast_s, 1e-9):.1f} evaluations)")


if __name__ == "__main__":
    main()
