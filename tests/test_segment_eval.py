"""``hpasc segment-eval``: scores of hand-made label maps with known merges and splits, the folder
layouts it reads, and the real samples."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpasc.cli import main
from hpasc.io import write_png_atomic
from hpasc.segmentation.evaluate import evaluate_folder, reference_ids, score_label_maps


def _maps():
    """Reference: four 10 x 10 cells in a row. Ours: cell 1 exact, cells 2+3 merged into one, cell 4 split
    into a left and a right half."""
    truth = np.zeros((10, 40), np.int32)
    for k in range(4):
        truth[:, 10 * k:10 * (k + 1)] = k + 1
    ours = np.zeros_like(truth)
    ours[:, :10] = 1
    ours[:, 10:30] = 2
    ours[:, 30:35] = 3
    ours[:, 35:] = 4
    return ours, truth


def test_hand_made_merge_and_split():
    ours, truth = _maps()
    s = score_label_maps(ours, truth, "x")
    assert (s.n_pred, s.n_truth, s.merged, s.split) == (4, 4, 1, 1)
    # at 0.5: the exact cell, the merged cell with cell 2 (IoU 100 / 200) and one half of cell 4
    assert s.tp == {"0.5": 3, "0.6": 1, "0.75": 1}
    assert s.f1 == {"0.5": pytest.approx(6 / 8), "0.6": pytest.approx(2 / 8), "0.75": pytest.approx(2 / 8)}
    assert s.mean_iou == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    perfect = score_label_maps(truth * 7, truth)  # label values need not be consecutive
    assert perfect.f1["0.75"] == 1.0 and perfect.merged == perfect.split == 0
    empty = score_label_maps(np.zeros_like(truth), np.zeros_like(truth))
    assert empty.f1["0.6"] == 1.0


def test_folder_layouts_missing_masks_and_the_cli(tmp_path, capsys):
    ours, truth = _maps()
    write_png_atomic(tmp_path / "ours" / "a.png", ours.astype(np.uint16))
    write_png_atomic(tmp_path / "ref" / "a_cellmask.png", truth.astype(np.uint16))  # HPA sample naming
    write_png_atomic(tmp_path / "ref" / "b.png", truth.astype(np.uint16))  # hpasc segment naming
    write_png_atomic(tmp_path / "ref" / "b_nuclei.png", truth.astype(np.uint16))
    write_png_atomic(tmp_path / "ref" / "a_red.png", truth.astype(np.uint8))  # an image channel, not a map
    assert reference_ids(tmp_path / "ref") == ["a", "b"]
    result = evaluate_folder(tmp_path / "ours", tmp_path / "ref")
    a, b = result.images
    assert a.f1["0.6"] == pytest.approx(0.25) and not a.missing
    assert b.missing and b.f1["0.6"] == 0.0 and b.n_truth == 4
    assert result.mean_f1["0.6"] == pytest.approx(0.125)
    assert result.pooled_f1["0.6"] == pytest.approx(2 * 1 / (8 + 4))
    assert main(["segment-eval", str(tmp_path / "ours"), str(tmp_path / "ref"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_f1"]["0.6"] == pytest.approx(0.125) and out["images"][1]["missing"] is True
    assert main(["segment-eval", str(tmp_path / "ours"), str(tmp_path / "ref")]) == 0
    assert "(no mask of ours)" in capsys.readouterr().out
    assert main(["segment-eval", str(tmp_path / "ours"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_real_samples_against_their_hpacellseg_masks(real_hpa, tmp_path):
    """The hpacellseg masks scored against themselves are perfect; shifted by 40 px (about a tenth of a
    cell) every cell still matches at 0.5, fewer at 0.6 and fewer again at 0.75."""
    import cv2

    sample = real_hpa / "sample"
    image_id = reference_ids(sample)[0]
    truth = cv2.imread(str(sample / f"{image_id}_cellmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    assert score_label_maps(truth, truth).f1["0.75"] == 1.0
    shifted = np.roll(truth, 40, axis=1)
    s = score_label_maps(shifted, truth)
    assert s.f1["0.75"] < s.f1["0.6"] < s.f1["0.5"] and 0.5 < s.mean_iou < 0.9
