"""Cell crops for torch: selections, 4-channel augmentation, normalisation and the dataset (the training
sampler is ``hpasc.training.sampling``).

Training and inference share one preprocessing (``CellTransform``): uint8 crop -> float32 in [0, 1] ->
[random augmentations, training only] -> per-channel ``(x - mean) / std`` from the config -> 4 x S x S
tensor. Normalisation is ours, after the augmentations, because albumentations 2.0.8's ``Normalize``
divides even float input by ``max_pixel_value`` and silently reuses the first mean/std for every channel
when given fewer than four; its colour transforms (CLAHE, ColorJitter, HueSaturationValue) reject 4
channels, so the per-channel intensity changes are our own ``ChannelIntensity``; and everything runs in
float32 (several noise transforms fail on uint16).

Augmentation presets live in ``AUGMENTATIONS`` (name -> list of transforms); cell selections in
``SELECTIONS`` (name -> rule over the cell table).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from .labels import NUM_CLASSES, multihot_matrix

# --------------------------------------------------------------------------- selections


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    if "Label" not in table:
        raise ValueError("cell table has no Label column (build the cache with labels)")
    labels = table["Label"]
    text = labels.astype(str)  # once: tables have ~1e6 rows
    keep = labels.notna() & (text.str.strip() != "") & (text != "nan")
    return table[keep]


def _targets(labels: pd.Series) -> np.ndarray:
    """Label strings -> multi-hot rows, parsing each distinct string once (tables have ~1e6 rows)."""
    codes, uniques = pd.factorize(labels.astype(str))
    return multihot_matrix(uniques)[codes] if len(codes) else np.zeros((0, NUM_CLASSES), np.float32)


def _select_single_label(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Cells of images with exactly one label; the image label is taken as the cell's truth."""
    sub = _labelled(table)
    targets = _targets(sub["Label"])
    single = targets.sum(axis=1) == 1
    return sub.index.to_numpy(np.int64)[single], targets[single]


def _select_all(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled cell with its image's labels as a noisy multi-hot target."""
    sub = _labelled(table)
    return sub.index.to_numpy(np.int64), _targets(sub["Label"])


def _select_truth(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The learner's ceiling (worlds with cell truth only): every cell that matches a truth cell, with
    that cell's true labels (column ``truth_label``, ``hpasc.cells.truth``); unmatched cells are left out."""
    if "truth_label" not in table:
        raise ValueError("selection 'truth' needs the cells' true labels: set data.truth_csv to the "
                         "cell-level truth of the training images (synthetic worlds)")
    sub = table[table["truth_label"].notna()]
    return sub.index.to_numpy(np.int64), _targets(sub["truth_label"])


SELECTIONS: dict[str, Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]] = {
    "single_label": _select_single_label,
    "all": _select_all,
    "truth": _select_truth,
}


def select_cells(table: pd.DataFrame, mode: str = "single_label", max_per_image: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training cells of a cell table -> (row index values, float32 targets (k, 19)).

    The row values are the table's index labels, i.e. crop rows for a cache table (also after
    filtering it, e.g. by fold). ``max_per_image`` keeps a random subset of at most that many cells
    of each image (seeded), so images with hundreds of cells do not dominate.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"selection {mode!r}: expected one of {', '.join(SELECTIONS)}")
    rows, targets = SELECTIONS[mode](table)
    if max_per_image is not None and len(rows):
        ids = table.loc[rows, "ID"].to_numpy()
        order = np.random.default_rng(seed).permutation(len(rows))
        rank = pd.Series(ids[order]).groupby(ids[order]).cumcount().to_numpy()
        keep = np.sort(order[rank < max_per_image])
        rows, targets = rows[keep], targets[keep]
    return rows, targets.astype(np.float32)


def identities_from_targets(targets: np.ndarray) -> np.ndarray:
    """Triplet identities: the class of a single-label target, -1 for multi-label or empty rows."""
    targets = np.asarray(targets)
    single = (targets > 0.5).sum(axis=1) == 1
    return np.where(single, targets.argmax(axis=1), -1).astype(np.int64)


# --------------------------------------------------------------------------- class balance


def class_balance_weights(targets: np.ndarray, cap: float = 10.0) -> np.ndarray:
    """Per-sample weights (mean 1) that over-sample rare classes, at most ``cap`` x the commonest.

    Class weight ``w_c = min(n_max / n_c, cap)``; a sample takes the weight of its rarest positive
    class (multi-label cells count for the class that needs them most); a sample without positives
    gets 1.
    """
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or len(targets) == 0:
        raise ValueError(f"targets: expected a non-empty (n, classes) matrix, got shape {targets.shape}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    positive = targets > 0.5
    counts = positive.sum(axis=0).astype(np.float64)
    present = counts > 0
    class_w = np.zeros(targets.shape[1])
    class_w[present] = np.minimum(counts[present].max() / counts[present], cap)
    weights = np.where(positive, class_w[None, :], 0.0).max(axis=1)
    weights[~positive.any(axis=1)] = 1.0
    return weights / weights.mean()


# --------------------------------------------------------------------------- augmentation


class ChannelIntensity(A.ImageOnlyTransform):
    """Independent brightness, contrast and gamma per channel on float images in [0, 1].

    Staining and exposure vary per channel in HPA images; albumentations' brightness/contrast/gamma
    change all channels together and its colour transforms reject 4 channels.
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, gamma: float = 0.2, p: float = 0.5):
        super().__init__(p=p)
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        channels = params["shape"][2] if len(params["shape"]) == 3 else 1
        rng = self.random_generator
        return {
            "gain": rng.uniform(1 - self.contrast, 1 + self.contrast, channels).astype(np.float32),
            "bias": rng.uniform(-self.brightness, self.brightness, channels).astype(np.float32),
            "power": np.exp(rng.uniform(-self.gamma, self.gamma, channels)).astype(np.float32),
        }

    def apply(self, img: np.ndarray, gain: np.ndarray, bias: np.ndarray, power: np.ndarray,
              **params: Any) -> np.ndarray:
        out = np.power(np.clip(img, 0.0, 1.0, dtype=np.float32), power) * gain + bias
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "gamma")


def _flips() -> list:
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]


def _geometry(shift: float, scale: float, p: float) -> list:
    # cells have no orientation: any rotation; zeros outside, like the crop canvas
    return [A.Affine(translate_percent=(-shift, shift), scale=(1 - scale, 1 + scale), rotate=(-180, 180),
                     border_mode=0, fill=0, p=p)]


def _preset_none() -> list:
    return []


def _preset_light() -> list:
    return _flips()


def _preset_standard() -> list:
    return _flips() + _geometry(0.06, 0.1, 0.5) + [
        ChannelIntensity(brightness=0.05, contrast=0.2, gamma=0.2, p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.005, 0.03), p=1.0)],
                p=0.2),
    ]


def _preset_strong() -> list:
    return _flips() + _geometry(0.1, 0.2, 0.7) + [
        ChannelIntensity(brightness=0.1, contrast=0.35, gamma=0.35, p=0.7),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 7), p=1.0), A.GaussNoise(std_range=(0.01, 0.05), p=1.0)],
                p=0.4),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.06, 0.18),
                        hole_width_range=(0.06, 0.18), fill=0, p=0.4),
    ]


def _preset_standard_batch():
    """``standard``'s kinds and amounts of change, drawn per crop but applied to the whole batch in torch
    on its device (``hpasc.batch_augment``): no per-crop Python work in the data loader."""
    from .batch_augment import BatchAugment

    return BatchAugment()


# preset name (CellsConfig.augment) -> factory of the list of per-crop transforms, or of a BatchAugment
AUGMENTATIONS: dict[str, Callable[[], Any]] = {
    "none": _preset_none,
    "light": _preset_light,
    "standard": _preset_standard,
    "strong": _preset_strong,
    "standard_batch": _preset_standard_batch,
}


class CellTransform:
    """uint8 S x S x 4 crop -> normalised float32 tensor 4 x S x S (augmented when built for training)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: list | None = None,
                 seed: int | None = None):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)
        self.augment = A.Compose(augment) if augment else None
        self.batch_augment = None  # a BatchAugment the training loop applies to each batch (its own seed)
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """One shared random stream for all transforms of the pipeline, seeded.

        Needed twice over: DataLoader workers start as copies of one state (all workers would draw
        the same numbers), and albumentations 2.0.8's ``Compose(seed=...)``/``set_random_seed`` give
        every transform its own generator with the *same* seed, so e.g. the horizontal and vertical
        flips always fire together. ``set_random_state`` hands the same generators to all of them.
        """
        seed = None if seed is None else int(seed) % 2**32
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def set_random_state(self, random_generator: np.random.Generator, py_random: random.Random) -> None:
        """albumentations' interface: hand these generators to every transform (per-item seeding)."""
        if self.augment is not None:
            self.augment.set_random_state(random_generator, py_random)

    def __call__(self, crop: np.ndarray | None = None, *, image: np.ndarray | None = None):
        """``t(crop) -> Tensor``; the albumentations-style ``t(image=crop) -> {"image": Tensor}`` also works."""
        if image is not None:
            return {"image": self(image)}
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[2] != 4 or crop.dtype != np.uint8:
            raise ValueError(f"crop: expected uint8 S x S x 4, got {crop.dtype} {crop.shape}")
        x = crop.astype(np.float32) * np.float32(1 / 255)
        if self.augment is not None:
            x = self.augment(image=x)["image"]
        x = (x - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    def batch(self, crops: np.ndarray) -> torch.Tensor:
        """(n, S, S, 4) uint8 -> (n, 4, S, S) float32 in one vectorised step (inference, no augmentation)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[3] != 4 or crops.dtype != np.uint8:
            raise ValueError(f"crops: expected uint8 (n, S, S, 4), got {crops.dtype} {crops.shape}")
        if self.augment is not None:
            return torch.stack([self(c) for c in crops]) if len(crops) else torch.zeros((0, 4) + crops.shape[1:3])
        # the same float32 operations in the same order as __call__: a crop normalises to the same bits
        # at inference as in training and validation
        x = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).float() * np.float32(1 / 255)
        mean = torch.from_numpy(self.mean).view(1, 4, 1, 1)
        inv_std = torch.from_numpy(self.inv_std).view(1, 4, 1, 1)
        return (x - mean) * inv_std


def build_transform(cells_cfg: Any, train: bool, seed: int | None = None) -> CellTransform:
    """The preprocessing of ``cells_cfg`` (mean/std; augmentation preset ``augment`` when ``train``)."""
    for name in ("mean", "std"):
        values = getattr(cells_cfg, name)
        if len(values) != 4:
            raise ValueError(f"cells.{name}: expected 4 per-channel values, got {len(values)}")
    if any(s <= 0 for s in cells_cfg.std):
        raise ValueError(f"cells.std: values must be positive, got {cells_cfg.std}")
    if cells_cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"cells.augment={cells_cfg.augment!r}: expected one of {', '.join(AUGMENTATIONS)}")
    augment = AUGMENTATIONS[cells_cfg.augment]() if train else None
    if augment is not None and not isinstance(augment, list):  # a batch augmentation
        transform = CellTransform(cells_cfg.mean, cells_cfg.std, None, seed=seed)
        transform.batch_augment = augment.with_normalisation(cells_cfg.mean, cells_cfg.std)
        return transform
    return CellTransform(cells_cfg.mean, cells_cfg.std, augment, seed=seed)


# --------------------------------------------------------------------------- dataset


def collate_items(data):
    """The loaders' collate function: a batch that ``__getitems__`` already made passes through, a list of
    items is stacked as PyTorch's default does."""
    return data if isinstance(data, dict) else default_collate(data)


class CellDataset(Dataset):
    """Items of a crop array (e.g. the memory-mapped cache) through a transform.

    ``indices`` chooses crop rows (a selection) without copying the crops; ``targets`` and
    ``identities`` are aligned with the items. Without targets the target is a zero vector; without
    identities they come from single-label targets (-1 otherwise). ``index`` in an item is the crop row.
    """

    def __init__(self, crops: np.ndarray, targets: np.ndarray | None = None,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None,
                 identities: np.ndarray | None = None, indices: np.ndarray | None = None):
        self.crops = crops
        self.indices = np.arange(len(crops), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        n = len(self.indices)
        if targets is not None and len(targets) != n:
            raise ValueError(f"targets: {len(targets)} rows for {n} items")
        if identities is not None and len(identities) != n:
            raise ValueError(f"identities: {len(identities)} values for {n} items")
        if n and (self.indices.min() < 0 or self.indices.max() >= len(crops)):
            raise IndexError(f"indices outside 0..{len(crops) - 1}")
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        if identities is None:
            identities = identities_from_targets(self.targets) if self.targets is not None else np.full(n, -1)
        self.identities = np.asarray(identities, dtype=np.int64)
        self.transform = transform or CellTransform((0.0,) * 4, (1.0,) * 4)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        # a memory-mapped crop file travels to spawned workers as its path, not as its (huge) contents
        state = self.__dict__.copy()
        crops = self.crops
        if isinstance(crops, np.memmap) and crops.filename is not None:
            state["crops"] = ("memmap", crops.filename, crops.offset, crops.shape, crops.dtype.str)
        return state

    def __setstate__(self, state: dict) -> None:
        crops = state["crops"]
        if isinstance(crops, tuple) and crops and crops[0] == "memmap":
            _, filename, offset, shape, dtype = crops
            state["crops"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def reseed(self, seed: int) -> None:
        if hasattr(self.transform, "reseed"):
            self.transform.reseed(seed)

    def __getitems__(self, items: Sequence[int]) -> dict[str, Any]:
        """Several items already as one batch (what ``collate_items`` passes on): the crops read in one
        fancy index and normalised by ``transform.batch``, bit-identical to stacking ``__getitem__``'s
        items; a tenth of the per-item time of the training loop's loader."""
        items = np.asarray(items, np.int64).reshape(-1)
        rows = self.indices[items]
        batch = getattr(self.transform, "batch", None)
        if batch is None:  # a plain callable: item by item
            images = torch.stack([self.transform(np.asarray(self.crops[r])) for r in rows])
        else:
            images = batch(np.asarray(self.crops[rows]))
        targets = (self.targets[items] if self.targets is not None
                   else np.zeros((len(items), NUM_CLASSES), np.float32))
        return {"image": images, "target": torch.from_numpy(np.ascontiguousarray(targets, np.float32)),
                "identity": torch.from_numpy(self.identities[items].astype(np.int64)),
                "index": torch.from_numpy(rows.astype(np.int64))}

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        target = self.targets[i] if self.targets is not None else np.zeros(NUM_CLASSES, np.float32)
        return {"image": self.transform(np.asarray(self.crops[row])), "target": torch.from_numpy(target.copy()),
                "identity": int(self.identities[i]), "index": row}


