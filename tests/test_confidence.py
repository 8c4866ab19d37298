"""Confidence recipes on hand-made probabilities with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest

from hpasc import confidence
from hpasc.confidence import border_factor, combine, combine_grouped, image_level
from hpasc.config import InferenceConfig

# three cells: class 0 [0.9, 0.5, 0.1], class 1 [0.2, 0.4, 0.6], Negative [0.1, 0.3, 0.8]; rest 0
P = np.zeros((3, 19), np.float32)
P[:, 0] = [0.9, 0.5, 0.1]
P[:, 1] = [0.2, 0.4, 0.6]
P[:, 18] = [0.1, 0.3, 0.8]


def cfg(**kw) -> InferenceConfig:
    base = {"recipe": "cell", "alpha": 1.0, "image_agg": "mean", "topk": 2, "border_weight": 0.0, "negative": "keep"}
    base.update(kw)
    return InferenceConfig(**base)


@pytest.mark.parametrize("how, c0, c1, c18", [
    ("mean", 0.5, 0.4, 0.4),
    ("max", 0.9, 0.6, 0.8),
    ("topk", 0.7, 0.5, 0.55),  # k=2: (0.9+0.5)/2, (0.6+0.4)/2, (0.8+0.3)/2
    ("vote", 2 / 3, 1 / 3, 1 / 3),  # cells >= 0.5 (0.5 counts)
])
def test_image_level_aggregations(how, c0, c1, c18):
    img = image_level(P, how, topk=2)
    assert img.shape == (19,) and img.dtype == np.float32
    np.testing.assert_allclose(img[[0, 1, 18]], [c0, c1, c18], atol=1e-6)
    assert np.all(img[2:18] == 0)


def test_vote_threshold_is_configurable():
    img = image_level(P, "vote", vote_threshold=0.6)
    np.testing.assert_allclose(img[[0, 1, 18]], [1 / 3, 1 / 3, 1 / 3], atol=1e-6)  # 0.9 | 0.6 | 0.8
    out = combine(P, cfg(recipe="image", image_agg="vote", vote_threshold=0.95))
    assert np.all(out == 0)


def test_image_level_topk_larger_than_cells_is_mean_and_no_cells_is_zero():
    np.testing.assert_allclose(image_level(P, "topk", topk=10), image_level(P, "mean"), atol=1e-7)
    assert np.all(image_level(np.zeros((0, 19)), "max") == 0)
    with pytest.raises(ValueError, match="head"):
        image_level(P, "head")
    with pytest.raises(ValueError, match="topk"):
        image_level(P, "topk", topk=0)


def test_recipe_cell_is_identity():
    np.testing.assert_allclose(combine(P, cfg(recipe="cell")), P)


def test_cell_x_image_product_and_alpha():
    out = combine(P, cfg(recipe="cell_x_image", alpha=1.0, image_agg="mean"))
    np.testing.assert_allclose(out[:, 0], [0.45, 0.25, 0.05], atol=1e-6)  # x 0.5
    np.testing.assert_allclose(out[:, 1], [0.08, 0.16, 0.24], atol=1e-6)  # x 0.4
    np.testing.assert_allclose(combine(P, cfg(recipe="cell_x_image", alpha=0.0)), P, atol=1e-7)
    # an image head's output overrides the aggregation: sqrt(0.25) = 0.5
    head = np.full(19, 0.25, np.float32)
    out = combine(P, cfg(recipe="cell_x_image", alpha=0.5, image_agg="head"), image_probs=head)
    np.testing.assert_allclose(out, P * 0.5, atol=1e-6)


def test_image_recipe_gives_every_cell_the_image_probability():
    out = combine(P, cfg(recipe="image", image_agg="max"))
    np.testing.assert_allclose(out[:, 0], [0.9] * 3)
    np.testing.assert_allclose(out[:, 18], [0.8] * 3)


def test_negative_modes():
    keep = combine(P, cfg(recipe="cell_x_image", negative="keep"))
    np.testing.assert_allclose(keep[:, 18], [0.04, 0.12, 0.32], atol=1e-6)  # x mean 0.4
    mx = combine(P, cfg(recipe="cell_x_image", negative="max"))
    np.testing.assert_allclose(mx[:, 18], [0.4, 0.4, 0.8], atol=1e-6)
    comp = combine(P, cfg(recipe="cell", negative="complement"))
    np.testing.assert_allclose(comp[:, 18], [0.1, 0.5, 0.4], atol=1e-6)
    np.testing.assert_allclose(comp[:, :18], P[:, :18])
    with pytest.raises(ValueError, match="negative"):
        combine(P, cfg(negative="sometimes"))


def test_border_down_weighting_by_relative_area():
    border = np.array([False, True, True])
    rel = np.array([0.2, 0.25, 2.0])
    np.testing.assert_allclose(border_factor(border, rel, 0.8, 3), [1.0, 0.4, 1.0], atol=1e-6)
    np.testing.assert_allclose(border_factor(border, None, 0.8, 3), [1.0, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(border_factor(border, rel, 0.0, 3), [1, 1, 1])
    out = combine(P, cfg(border_weight=0.8), border=border, rel_area=rel)
    np.testing.assert_allclose(out, P * np.array([1.0, 0.4, 1.0])[:, None], atol=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        combine(np.zeros((3, 18)), cfg())
    with pytest.raises(ValueError, match="border"):
        combine(P, cfg(border_weight=0.5), border=[True, False])
    with pytest.raises(ValueError, match="head"):
        combine(P, cfg(image_agg="head"))
    with pytest.raises(ValueError, match="unknown confidence recipe"):
        combine(P, cfg(recipe="nope"))


def test_no_cells_and_output_range():
    assert combine(np.zeros((0, 19)), cfg(recipe="cell_x_image", negative="complement")).shape == (0, 19)
    out = combine(P, cfg(recipe="cell_x_image", negative="complement"))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_registry_accepts_a_new_recipe(monkeypatch):
    monkeypatch.setitem(confidence.RECIPES, "half", lambda cell, image, c: cell / 2)
    np.testing.assert_allclose(combine(P, cfg(recipe="half")), P / 2)


@pytest.mark.parametrize("agg", ["mean", "max", "topk", "vote"])
@pytest.mark.parametrize("recipe, negative", [("cell_x_image", "max"), ("image", "complement"),
                                              ("cell", "keep")])
def test_combine_grouped_equals_per_image_combine(agg, recipe, negative):
    rng = np.random.default_rng(0)
    probs = rng.random((40, 19)).astype(np.float32)
    ids = rng.choice(["b", "a", "c", "d"], size=40)
    ids[7] = "single"  # an image with one cell
    border = rng.random(40) > 0.5
    rel = rng.random(40)
    c = cfg(recipe=recipe, alpha=0.5, image_agg=agg, topk=3, negative=negative, border_weight=0.5)
    out = combine_grouped(probs, ids, c, border, rel)
    for name in set(ids):
        rows = ids == name
        np.testing.assert_allclose(out[rows], combine(probs[rows], c, border[rows], rel[rows]), atol=1e-6)
    assert combine_grouped(np.zeros((0, 19)), np.array([]), c).shape == (0, 19)


def test_relative_stain_from_the_dimmest_cell_to_the_images_90th_percentile():
    from hpasc.confidence import relative_stain

    # 90th percentile of (4, 10, 20, 30, 40) with linear interpolation = 36; the dimmest cell (4) is 0
    assert relative_stain(np.array([4, 10, 20, 30, 40], np.uint16)) == pytest.approx([0, 6 / 32, 16 / 32, 26 / 32, 1])
    # an offset (background) or a gain (bit depth) changes nothing
    values = np.array([0.02, 0.5, 0.3, 0.9])
    assert relative_stain(values * 65535) == pytest.approx(relative_stain(values + 0.1))
    assert relative_stain(np.array([5.0])) == pytest.approx([1.0])  # one cell is its own reference
    assert relative_stain(np.full(3, 7.0)).tolist() == [1.0, 1.0, 1.0]  # one signal everywhere: all stained
    assert relative_stain(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # no signal at all: every cell unstained
    assert relative_stain(np.zeros(0)).shape == (0,)


def test_stain_negative_needs_no_class_and_no_signal():
    from hpasc.confidence import stain_negative

    probs = np.zeros((3, 19), np.float32)
    probs[0, 4] = 0.9  # stained and called: stays as it is
    probs[1, 4] = 0.1  # calls nothing, dim (stain 0.2): Negative 0.9 * 0.8
    probs[2, 18] = 0.95  # the model's own Negative wins when higher
    out = stain_negative(probs, np.array([1.0, 0.2, 0.5]))
    assert out[:, 18] == pytest.approx([0.0, 0.9 * 0.8, 0.95])
    assert np.array_equal(np.delete(out, 18, 1), np.delete(probs, 18, 1)) and probs[1, 18] == 0  # a copy
    with pytest.raises(ValueError, match="stain"):
        stain_negative(probs, np.ones(2))
    # the gate: classes 0..17 scaled by stain ** gate first, then Negative from what is left
    gated = stain_negative(probs, np.array([1.0, 0.2, 0.5]), gate=1.0)
    assert gated[:, 4] == pytest.approx([0.9, 0.1 * 0.2, 0.0])
    assert gated[:, 18] == pytest.approx([0.0, (1 - 0.02) * 0.8, 0.95])
    assert stain_negative(probs, np.array([1.0, 0.2, 0.5]), gate=0.5)[1, 4] == pytest.approx(0.1 * 0.2 ** 0.5)
    with pytest.raises(ValueError, match="gate must be >= 0"):
        stain_negative(probs, np.ones(3), gate=-1)
