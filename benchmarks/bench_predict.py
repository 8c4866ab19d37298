"""End-to-end inference speed and memory: a 5-fold EfficientNet-B0 ensemble at 128 px on CPU.

    python benchmarks/bench_predict.py [--models 5] [--images 6] [--workers 2] [--skip-rss]

Speed: ``hpasc.predict.predict`` over 2048 px images (the three real samples of ../shared/hpa/sample,
repeated; synthetic ones when absent) with randomly initialised B0 runs (a random model costs the same
time as a trained one), after a one-image warm-up run (printed: the first forward of each model builds
its CPU kernels). Prints seconds per image overall and per stage (read, segment, crop, encode, model,
combine) and the ratio to reading the image's PNGs, measured in the same run. ``predict`` gives torch
the cores its reading threads leave (on 2 cores: 1 torch thread beside the readers). The issue's target
is <= 5 s per 2048 px image on 2 cores.

Memory: the same ensemble on one 3072 px image in a fresh process; prints its peak resident memory
(target < 4 GB) next to that of a process that only imports the stack and loads the models (baseline).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import SHARED_SAMPLE


def make_runs(root: Path, n: int) -> Path:
    import torch

    from hpasc.config import Config, replace, save_config
    from hpasc.models import build_model

    # batch 32: chunks are zero-padded to the batch size, so a small benchmark would otherwise time
    # mostly padding (a full test set pads only its last chunk); CPU throughput is the same as at 128
    cfg = replace(Config(name="b0"), **{"model.name": "efficientnet_b0", "cells.size": 128,
                                        "inference.batch_size": 32})
    for k in range(n):
        torch.manual_seed(k)
        run = root / "b0" / f"fold{k}"
        run.mkdir(parents=True)
        save_config(cfg, run / "config.yaml")
        torch.save({"model": build_model(cfg.model).state_dict()}, run / "best.pt")
    return root / "b0"


def make_images(out: Path, n: int, size: int) -> Path:
    """``n`` test images of ``size`` px: the real samples (resized when needed), else synthetic."""
    import cv2

    from hpasc.io import CHANNELS, read_image, write_image

    ids = sorted({p.name.split("_")[0] for p in SHARED_SAMPLE.glob("*_red.png")}) if SHARED_SAMPLE.is_dir() else []
    test = out / "test"
    test.mkdir(parents=True)
    rows = []
    for i in range(n):
        image_id = f"img{i:03d}"
        if ids:
            image = read_image(SHARED_SAMPLE, ids[i % len(ids)])
            if image.shape[0] != size:
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            write_image(test, image_id, image, bits=8)
        else:
            from hpasc.synthetic import synthesize

            tmp = out / f"synth{i}"
            synthesize(tmp, n_train=0, n_test=1, size=size, seed=i)
            src = pd.read_csv(tmp / "sample_submission.csv")["ID"].iloc[0]
            for c in CHANNELS:
                shutil.copy(tmp / "test" / f"{src}_{c}.png", test / f"{image_id}_{c}.png")
        rows.append((image_id, size, size, "0 1 eNoLCAgIMAEABJkBdQ=="))
    pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]).to_csv(
        out / "sample_submission.csv", index=False)
    return out


def read_seconds(images: Path, ids: list[str]) -> float:
    from hpasc.io import read_image

    t = time.perf_counter()
    for image_id in ids:
        read_image(images, image_id)
    return (time.perf_counter() - t) / len(ids)


def speed(work: Path, n_models: int, n_images: int, workers: int) -> None:
    from hpasc.predict import predict

    runs = make_runs(work / "runs", n_models)
    data = make_images(work / "data2048", n_images, 2048)
    ids = pd.read_csv(data / "sample_submission.csv")["ID"].tolist()
    base = read_seconds(data / "test", ids)
    # one-off: the first forward of each model and shape builds its oneDNN kernels (seconds per model)
    pd.read_csv(data / "sample_submission.csv").head(1).to_csv(work / "one.csv", index=False)
    t = time.perf_counter()
    predict([runs], data / "test", work / "one.csv", work / "warm.csv", workers=workers)
    warm = time.perf_counter() - t
    stats: dict = {}
    t = time.perf_counter()
    predict([runs], data / "test", data / "sample_submission.csv", work / "sub.csv", workers=workers,
            stats=stats)
    total = (time.perf_counter() - t) / n_images
    cells = len(pd.read_csv(work / "sub.cells.csv"))
    print(f"{n_models}-model B0 ensemble at 128 px, {n_images} images of 2048 px, {cells} cells, "
          f"{workers} reading thread(s), {stats['torch_threads']} torch thread(s):")
    print(f"  end to end {total:.2f} s/image (target <= 5 s); reading the 4 PNGs alone {base:.2f} s "
          f"-> ratio {total / base:.1f}x")
    print(f"  model: {stats['seconds']['model'] / cells / n_models * 1000:.1f} ms per cell and model; "
          f"one-off warm-up run on 1 image (model loading, kernel building): {warm:.1f} s")
    print("  stage seconds per image (threads overlap, so they can sum to more than the wall time):")
    for stage, sec in sorted(stats["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"    {stage:<8} {sec / n_images:6.2f} s  ({sec / n_images / base:5.1f}x read)")


# VmHWM (peak RSS of this process's memory map): ru_maxrss would carry the parent's peak across exec
CHILD = """
import sys
from pathlib import Path
from hpasc.predict import load_ensemble, predict
runs, data, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
if mode == "load":
    load_ensemble([runs], device="cpu")
else:
    predict([runs], data / "test", data / "sample_submission.csv", out, workers=2, device="cpu")
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) / 1024 / 1024)
"""


def peak_rss(work: Path, n_models: int) -> None:
    runs = work / "runs" / "b0"
    if not runs.is_dir():
        runs = make_runs(work / "runs", n_models)
    data = make_images(work / "data3072", 1, 3072)
    results = {}
    for mode in ("load", "predict"):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(runs), str(data), str(work / "sub3072.csv"), mode],
                              capture_output=True, text=True, check=True)
        results[mode] = float(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS, one 3072 px image, {n_models}-model ensemble on CPU: {results['predict']:.2f} GB "
          f"(target < 4 GB); imports + loading the models alone: {results['load']:.2f} GB "
          f"-> {results['predict'] / results['load']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="predict's reading/segmenting threads")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        speed(work, args.models, args.images, args.workers)
        if not args.skip_rss:
            peak_rss(work, args.models)


if __name__ == "__main__":
    main()
