"""Selections, class balance, 4-channel augmentation, datasets and loaders."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hpasc.config import CellsConfig
from hpasc.data import (
    AUGMENTATIONS,
    CellDataset,
    CellTransform,
    ChannelIntensity,
    build_transform,
    class_balance_weights,
    identities_from_targets,
    select_cells,
)


def small_table() -> pd.DataFrame:
    """8 cells of 4 images: a (label 0, 3 cells), b (1|2, 2 cells), c (18, 1 cell), d (unlabelled, 2)."""
    return pd.DataFrame({
        "ID": ["a", "a", "a", "b", "b", "c", "d", "d"],
        "cell_id": [1, 2, 3, 1, 2, 1, 1, 2],
        "Label": ["0", "0", "0", "1|2", "1|2", "18", np.nan, np.nan],
        "fold": [0, 0, 0, 1, 1, 1, 0, 0],
    })


# --------------------------------------------------------------------------- selections


def test_select_single_label_and_all():
    table = small_table()
    rows, targets = select_cells(table, "single_label")
    assert rows.tolist() == [0, 1, 2, 5]
    assert targets.dtype == np.float32 and targets.shape == (4, 19)
    assert targets.argmax(1).tolist() == [0, 0, 0, 18] and targets.sum() == 4
    rows, targets = select_cells(table, "all")
    assert rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert targets[3].nonzero()[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="selection"):
        select_cells(table, "most")
    with pytest.raises(ValueError, match="Label"):
        select_cells(table.drop(columns="Label"))


def test_selection_keeps_row_values_of_a_filtered_table_and_caps_per_image():
    table = small_table()
    rows, _ = select_cells(table[table["fold"] == 1], "all")
    assert rows.tolist() == [3, 4, 5]  # crop rows of the full cache, not positions in the subset
    rows, targets = select_cells(table, "all", max_per_image=1, seed=3)
    assert len(rows) == 3 and set(table.loc[rows, "ID"]) == {"a", "b", "c"}
    again, _ = select_cells(table, "all", max_per_image=1, seed=3)
    assert np.array_equal(rows, again)
    rows2, _ = select_cells(table, "all", max_per_image=2)
    assert len(rows2) == 5


def test_selection_counts_on_a_synthetic_dataset():
    from hpasc.synthetic import generate_image

    label_sets = [(0,), (3, 5), (18,), (11,)]
    frames = []
    for k, labels in enumerate(label_sets):
        img = generate_image(k, 96, labels)
        n = int(img.cells.max())
        frames.append(pd.DataFrame({"ID": f"i{k}", "cell_id": np.arange(1, n + 1),
                                    "Label": "|".join(map(str, labels))}))
    table = pd.concat(frames, ignore_index=True)
    sizes = [len(f) for f in frames]
    rows, targets = select_cells(table, "single_label")
    assert len(rows) == sizes[0] + sizes[2] + sizes[3]
    assert targets.sum(0)[[0, 18, 11]].tolist() == [sizes[0], sizes[2], sizes[3]]
    rows, targets = select_cells(table, "all")
    assert len(rows) == sum(sizes) and targets.sum(0)[[3, 5]].tolist() == [sizes[1], sizes[1]]


def test_identities_from_targets():
    targets = np.zeros((3, 19), np.float32)
    targets[0, 4] = 1
    targets[1, [1, 2]] = 1
    assert identities_from_targets(targets).tolist() == [4, -1, -1]


# --------------------------------------------------------------------------- class balance


def test_class_balance_weights_hand_computed():
    targets = np.zeros((7, 19), np.float32)
    targets[0:4, 0] = 1  # class 0: 4 samples -> weight 1
    targets[4, 1] = 1  # class 1: 1 sample
    targets[5:7, 2] = 1  # class 2: 2 samples -> 2
    targets[4, 0] = 1  # sample 4 is 0|1 -> counts 5, 1, 2 -> w = 1, min(5, 3), 2.5; it takes w1
    w = class_balance_weights(targets, cap=3.0)
    raw = np.array([1, 1, 1, 1, 3, 2.5, 2.5])
    assert w == pytest.approx(raw / raw.mean())
    empty = np.zeros((2, 19), np.float32)
    empty[0, 5] = 1
    assert class_balance_weights(empty, cap=3.0).tolist() == [1.0, 1.0]  # no positives -> 1
    with pytest.raises(ValueError):
        class_balance_weights(targets, cap=0.5)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("preset", sorted(AUGMENTATIONS))
def test_every_preset_keeps_shape_channels_and_dtype(preset):
    cfg = CellsConfig(size=32, augment=preset)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    for train in (True, False):
        t = build_transform(cfg, train=train, seed=0)
        for _ in range(5):
            x = t(crop)
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (4, 32, 32)
            assert torch.isfinite(x).all()


def _leaf_transforms(transforms: list) -> list:
    """Every transform of a preset, the members of ``OneOf`` groups included."""
    out = []
    for t in transforms:
        out.extend(_leaf_transforms(list(t.transforms)) if hasattr(t, "transforms") else [t])
    return out


@pytest.mark.parametrize("preset", sorted(p for p in AUGMENTATIONS if isinstance(AUGMENTATIONS[p](), list)))
def test_each_augmentation_alone_keeps_4_float32_channels(preset):
    """Each transform, forced to fire, on the float32 4-channel data it gets in the pipeline: the final
    tensor cast would hide a transform that returns float64 or drops a channel, so look before it.
    (Batch presets: tests/test_batch_augment.py.)"""
    crop = np.random.default_rng(0).uniform(0, 1, (32, 32, 4)).astype(np.float32)
    for t in _leaf_transforms(AUGMENTATIONS[preset]()):
        t.p = 1.0
        t.set_random_seed(0)
        out = t(image=crop.copy())["image"]
        name = type(t).__name__
        assert out.shape == (32, 32, 4) and out.dtype == np.float32, (name, out.shape, out.dtype)
        assert np.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, name


def test_eval_transform_normalises_per_channel():
    cfg = CellsConfig(mean=(0.1, 0.2, 0.3, 0.4), std=(0.5, 0.25, 0.1, 1.0), augment="strong")
    t = build_transform(cfg, train=False)
    crop = np.zeros((4, 4, 4), np.uint8)
    crop[..., :] = [51, 102, 153, 255]  # 0.2, 0.4, 0.6, 1.0
    x = t(crop)
    assert x[:, 0, 0].tolist() == pytest.approx([0.2, 0.8, 3.0, 0.6], abs=1e-5)
    assert torch.equal(t(image=crop)["image"], x)  # albumentations-style call
    batch = t.batch(np.stack([crop, crop]))
    assert batch.shape == (2, 4, 4, 4) and torch.allclose(batch[1], x, atol=1e-5)


def test_build_transform_rejects_bad_config():
    with pytest.raises(ValueError, match="4 per-channel"):
        build_transform(CellsConfig(mean=(0.1,)), train=True)
    with pytest.raises(ValueError, match="positive"):
        build_transform(CellsConfig(std=(0.1, 0.1, 0.0, 0.1)), train=True)
    with pytest.raises(ValueError, match="augment"):
        build_transform(CellsConfig(augment="wild"), train=True)
    with pytest.raises(ValueError, match="uint8"):
        build_transform(CellsConfig(), train=False)(np.zeros((8, 8, 3), np.uint8))


def test_flips_are_independent_once_seeded():
    """albumentations 2.0.8 gives every transform the same seed; ours share one stream instead."""
    import albumentations as A

    t = CellTransform((0.0,) * 4, (1.0,) * 4, [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], seed=0)
    crop = np.zeros((4, 4, 4), np.uint8)
    crop[0, 0, 0] = 255
    corners = {int(t(crop)[0].argmax()) for _ in range(60)}
    assert corners == {0, 3, 12, 15}  # all four flip combinations occur


def test_set_random_state_makes_an_item_reproducible():
    import random

    t = build_transform(CellsConfig(augment="strong"), train=True)
    crop = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    outs = []
    for _ in range(2):
        t.set_random_state(np.random.default_rng(5), random.Random(5))
        outs.append(t(crop))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], t(crop))


def test_channel_intensity_changes_channels_independently():
    t = ChannelIntensity(brightness=0.1, contrast=0.3, gamma=0.3, p=1.0)
    t.set_random_seed(1)
    x = np.full((8, 8, 4), 0.5, np.float32)
    y = t(image=x)["image"]
    assert y.dtype == np.float32 and y.shape == x.shape
    assert len(np.unique(y[0, 0])) == 4 and 0 <= y.min() and y.max() <= 1


# --------------------------------------------------------------------------- dataset and loader


def test_dataset_items_and_indices():
    crops = np.arange(5 * 4 * 4 * 4, dtype=np.int64).reshape(5, 4, 4, 4).astype(np.uint8)
    targets = np.zeros((2, 19), np.float32)
    targets[0, 3] = 1
    targets[1, [1, 2]] = 1
    ds = CellDataset(crops, targets, build_transform(CellsConfig(mean=(0,) * 4, std=(1,) * 4), False),
                     indices=np.array([4, 1]))
    item = ds[0]
    assert set(item) == {"image", "target", "identity", "index"}
    assert item["index"] == 4 and item["identity"] == 3 and ds[1]["identity"] == -1
    assert torch.allclose(item["image"], torch.from_numpy(crops[4].transpose(2, 0, 1) / 255).float())
    assert item["target"].tolist() == targets[0].tolist()
    plain = CellDataset(crops)
    assert len(plain) == 5 and plain[2]["target"].sum() == 0 and plain[2]["identity"] == -1
    with pytest.raises(ValueError, match="targets"):
        CellDataset(crops, targets)
    with pytest.raises(IndexError):
        CellDataset(crops, indices=np.array([5]))


def test_a_batch_of_items_is_fetched_at_once_and_equals_the_stacked_items():
    from torch.utils.data import DataLoader, default_collate

    from hpasc.data import collate_items
    from hpasc.training.sampling import SeededItems

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 8, 8, 4)).astype(np.uint8)
    targets = rng.random((4, 19)).astype(np.float32)
    transform = build_transform(CellsConfig(mean=(0.1, 0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7, 0.8)), False)
    ds = CellDataset(crops, targets, transform, identities=np.array([3, -1, 7, 0]), indices=np.array([5, 0, 2, 2]))
    batch = ds.__getitems__([3, 0, 1])
    stacked = default_collate([ds[i] for i in (3, 0, 1)])
    assert set(batch) == set(stacked) and batch["index"].tolist() == [2, 5, 0]
    for key in batch:  # the same bits and dtypes as the items one by one
        assert batch[key].dtype == stacked[key].dtype and torch.equal(batch[key], stacked[key]), key
    # through the training loop's wrapper and collate function: no augmentation per item -> one fetch
    seeded = SeededItems(ds, seed=1)
    loader = DataLoader(seeded, batch_size=3, sampler=[(0, 3), (0, 0), (0, 1)], collate_fn=collate_items)
    assert torch.equal(next(iter(loader))["image"], stacked["image"])
    assert collate_items([ds[0], ds[1]])["image"].shape == (2, 4, 8, 8)  # plain items are stacked


def test_dataset_pickles_a_memmap_as_its_path(tmp_path):
    import pickle

    path = tmp_path / "crops.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (50, 16, 16, 4), dtype=np.uint8))
    crops = np.load(path, mmap_mode="r")
    ds = CellDataset(crops, indices=np.array([7, 3]))
    blob = pickle.dumps(ds)
    assert len(blob) < 50 * 16 * 16 * 4 // 4  # not the pixels
    back = pickle.loads(blob)
    assert isinstance(back.crops, np.memmap) and torch.equal(back[0]["image"], ds[0]["image"])


