"""Cell-level evaluation against truth: matching, oracle mAP, pooled and within-image AUC (hand-computed)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hpasc.cell_eval import cell_auc, evaluate_cells, match_cells
from hpasc.rle import encode_mask

S = 12


def _cells() -> list[str]:
    masks = []
    for k in range(3):
        m = np.zeros((S, S), bool)
        m[1:11, 4 * k:4 * k + 3] = True  # three 10 x 3 columns
        masks.append(encode_mask(m))
    return masks


M = _cells()


def _frame(rows):
    return pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])


def _truth():
    return _frame([("A", S, S, f"0 {M[0]} 0|16 {M[1]} 16 {M[2]}"),
                   ("B", S, S, f"5 {M[0]} 5 {M[1]} 0 {M[2]}")])


def _sub():
    stray = np.zeros((S, S), bool)
    stray[0, :] = True  # overlaps nothing well: never matched
    a = f"0 0.9 {M[0]} 16 0.2 {M[0]} 0 0.5 {M[1]} 16 0.6 {M[1]} 0 0.4 {M[2]} 16 0.8 {M[2]}"
    b = (f"0 0.95 {M[0]} 5 0.7 {M[0]} 0 0.1 {M[1]} 5 0.2 {M[1]} 0 0.3 {M[2]} 5 0.5 {M[2]} "
         f"3 0.9 {encode_mask(stray)}")
    return _frame([("A", S, S, a), ("B", S, S, b)])


def test_matching_and_oracle_rows():
    matched = match_cells(_truth(), _sub())
    assert matched.image_ids == ["A"] * 3 + ["B"] * 3 and matched.n_truth == 6
    assert matched.targets[1, [0, 16]].tolist() == [1, 1] and matched.targets[1].sum() == 2
    assert matched.scores[3, 0] == 0.95 and matched.scores[3, 16] == 0.0  # not listed -> 0
    assert matched.oracle_rows["B"] == f"5 1 {M[0]} 5 1 {M[1]} 0 1 {M[2]}"  # the stray cell gets nothing


def test_pooled_and_within_image_auc_by_hand():
    auc = cell_auc(match_cells(_truth(), _sub()))
    # class 0: positives .9 .5 .3, negatives .4 .95 .1 -> 5 of 9 pairs ordered; both images hold it
    assert auc["per_class"]["0"] == pytest.approx(5 / 9) and auc["per_class_within"]["0"] == pytest.approx(5 / 9)
    # class 16: only image A holds it; its positives beat every negative
    assert auc["per_class"]["16"] == 1.0 and auc["per_class_within"]["16"] == 1.0
    # class 5: within B, positives .7 .2 vs negative .5 -> 1/2; pooled adds A's cells at 0 -> 7/8
    assert auc["per_class_within"]["5"] == pytest.approx(0.5) and auc["per_class"]["5"] == pytest.approx(7 / 8)
    assert auc["per_class"]["3"] is None  # no positive truth cell
    assert auc["within"] == pytest.approx((5 / 9 + 1 + 0.5) / 3)
    assert auc["mean"] == pytest.approx((5 / 9 + 1 + 7 / 8) / 3)
    assert auc["worst"] == {"class": 0, "auc": pytest.approx(5 / 9)}
    # support: positive truth cells and the images holding them
    assert auc["per_class_support"]["0"] == [3, 2] and auc["per_class_support"]["16"] == [2, 1]
    assert auc["per_class_support"]["5"] == [2, 1] and auc["per_class_support"]["3"] == [0, 0]


def test_oracle_is_the_segmentation_ceiling():
    ev = evaluate_cells(_truth(), _sub())
    assert ev["oracle_mAP"] == 1.0  # every truth cell has its mask in the submission
    assert 0 < ev["mAP"] < 1 and ev["oracle_share"] == pytest.approx(ev["mAP"])
    # a submission whose masks miss half the cells caps the oracle below 1
    half = _frame([("A", S, S, f"0 0.5 {M[0]}"), ("B", S, S, "")])
    assert evaluate_cells(_truth(), half)["oracle_mAP"] < 1.0


def test_score_cli_cells_view(tmp_path, capsys):
    from hpasc.cli import main

    _truth().to_csv(tmp_path / "t.csv", index=False)
    _sub().to_csv(tmp_path / "s.csv", index=False)
    assert main(["score", str(tmp_path / "t.csv"), str(tmp_path / "s.csv"), "--cells"]) == 0
    out = capsys.readouterr().out
    assert "of oracle 1.0000" in out and "6 of 6 truth cells matched" in out
    assert "within-image 0.685" in out  # (5/9 + 1 + 1/2) / 3
    assert "pooled 0.875  within 0.500  (2 cells in 1 image)" in out  # class 5
    assert "(3 cells in 2 images)" in out  # class 0
