"""The batch augmentation: what each part does on arrays with known answers, its seeding, and that the
training loop applies it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpasc.batch_augment import BatchAugment, _gaussian
from hpasc.config import CellsConfig
from hpasc.data import build_transform

MEAN, STD = (0.08,) * 4, (0.12,) * 4


def d4(x: torch.Tensor) -> list[torch.Tensor]:
    turns = [torch.rot90(x, r, (1, 2)) for r in range(4)]
    return turns + [t.flip(2) for t in turns]


def normalised(crops: np.ndarray) -> torch.Tensor:
    return build_transform(CellsConfig(augment="none", mean=MEAN, std=STD), train=False).batch(crops)


def test_without_affine_intensity_or_blur_every_crop_is_one_of_the_eight_symmetries():
    crops = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 4), dtype=np.uint8)
    x = normalised(crops)
    y = BatchAugment(affine_p=0, intensity_p=0, blur_noise_p=0).with_normalisation(MEAN, STD)(x, seed=5)
    which = []
    for k in range(len(x)):
        gaps = [float((y[k] - v).abs().max()) for v in d4(x[k])]
        assert min(gaps) < 1e-4, gaps
        which.append(int(np.argmin(gaps)))
    assert len(set(which)) == 8  # all eight turn up in 64 crops


def test_intensity_is_per_channel_gain_bias_and_gamma_within_the_ranges():
    aug = BatchAugment(affine_p=0, intensity_p=1, blur_noise_p=0, brightness=0.05, contrast=0.2,
                       gamma=0.2).with_normalisation(MEAN, STD)
    level = np.full((200, 8, 8, 4), 128, np.uint8)  # flat: flips and turns change nothing
    y = aug(normalised(level), seed=1) * torch.tensor(STD).view(1, 4, 1, 1) + torch.tensor(MEAN).view(1, 4, 1, 1)
    v = 128 / 255
    lo, hi = v ** np.exp(0.2) * 0.8 - 0.05, v ** np.exp(-0.2) * 1.2 + 0.05
    per_channel = y[:, :, 0, 0]
    assert torch.allclose(y, per_channel[:, :, None, None].expand_as(y), atol=1e-6)  # flat stays flat
    assert float(per_channel.min()) >= lo - 1e-5 and float(per_channel.max()) <= hi + 1e-5
    assert float(per_channel.std(dim=1).mean()) > 0.01  # channels change independently


def test_blur_matches_a_hand_made_kernel_and_noise_moves_only_some_crops():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 1.0
    out = _gaussian(x, 3)[0, 0]
    sigma = 0.3 * ((3 - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a 3-tap kernel
    k = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma ** 2))
    k /= k.sum()
    np.testing.assert_allclose(out[2:5, 2:5].numpy(), np.outer(k, k), atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)
    flat = normalised(np.full((400, 8, 8, 4), 100, np.uint8))
    y = BatchAugment(affine_p=0, intensity_p=0, blur_noise_p=0.2).with_normalisation(MEAN, STD)(flat, seed=2)
    moved = (y - flat).abs().amax(dim=(1, 2, 3)) > 1e-4  # blur leaves the inside of a flat crop alone
    inside_moved = (y - flat)[:, :, 2:6, 2:6].abs().amax(dim=(1, 2, 3)) > 1e-4  # noise does not
    assert 0.1 < float(moved.float().mean()) < 0.3  # about 20 % of the crops
    assert 0.03 < float(inside_moved.float().mean()) < 0.17  # about half of those: noise


def test_everything_at_once_stays_in_range_and_finite():
    x = normalised(np.random.default_rng(4).integers(0, 256, (256, 16, 16, 4), dtype=np.uint8))
    aug = BatchAugment(affine_p=1, intensity_p=1, blur_noise_p=1).with_normalisation(MEAN, STD)
    y = aug(x, 9) * torch.tensor(STD).view(1, 4, 1, 1) + torch.tensor(MEAN).view(1, 4, 1, 1)
    assert y.dtype == torch.float32 and y.shape == x.shape and torch.isfinite(y).all()
    assert float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6


def test_seeded_and_shape_checked():
    x = normalised(np.random.default_rng(1).integers(0, 256, (8, 16, 16, 4), dtype=np.uint8))
    aug = BatchAugment().with_normalisation(MEAN, STD)
    assert torch.equal(aug(x, 3), aug(x, 3)) and not torch.equal(aug(x, 3), aug(x, 4))
    assert aug(x[:0], 1).shape == (0, 4, 16, 16)
    with pytest.raises(ValueError, match=r"expected \(n, 4, S, S\)"):
        aug(x[:, :3], 1)


def test_the_preset_gives_an_unaugmented_item_transform_and_a_batch_augmentation():
    t = build_transform(CellsConfig(augment="standard_batch", mean=MEAN, std=STD), train=True)
    crop = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    assert t.augment is None and isinstance(t.batch_augment, BatchAugment) and t.batch_augment.mean == MEAN
    assert torch.equal(t(crop), t(crop))  # nothing random per crop
    assert build_transform(CellsConfig(augment="standard_batch"), train=False).batch_augment is None


def test_the_training_loop_augments_every_batch_with_its_own_seed(tmp_path, monkeypatch):
    from builders import hand_made_fold, tiny_cfg

    from hpasc.train import train_on

    seen = []
    real = BatchAugment.__call__

    def spy(self, x, seed):
        seen.append((tuple(x.shape), seed))
        return real(self, x, seed)

    monkeypatch.setattr(BatchAugment, "__call__", spy)
    cfg = tiny_cfg(tmp_path, "cells.augment=standard_batch", "train.epochs=2")
    train_on(cfg, hand_made_fold(), tmp_path / "run")
    assert len(seen) == 2 * 4  # 36 training cells: 4 full batches of 8 (the last partial one dropped), 2 epochs
    assert all(shape == (8, 4, 32, 32) for shape, _ in seen)
    assert len({seed for _, seed in seen}) == len(seen)
