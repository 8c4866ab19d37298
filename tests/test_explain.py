"""Grad-CAM and integrated gradients on hand-made networks whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpasc.explain import (
    ExplainError,
    GradCAM,
    choose_classes,
    find_target_layer,
    integrated_gradients,
)

S = 32
PATCH = (slice(20, 26), slice(4, 10))  # rows 20..25, columns 4..9


class PatchNet(nn.Module):
    """Class 3 fires on bright green pixels: conv (green - 0.5) -> ReLU -> conv x2 -> ReLU -> mean -> x100.

    Returns the model contract's dict. Class 5 reads the (dark) red channel the same way."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 2, 1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 19)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0, 1] = 1.0  # feature 0 = green
            self.conv1.weight[1, 0] = 1.0  # feature 1 = red
            self.conv1.bias.fill_(-0.5)
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0, 1, 1] = 2.0
            self.conv2.weight[1, 1, 1, 1] = 2.0
            self.head.weight.zero_()
            self.head.bias.fill_(-1.0)
            self.head.weight[3, 0] = 100.0
            self.head.weight[5, 1] = 100.0

    def forward(self, x):
        feats = self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1)
        return {"logits": self.head(feats), "embedding": feats}


def patch_image() -> torch.Tensor:
    x = torch.full((1, 4, S, S), 0.1)
    x[0, 1, PATCH[0], PATCH[1]] = 1.0
    return x


def test_target_layer_is_the_last_spatial_map_not_the_pool():
    model = PatchNet().eval()
    assert find_target_layer(model, patch_image()) is model.act2


def test_gradcam_shape_and_peak_on_the_planted_patch():
    model = PatchNet().eval()
    x = torch.cat([patch_image(), torch.roll(patch_image(), shifts=(-15, 18), dims=(2, 3))])
    maps, probs = GradCAM(model)(x, [3, 5])
    assert maps.shape == (2, 2, S, S) and probs.shape == (2, 19)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    for b, (rows, cols) in enumerate([PATCH, (slice(5, 11), slice(22, 28))]):
        peak = np.unravel_index(np.argmax(maps[b, 0]), (S, S))
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
        inside = maps[b, 0][rows, cols].mean()
        outside = maps[b, 0].sum() - maps[b, 0][rows, cols].sum()
        assert inside > 0.9 and outside / (S * S - 36) < 0.05
    assert np.all(maps[:, 1] == 0)  # class 5 has no evidence anywhere (red is dark): an empty map
    assert probs[0, 3] > 0.9 and probs[0, 5] < 0.5  # logit 100 * 36 px / 1024 - 1


def test_gradcam_layer_by_name_and_errors():
    model = PatchNet().eval()
    maps, _ = GradCAM(model, "act1")(patch_image(), [3])
    assert maps.shape == (1, 1, S, S) and maps[0, 0][PATCH].mean() > 0.9
    with pytest.raises(ExplainError, match="no module named 'nope'"):
        GradCAM(model, "nope")
    with pytest.raises(ExplainError, match="spatial"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4 * S * S, 19)), patch_image())


def test_integrated_gradients_exact_on_a_linear_model_and_complete_on_relu():
    linear = nn.Sequential(nn.Conv2d(4, 19, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        linear[0].weight.zero_()
        linear[0].weight[3, 1] = 2.0  # class 3 = 2 x mean green
    x = patch_image()
    ig = integrated_gradients(linear, x, 3, steps=4)
    assert ig.shape == (4, S, S)
    np.testing.assert_allclose(ig[1], 2.0 * x[0, 1].numpy() / (S * S), rtol=1e-5)
    assert np.all(ig[[0, 2, 3]] == 0)  # only the green channel carries class 3
    # completeness on the ReLU network: attributions sum to logit(x) - logit(baseline)
    model = PatchNet().eval()
    base = torch.zeros_like(x)
    ig = integrated_gradients(model, x, 3, baseline=base, steps=64, batch_size=16)
    with torch.no_grad():
        gap = (model(x)["logits"][0, 3] - model(base)["logits"][0, 3]).item()
    assert ig.sum() == pytest.approx(gap, rel=0.03)
    assert np.abs(ig[1]).sum() / np.abs(ig).sum() > 0.99
    with pytest.raises(ValueError, match="one input"):
        integrated_gradients(model, torch.cat([x, x]), 3)


def test_choose_classes():
    probs = np.zeros(19)
    probs[[2, 7, 11]] = [0.6, 0.9, 0.3]
    assert choose_classes(probs, None, 0.5, 4) == [7, 2]
    assert choose_classes(probs, None, 0.95, 4) == [7]  # nothing above: the top class
    assert choose_classes(probs, 11, 0.5, 4) == [11]
    with pytest.raises(ExplainError, match="class 19 outside"):
        choose_classes(probs, 19, 0.5, 4)


@pytest.mark.slow
def test_explain_image_writes_overlays_from_a_run_folder(tmp_path):
    from builders import build_world, perfect

    from hpasc.cli import main
    from hpasc.config import load_config, replace, save_config
    from hpasc.models import build_model

    world = build_world(tmp_path, {"a": perfect}, n_images=2, n_folds=1, with_images=True)
    run = world["runs"] / "a" / "fold0"
    cfg = replace(load_config(run / "config.yaml"), **{"model.name": "resnet10t", "model.embedding_dim": 8,
                                                        "cells.size": 32})
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg.model).state_dict()}, run / "best.pt")
    assert main(["explain", str(run), "--image", "img00", "--cell", "2", "--class", "7",
                 "--ig-steps", "4", "--out", str(tmp_path / "x")]) == 0
    png = tmp_path / "x" / "img00_cell2.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "x" / "img00_overview.png").is_file()
    with pytest.raises(ExplainError, match=r"img00\.png: no cell 5 \(the label map has cells 1\.\.4\)"):
        from hpasc.explain import explain_image

        explain_image(run, "img00", cell=5)
