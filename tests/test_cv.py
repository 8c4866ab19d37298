"""Offline CV over hand-made run folders: OOF files, a small cell world with truth masks, known scores."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from builders import SIZE, build_world, label_map, noisy, perfect  # noqa: E402
from builders import WORLD_CLASSES as CLASSES

from hpasc.cv import CVError, cross_validate, group_runs, load_cv_data, read_oof
from hpasc.fastmap import fast_map, match_image
from hpasc.labels import NUM_CLASSES
from hpasc.rle import encode_mask, label_map_runs

# --------------------------------------------------------------------------- matching and AP


def test_match_image_iou_exactly_point_six_is_a_hit():
    """20 px wide truth cell; a prediction shifted by 5 px has IoU 15/25 = 0.6, by 6 px 14/26 < 0.6."""
    pred = np.zeros((30, 60), np.int32)
    pred[5:25, 5:25] = 1  # 20 x 20 at x 5..24: truth A shifted by 5
    pred[5:25, 36:56] = 2  # truth B at x 30..49 shifted by 6
    truth_a = np.zeros((30, 60), bool)
    truth_a[5:25, 0:20] = True
    truth_b = np.zeros((30, 60), bool)
    truth_b[5:25, 30:50] = True
    tp, n_truth = match_image(pred, [(4,), (4, 9)], [encode_mask(truth_a), encode_mask(truth_b)])
    assert tp[:, 4].tolist() == [True, False]
    assert tp[:, 9].tolist() == [False, False]  # cell 2 overlaps B (class 9) only at IoU 0.54
    assert n_truth[4] == 2 and n_truth[9] == 1 and n_truth.sum() == 3


def test_label_map_runs_are_the_codec_runs():
    from hpasc.rle import encode_label_map, mask_runs

    labels = np.zeros((7, 9), np.int32)
    labels[1:4, 2:6] = 1
    labels[4:7, 0:3] = 2
    labels[0, 8] = 3
    labels[2, 7:9] = 3  # a cell in two pieces
    runs = label_map_runs(labels)
    for cell, code in encode_label_map(labels).items():
        want = mask_runs(code, 7, 9)
        np.testing.assert_array_equal(runs[cell - 1][0], want[0])
        np.testing.assert_array_equal(runs[cell - 1][1], want[1])


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_fast_map_equals_the_scorer_on_a_written_submission(tmp_path, floor):
    from hpasc.metric import score
    from hpasc.submission import image_prediction_string

    world = build_world(tmp_path, {"a": noisy}, n_images=6, seed=3)
    data = load_cv_data([world["runs"] / "a"], progress=False)
    conf = data.confidences(data.probs[0], alpha=0.7)
    mine, per_class = fast_map(conf, data.truth, floor=floor)
    cells = label_map()
    rows = []
    for i, image_id in enumerate(data.image_ids):
        sel = data.keys["image"].to_numpy() == i
        text = image_prediction_string(cells, conf[sel], data.keys["cell_id"].to_numpy()[sel], floor=floor)
        rows.append((image_id, SIZE, SIZE, text))
    sub = pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])
    ref = score(pd.read_csv(world["truth"], dtype={"ID": str}), sub)
    assert mine == pytest.approx(ref.mAP, abs=1e-6)
    for c in range(NUM_CLASSES):
        if ref.per_class_ap[c] is None:
            assert np.isnan(per_class[c])
        else:
            assert per_class[c] == pytest.approx(ref.per_class_ap[c], abs=1e-6)


# --------------------------------------------------------------------------- cross_validate


def test_perfect_predictions_score_one_and_fold_split_is_kept(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, n_images=8, n_folds=2)
    result = cross_validate([world["runs"] / "a" / "fold0", world["runs"] / "a" / "fold1"], progress=False)
    assert result.runs == ["a"] and result.n_images == 8 and result.n_cells == 32
    assert result.comp_map == pytest.approx(1.0)
    present = {c for c in world["cells"].cls}
    for c in range(NUM_CLASSES):
        assert (result.comp_per_class_ap[c] is not None) == (c in present)
    assert set(result.folds) == {0, 1} and all(f["comp_map"] == pytest.approx(1.0) for f in result.folds.values())
    # proxy: targets are image labels, so a cell of another class in a positive image is a "miss" -> < 1
    assert 0 < result.proxy_map <= 1 and result.per_class_ap[1] is None
    table = result.table()
    assert "Nucleoli fibrillar center" in table and "competition mAP 1.0000" in table


def test_without_truth_only_the_proxy(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, with_truth=False)
    result = cross_validate([world["runs"] / "a"], progress=False)
    assert result.comp_map is None and result.comp_per_class_ap is None
    # hand-computed proxy for class c: positives = cells of images labelled c; perfect cells of class c
    # come first, then the rest of the positives tie with the negatives at 0.05
    cells = world["cells"]
    image_has = cells.groupby("ID").cls.apply(set)
    for c in CLASSES:
        pos = cells.ID.map(lambda i: c in image_has[i]).to_numpy()
        hit = (cells.cls == c).to_numpy()
        n_hit, n_pos, n = hit.sum(), pos.sum(), len(cells)
        # step AP: hits first at precision 1, then one tied group of everything else
        expected = n_hit / n_pos * 1.0 + (n_pos - n_hit) / n_pos * (n_pos / n)
        assert result.per_class_ap[c] == pytest.approx(expected)


def test_two_configs_are_aligned_on_common_cells(tmp_path):
    world = build_world(tmp_path, {"a": perfect, "b": noisy})
    groups = group_runs([world["runs"] / "a", world["runs"] / "b" / "fold0", world["runs"] / "b" / "fold1"])
    assert [g.name for g in groups] == ["a", "b"] and list(groups[1].fold_dirs) == [0, 1]
    data = load_cv_data([world["runs"] / "a", world["runs"] / "b"], progress=False)
    assert len(data.probs) == 2 and data.probs[0].shape == data.probs[1].shape == (32, NUM_CLASSES)
    both = cross_validate([world["runs"] / "a", world["runs"] / "b"], weights=[1, 0], progress=False)
    assert both.comp_map == pytest.approx(1.0)
    assert both.members["a"]["comp_map"] == pytest.approx(1.0) and both.members["b"]["comp_map"] < 1
    assert "alone b: proxy_map" in both.table()


def test_cells_missing_from_one_run_are_left_out_with_a_warning(tmp_path):
    world = build_world(tmp_path, {"a": perfect, "b": noisy}, n_images=4)
    oof = world["runs"] / "b" / "fold1" / "oof.csv"
    pd.read_csv(oof).iloc[1:].to_csv(oof, index=False)
    with pytest.warns(UserWarning, match=r"left out: \{'a': 1\}"):
        data = load_cv_data([world["runs"] / "a", world["runs"] / "b"], progress=False)
    assert len(data.keys) == 15 and data.probs[0].shape == data.probs[1].shape == (15, NUM_CLASSES)


def test_cli_json(tmp_path, capsys):
    from hpasc.cli import main

    world = build_world(tmp_path, {"a": perfect})
    assert main(["cv", str(world["runs"] / "a"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["comp_map"] == pytest.approx(1.0) and len(out["per_class_ap"]) == NUM_CLASSES


# --------------------------------------------------------------------------- bad input


def test_bad_oof_and_run_folders_name_the_file(tmp_path):
    bad = tmp_path / "oof.csv"
    bad.write_text("ID,cell_id,p0\nx,1,0.5\n")
    with pytest.raises(CVError, match=r"oof\.csv: missing column\(s\) p1"):
        read_oof(bad)
    cols = ",".join(f"p{c}" for c in range(NUM_CLASSES))
    bad.write_text(f"ID,cell_id,{cols}\nx,1,{','.join(['nan'] * NUM_CLASSES)}\n")
    with pytest.raises(CVError, match="non-finite probability in row 2"):
        read_oof(bad)
    with pytest.raises(CVError, match="no oof.csv"):
        group_runs([tmp_path / "nothing"])
    (tmp_path / "runs" / "x" / "notafold").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "notafold" / "oof.csv").write_text("")
    with pytest.raises(CVError, match="fold<k>"):
        group_runs([tmp_path / "runs" / "x" / "notafold"])


def test_unreadable_labels_csv_names_the_file(tmp_path):
    from hpasc.cv import read_image_labels

    empty = tmp_path / "labels.csv"
    empty.write_text("")
    with pytest.raises(CVError, match=r"labels\.csv: unreadable CSV"):
        read_image_labels(empty)
    empty.write_text("ID,fold\na,0\n")
    with pytest.raises(CVError, match=r"labels\.csv: expected columns ID,Label"):
        read_image_labels(empty)


def test_oof_cell_beyond_the_label_map_is_an_error(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, n_images=4)
    oof = world["runs"] / "a" / "fold0" / "oof.csv"
    df = pd.read_csv(oof)
    df.loc[0, "cell_id"] = 9
    df.to_csv(oof, index=False)
    with pytest.raises(CVError, match="has 4 cells but the OOF names cell 9"):
        cross_validate([world["runs"] / "a"], progress=False)
    df.loc[0, "cell_id"] = 0
    df.to_csv(oof, index=False)
    with pytest.raises(CVError, match=r"oof\.csv: cell id 0 in row 2 .* is not >= 1"):
        cross_validate([world["runs"] / "a"], progress=False)
