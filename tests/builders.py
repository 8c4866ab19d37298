"""Shared test builders: small worlds with known answers that several test modules use.

Test modules import these (``from builders import ...``) instead of importing each other; fixtures that
wrap them live in ``conftest.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpasc.config import Config, DataConfig, load_config, save_config
from hpasc.io import write_image, write_png_atomic
from hpasc.labels import NUM_CLASSES, format_label, multihot_matrix
from hpasc.rle import encode_mask
from hpasc.training.fold_data import FoldData

# --------------------------------------------------------------------------- the CV world (test_cv)
SIZE = 64
WORLD_CLASSES = (0, 3, 7, 16)  # the classes of the hand-made world
BOXES = ((4, 4), (4, 36), (36, 4), (36, 36))  # top-left corners of the four 24 px square cells
CELL = 24

# --------------------------------------------------------------------------- training cells (test_train)
TRAIN_CLASSES = (0, 13, 14)  # nucleoplasm (filled nucleus), plasma membrane (rim), mitochondria (stripes)


def world_labels(n_images: int, seed: int = 0) -> list[list[int]]:
    """One class per cell, 4 cells per image."""
    rng = np.random.default_rng(seed)
    return [[int(c) for c in rng.choice(WORLD_CLASSES, size=4)] for _ in range(n_images)]


def label_map() -> np.ndarray:
    cells = np.zeros((SIZE, SIZE), np.int32)
    for k, (y, x) in enumerate(BOXES, start=1):
        cells[y:y + CELL, x:x + CELL] = k
    return cells


def build_world(tmp_path, groups: dict, n_images: int = 8, n_folds: int = 2, seed: int = 0,
                with_truth: bool = True, with_images: bool = False) -> dict:
    """Run folders ``runs/<group>/fold<k>`` whose OOF rows come from ``groups[name](onehot, rng)``,
    cached label maps, labels CSV, truth CSV (every predicted cell matches its truth cell exactly).

    Returns the paths and the per-row truth (image ID, cell id, class)."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:02d}" for i in range(n_images)]
    cell_classes = world_labels(n_images, seed)
    folds = {image_id: i % n_folds for i, image_id in enumerate(ids)}
    data, work = tmp_path / "data", tmp_path / "work"
    cells = label_map()
    nuclei = np.where(cells > 0, cells, 0).astype(np.uint16)
    truth_rows, label_rows = [], []
    for image_id, classes in zip(ids, cell_classes):
        write_png_atomic(work / "masks" / "train" / f"{image_id}.png", cells.astype(np.uint16))
        write_png_atomic(work / "masks" / "train" / f"{image_id}_nuclei.png", nuclei)
        pairs = [f"{c} {encode_mask(cells == k + 1)}" for k, c in enumerate(classes)]
        truth_rows.append((image_id, SIZE, SIZE, " ".join(pairs)))
        label_rows.append((image_id, format_label(classes), folds[image_id]))
        if with_images:
            image = np.zeros((SIZE, SIZE, 4), np.float32)
            for k, c in enumerate(classes):
                image[..., 2][cells == k + 1] = 0.3  # nucleus channel
                image[..., 1][cells == k + 1] = 0.2 + 0.04 * WORLD_CLASSES.index(c)  # protein by class
            write_image(data / "train", image_id, image)
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(label_rows, columns=["ID", "Label", "fold"]).to_csv(data / "folds.csv", index=False)
    truth_csv = data / "truth_train.csv"
    pd.DataFrame(truth_rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]).to_csv(
        truth_csv, index=False)
    rows = []
    for name, make_probs in groups.items():
        cfg = Config(name=name, data=DataConfig(root=str(data), folds_csv=str(data / "folds.csv"),
                                                work_dir=str(work),
                                                truth_csv=str(truth_csv) if with_truth else None))
        for k in range(n_folds):
            fold_dir = tmp_path / "runs" / name / f"fold{k}"
            save_config(cfg, fold_dir / "config.yaml")
            oof = []
            for image_id, classes in zip(ids, cell_classes):
                if folds[image_id] != k:
                    continue
                for cell_id, c in enumerate(classes, start=1):
                    onehot = np.zeros(NUM_CLASSES)
                    onehot[c] = 1
                    oof.append([image_id, cell_id, *np.clip(make_probs(onehot, rng), 0, 1)])
                    if name == next(iter(groups)):
                        rows.append((image_id, cell_id, c))
            pd.DataFrame(oof, columns=["ID", "cell_id", *[f"p{c}" for c in range(NUM_CLASSES)]]).to_csv(
                fold_dir / "oof.csv", index=False)
            pd.DataFrame({"epoch": [1, 2, 3], "lr": [1e-3] * 3, "bce": [0.6, 0.4, 0.3],
                          "triplet": [0.3, 0.2, 0.1], "val_loss": [0.5, 0.45, 0.44], "val_map": [0.2, 0.4, 0.5],
                          "val_auc": [0.6, 0.7, 0.8], "val_comp_map": [0.1, 0.3, 0.4],
                          "seconds": [1.0, 1.0, 1.0]}).to_csv(fold_dir / "log.csv", index=False)
    return {"runs": tmp_path / "runs", "data": data, "work": work, "truth": truth_csv, "ids": ids,
            "cells": pd.DataFrame(rows, columns=["ID", "cell_id", "cls"])}


def perfect(onehot, rng):
    return onehot * 0.9 + 0.05


def noisy(onehot, rng):
    return 0.5 * onehot + rng.uniform(0, 0.6, NUM_CLASSES)


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def two_cell_image(size=256, gap=80):
    """Two touching round cells (cell channels) with one nucleus each (blue); also the truth halves."""
    shape = (size, size)
    c1, c2 = (size // 2, size // 2 - gap // 2), (size // 2, size // 2 + gap // 2)
    cell1, cell2 = disk(shape, *c1, 46), disk(shape, *c2, 46)
    img = np.zeros(shape + (4,), np.float32)
    body = (cell1 | cell2).astype(np.float32)
    img[..., 0] = 0.4 * body
    img[..., 3] = 0.5 * body
    img[..., 1] = 0.2 * body
    img[..., 2] = 0.8 * (disk(shape, *c1, 20) | disk(shape, *c2, 20))
    xx = np.mgrid[: size, : size][1]
    truth = np.where(cell1 | cell2, np.where(xx < size // 2, 1, 2), 0).astype(np.int32)
    return img, truth


def hand_made_cells(n_images: int = 12, cells: int = 6, size: int = 32, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops whose green channel draws one class pattern per image; 3 folds of images, each with all classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    patterns = {0: r < size / 5, 13: (r > size / 3) & (r < size / 2.3), 14: np.sin(xx / 1.5) > 0.5}
    crops, rows = [], []
    for i in range(n_images):
        c = TRAIN_CLASSES[i % len(TRAIN_CLASSES)]
        for k in range(cells):
            img = rng.integers(0, 40, (size, size, 4)).astype(np.float32)
            img[..., 2] += 150 * (r < size / 5)
            img[..., 1] += rng.uniform(120, 200) * patterns[c]
            crops.append(np.clip(img, 0, 255).astype(np.uint8))
            rows.append({"ID": f"img{i:02d}", "cell_id": k + 1, "Label": str(c), "fold": (i // 3) % 3,
                         "border": k == 0, "rel_area": 1.0})
    return np.stack(crops), pd.DataFrame(rows)


def hand_made_fold(fold: int = 0, **kwargs) -> FoldData:
    crops, table = hand_made_cells(**kwargs)
    train, val = table[table.fold != fold], table[table.fold == fold]
    return FoldData(crops, table, train.index.to_numpy(), multihot_matrix(train.Label), val.index.to_numpy(),
                    multihot_matrix(val.Label), Path("unused-masks"), Path("unused-images"))


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, ["model.name=test_efficientnet", "model.embedding_dim=16", "cells.size=32",
                              "cells.augment=standard", "train.batch_size=8", "train.epochs=2", "train.lr=0.003",
                              "train.num_workers=0", "train.device=cpu", "train.checkpoint_every=null",
                              f"train.out_dir={tmp_path / 'runs'}", "name=hand", *overrides])

