"""A synthetic dataset on disk in the competition's layout, with cell-level truth.

``OUT/train/{ID}_{color}.png`` (8-bit, ``size`` px), ``OUT/test/...`` (16-bit by default, optionally
of the real test sizes), ``OUT/train.csv`` (``ID,Label``), ``OUT/sample_submission.csv`` (like the
real one, dummy predictions), ``OUT/truth/{train,test}.csv`` (``ID,ImageWidth,ImageHeight,
PredictionString`` with one ``labels mask`` pair per cell). Image ``i`` of a split draws from its own
generator seeded by ``(seed, split, i)``: output is byte-identical for a seed, whatever the number of
workers, and adding images does not change the earlier ones.

A re-run into the same folder must give the same bytes as a run into an empty one, so images left by an
earlier run (other IDs, read as data by every later step) are removed first. A folder that a previous
run wrote (it holds ``truth/``) is replaced as a whole; any other non-empty folder is refused unless
``overwrite`` is set, since it may hold real competition data.
"""
from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..fsutil import atomic_path
from ..io import write_image
from ..labels import format_label
from ..rle import encode_label_map
from .label_table import sample_label_set
from .render import MIN_SIZE, generate_image

SPLIT_CODES = {"train": 0, "test": 1}
# the real public test set (sample_submission.csv): image side -> number of images
REAL_TEST_SIZES = {1728: 68, 2048: 462, 3072: 29}
DUMMY_PREDICTION = "0 1 eNoLCAgIMAEABJkBdQ=="  # what the real sample_submission.csv holds
# everything synthesize writes into OUT (folders and files): what a re-run replaces
OUTPUTS = ("train", "test", "truth", "train.csv", "sample_submission.csv", "gallery.png")


class SynthesisError(ValueError):
    """Arguments or an output folder that synthesize cannot work with; names the value or folder."""


def truth_string(cells: np.ndarray, cell_labels: list[tuple[int, ...]]) -> str:
    """The truth PredictionString of one image: ``labels mask`` per cell, in cell id order."""
    codes = encode_label_map(cells)
    return " ".join(f"{format_label(labels)} {codes[i]}" for i, labels in enumerate(cell_labels, start=1))


def real_test_side(rng: np.random.Generator) -> int:
    """An image side drawn with the real test set's frequencies (1728 / 2048 / 3072 px)."""
    sides = np.array(list(REAL_TEST_SIZES))
    counts = np.array(list(REAL_TEST_SIZES.values()), dtype=np.float64)
    return int(rng.choice(sides, p=counts / counts.sum()))


def _one_image(index: int, *, split: str, out: Path, seed: int, size: int, bits: int,
               heterogeneity: float, real_sizes: bool) -> dict:
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    image_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    if real_sizes:
        size = real_test_side(rng)
    labels = sample_label_set(rng)
    img = generate_image(rng, size, labels, heterogeneity)
    write_image(out / split, image_id, img.image, bits=bits)
    return {"ID": image_id, "Label": format_label(img.label), "ImageWidth": size, "ImageHeight": size,
            "PredictionString": truth_string(img.cells, img.cell_labels)}


def _render_split(split: str, n: int, out: Path, workers: int, **kwargs) -> pd.DataFrame:
    job = partial(_one_image, split=split, out=out, **kwargs)
    desc = f"synth {split}"
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(tqdm(pool.map(job, range(n)), total=n, desc=desc, disable=None))
    else:
        rows = [job(i) for i in tqdm(range(n), desc=desc, disable=None)]
    return pd.DataFrame(rows, columns=["ID", "Label", "ImageWidth", "ImageHeight", "PredictionString"])


def _check_arguments(n_train: int, n_test: int, size: int, test_bits: int, heterogeneity: float) -> None:
    """Fail before any pixel is drawn, with the offending value (not deep inside a worker)."""
    if n_train < 0 or n_test < 0:
        raise SynthesisError(f"image counts must be >= 0, got train={n_train} test={n_test}")
    if int(size) < MIN_SIZE:
        raise SynthesisError(f"size must be at least {MIN_SIZE} px, got {size}")
    if test_bits not in (8, 16):
        raise SynthesisError(f"test_bits must be 8 or 16, got {test_bits}")
    if not 0.0 <= heterogeneity <= 1.0:
        raise SynthesisError(f"heterogeneity must be in [0, 1], got {heterogeneity}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Remove an earlier run's outputs (see module doc); refuse a foreign non-empty folder."""
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (overwrite or (out / "truth").is_dir()):
        raise SynthesisError(
            f"{out}: folder is not empty and was not written by hpasc synth; pass --overwrite "
            f"(overwrite=True) to replace its {', '.join(OUTPUTS)}")
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def synthesize(out: os.PathLike | str, n_train: int, n_test: int, size: int = 512, seed: int = 0,
               test_bits: int = 16, heterogeneity: float = 0.5, real_sizes: bool = False,
               workers: int = 1, gallery: bool = False, overwrite: bool = False) -> Path:
    """Write a synthetic competition tree to ``out`` (see module doc); returns ``out`` as a Path.

    ``real_sizes`` gives the test images the real test set's sides (1728/2048/3072 px, real
    frequencies) instead of ``size``; train images always use ``size``. ``gallery`` also writes
    ``out/gallery.png``, one example cell per class (``hpasc.synthetic.gallery``). ``overwrite`` lets a
    non-empty folder that no earlier run wrote be used (its ``OUTPUTS`` are replaced, other files kept).
    Raises ``SynthesisError`` for bad arguments or a foreign non-empty ``out``, before writing anything.
    """
    _check_arguments(n_train, n_test, size, test_bits, heterogeneity)
    out = Path(out)
    _prepare_out(out, overwrite)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    common = dict(seed=int(seed), heterogeneity=float(heterogeneity), workers=max(1, int(workers)))
    train = _render_split("train", n_train, out, size=int(size), bits=8, real_sizes=False, **common)
    test = _render_split("test", n_test, out, size=int(size), bits=int(test_bits), real_sizes=real_sizes,
                         **common)
    truth_cols = ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    _write_csv(train[["ID", "Label"]], out / "train.csv")
    _write_csv(train[truth_cols], out / "truth" / "train.csv")
    _write_csv(test[truth_cols], out / "truth" / "test.csv")
    sample = test[["ID", "ImageWidth", "ImageHeight"]].assign(PredictionString=DUMMY_PREDICTION)
    _write_csv(sample, out / "sample_submission.csv")
    if gallery:
        from .gallery import class_gallery

        class_gallery(out / "gallery.png", size=int(size), seed=int(seed))
    return out
