"""Blending: the weight search finds the better member; submission averaging is exact and matches by IoU."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import build_world

from hpasc.blend import (
    BlendError,
    FoldObjective,
    blend_image,
    blend_runs,
    blend_submissions,
    cell_confidences,
    coordinate_search,
    search_weights,
)
from hpasc.cv import load_cv_data
from hpasc.labels import NUM_CLASSES
from hpasc.rle import encode_mask

# --------------------------------------------------------------------------- weights over runs


def good(onehot, rng):
    return 0.6 * onehot + rng.uniform(0, 0.4, NUM_CLASSES)


def bad(onehot, rng):
    return rng.uniform(0, 1, NUM_CLASSES)  # knows nothing


@pytest.mark.parametrize("with_truth", [True, False])
def test_search_recovers_the_better_member(tmp_path, with_truth):
    world = build_world(tmp_path, {"bad": bad, "good": good}, n_images=12, n_folds=3, seed=1,
                        with_truth=with_truth)
    data = load_cv_data([world["runs"] / "bad", world["runs"] / "good"], progress=False)
    result = search_weights(data, alphas=(0.0, 0.5, 1.0), steps=10)
    weights = dict(zip(result.groups, result.weights))
    assert weights["good"] > 0.5 > weights["bad"]
    assert result.objective == ("competition" if with_truth else "proxy")
    assert result.score >= max(result.single_scores.values()) - 1e-12
    assert result.score >= result.equal_score
    assert result.single_scores["good"] > result.single_scores["bad"]
    assert result.lofo_score is not None and 0 <= result.lofo_score <= 1
    if not with_truth:
        assert result.alpha == data.infer_cfg.alpha  # the proxy cannot judge alpha


@pytest.mark.parametrize("with_truth", [True, False])
def test_leave_one_fold_out_exposes_weights_that_only_fit_some_folds(tmp_path, with_truth):
    # member a is the good one on fold 0 and the noise on fold 1, member b the reverse: weights searched
    # on one fold pick the member that fails on the other, so the honest estimate falls far below the
    # in-sample score; with a member good on every fold (the test above) the two agree
    world = build_world(tmp_path, {"a": good, "b": bad}, n_images=12, n_folds=2, seed=3, with_truth=with_truth)
    a, b = (world["runs"] / name / "fold1" / "oof.csv" for name in ("a", "b"))
    swap = tmp_path / "swap.csv"
    a.rename(swap)
    b.rename(a)
    swap.rename(b)
    data = load_cv_data([world["runs"] / "a", world["runs"] / "b"], progress=False)
    result = search_weights(data, alphas=(0.0, 0.5, 1.0), steps=10)
    objective = FoldObjective(data)
    wrong_member = np.mean([objective(np.array([0.0, 1.0]), result.alpha, [0]),
                            objective(np.array([1.0, 0.0]), result.alpha, [1])])
    assert result.lofo_score < result.score - 0.1
    assert result.lofo_score < wrong_member + 0.1  # about what the fold's wrong member scores alone

    consistent = build_world(tmp_path / "c", {"bad": bad, "good": good}, n_images=12, n_folds=2, seed=3,
                             with_truth=with_truth)
    result = search_weights(load_cv_data([consistent["runs"] / "bad", consistent["runs"] / "good"],
                                         progress=False), alphas=(0.0, 0.5, 1.0), steps=10)
    assert result.lofo_score > result.score - 0.03


def test_objective_is_the_mean_over_folds(tmp_path):
    world = build_world(tmp_path, {"good": good}, n_images=9, n_folds=3, seed=2)
    data = load_cv_data([world["runs"] / "good"], progress=False)
    objective = FoldObjective(data)
    per_fold = objective.per_fold(np.ones(1), 0.5)
    assert sorted(per_fold) == [0, 1, 2]
    assert objective(np.ones(1), 0.5) == pytest.approx(np.mean(list(per_fold.values())))
    assert objective(np.ones(1), 0.5, [1]) == pytest.approx(per_fold[1])
    # one member: only alpha moves; the result is the best alpha of the grid
    _, alpha, best = coordinate_search(objective, 0.5, (0.0, 1.0, 2.0))
    assert best == pytest.approx(max(objective(np.ones(1), a) for a in (0.0, 0.5, 1.0, 2.0)))


def test_blend_runs_writes_a_weights_file_predict_reads(tmp_path):
    from hpasc.predict import read_weights

    world = build_world(tmp_path, {"bad": bad, "good": good}, n_images=8, n_folds=2, seed=4)
    out = tmp_path / "weights.yaml"
    result = blend_runs([world["runs"] / "bad", world["runs"] / "good"], out, alphas=(0.5, 1.0), steps=4,
                        lofo=False, progress=False)
    data = yaml.safe_load(out.read_text())
    assert set(data) == {"runs", "alpha"} and set(data["runs"]) == {"bad", "good"}
    weights, overrides = read_weights(out)
    assert weights == pytest.approx(dict(zip(result.groups, result.weights)), abs=1e-6)
    assert overrides == {"alpha": result.alpha}
    assert out.read_text().startswith("# hpasc blend")


# --------------------------------------------------------------------------- averaging submissions

H = W = 40


def square(y: int, x: int, side: int = 10) -> str:
    mask = np.zeros((H, W), bool)
    mask[y:y + side, x:x + side] = True
    return encode_mask(mask)


def write_sub(path, rows):
    pd.DataFrame([(i, W, H, s) for i, s in rows], columns=["ID", "ImageWidth", "ImageHeight",
                                                            "PredictionString"]).to_csv(path, index=False)
    return path


def parsed(path) -> dict[str, dict[str, np.ndarray]]:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {i: cell_confidences(s) for i, s in zip(df.ID, df.PredictionString)}


def test_blending_identical_files_is_the_identity(tmp_path):
    from hpasc.submission import validate_submission

    a, b = square(2, 2), square(20, 20)
    rows = [("img1", f"0 0.9 {a} 16 0.25 {a} 3 0.123456 {b}"), ("img2", ""), ("img3", f"18 1 {b}")]
    one = write_sub(tmp_path / "one.csv", rows)
    two = write_sub(tmp_path / "two.csv", rows)
    out = blend_submissions([one, two], tmp_path / "out.csv", weights=[0.3, 0.7], progress=False)
    assert validate_submission(out, one) == []
    got, want = parsed(out), parsed(one)
    assert list(got) == list(want)
    for image_id in want:
        assert list(got[image_id]) == list(want[image_id])  # same cells (masks), same order
        for mask, conf in want[image_id].items():
            np.testing.assert_allclose(got[image_id][mask], conf, rtol=1e-6)


def test_shifted_masks_match_by_iou(tmp_path):
    # cell A in file 2 is shifted by 1 px: IoU 90/110 = 0.82 -> the same cell; cell B shifted by 3 px:
    # IoU 70/130 = 0.54 -> a different cell, kept on its own with half weight
    one = write_sub(tmp_path / "one.csv", [("img1", f"0 0.8 {square(2, 2)} 5 0.4 {square(20, 20)}")])
    two = write_sub(tmp_path / "two.csv", [("img1", f"0 0.4 {square(2, 3)} 7 0.6 {square(2, 3)} "
                                                    f"5 0.2 {square(20, 23)}")])
    out = blend_submissions([one, two], tmp_path / "out.csv", progress=False)
    cells = parsed(out)["img1"]
    assert list(cells) == [square(2, 2), square(20, 20), square(20, 23)]  # the first file's masks kept
    np.testing.assert_allclose(cells[square(2, 2)][[0, 7]], [0.6, 0.3])
    np.testing.assert_allclose(cells[square(20, 20)][5], 0.2)
    np.testing.assert_allclose(cells[square(20, 23)][5], 0.1)


def test_each_cell_is_matched_at_most_once_per_file():
    # two cells of file 2 both overlap cell A of file 1; only the better one (identical) joins it
    a = square(2, 2)
    cells = blend_image([f"1 1 {a}", f"1 1 {square(2, 3)} 1 0.5 {a}"], [1, 1], H, W)
    assert [c.mask for c in cells] == [a, square(2, 3)]
    np.testing.assert_allclose([c.conf[1] for c in cells], [0.75, 0.5])


def test_bad_weights_and_missing_images(tmp_path):
    one = write_sub(tmp_path / "one.csv", [("img1", ""), ("img2", "")])
    two = write_sub(tmp_path / "two.csv", [("img1", "")])
    with pytest.raises(BlendError, match="2 weights for 1 submissions"):
        blend_submissions([one], tmp_path / "o.csv", weights=[1, 2])
    with pytest.raises(BlendError, match="non-negative"):
        blend_submissions([one, one], tmp_path / "o.csv", weights=[0, 0])
    with pytest.raises(BlendError, match=r"two\.csv: image img2 is missing"):
        blend_submissions([one, two], tmp_path / "o.csv", progress=False)
    with pytest.raises(BlendError, match="not `class confidence mask` triples"):
        cell_confidences("0 0.5", "img9")
    for bad in ("nan", "inf"):
        with pytest.raises(BlendError, match="img9: triple 2: confidence .* is not finite"):
            cell_confidences(f"0 0.5 m 1 {bad} m", "img9")


def test_cli_both_modes(tmp_path, capsys):
    from hpasc.cli import main

    world = build_world(tmp_path, {"bad": bad, "good": good}, n_images=6, n_folds=2, seed=5)
    weights = tmp_path / "w.yaml"
    assert main(["blend", "runs", str(world["runs"] / "bad"), str(world["runs"] / "good"), "--out", str(weights),
                 "--alphas", "0.5", "--steps", "2", "--no-lofo"]) == 0
    assert "leave-one-fold-out" not in capsys.readouterr().out
    assert yaml.safe_load(weights.read_text())["alpha"] == 0.5
    sub = write_sub(tmp_path / "s.csv", [("img1", f"4 0.5 {square(5, 5)}")])
    out = tmp_path / "b.csv"
    assert main(["blend", "submissions", str(sub), str(sub), "--weights", "1", "3", "--out", str(out)]) == 0
    assert parsed(out) == {"img1": {square(5, 5): pytest.approx(np.eye(NUM_CLASSES)[4] * 0.5)}}
