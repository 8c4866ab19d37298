"""Competition metric: one hand-computed case per rule, the run-based IoU against pixels, the proxy."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hpasc.cli import main
from hpasc.labels import CLASS_NAMES
from hpasc.metric import (
    ScoreError,
    average_precision,
    cell_proxy_scores,
    intersection_table,
    read_truth,
    score,
)
from hpasc.rle import encode_label_map, encode_mask, mask_runs
from hpasc.submission import write_submission

W = 100  # images are 1 x W strips: a mask is an interval [a, b) of columns, IoUs are easy by hand


def seg(a: int, b: int, width: int = W) -> str:
    mask = np.zeros((1, width), bool)
    mask[0, a:b] = True
    return encode_mask(mask)


A, B, C = seg(0, 10), seg(20, 30), seg(40, 50)


def truth(*images, width: int = W) -> pd.DataFrame:
    """images: (ID, [(labels, mask), ...])"""
    rows = [(i, width, 1, " ".join(f"{lab} {m}" for lab, m in cells)) for i, cells in images]
    return pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])


def sub(*images, width: int = W) -> pd.DataFrame:
    """images: (ID, [(class, confidence, mask), ...])"""
    rows = [(i, width, 1, " ".join(f"{c} {p} {m}" for c, p, m in preds)) for i, preds in images]
    return pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"])


def test_average_precision_by_hand():
    assert average_precision(np.array([1, 0, 1, 0], bool), 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(np.array([0, 1], bool), 1) == pytest.approx(0.5)
    assert average_precision(np.zeros(0, bool), 2) == 0.0
    assert average_precision(np.array([1], bool), 0) is None


def test_perfect():
    t = truth(("i1", [("0|16", A), ("5", B)]), ("i2", [("0", C)]))
    s = sub(("i1", [(0, 0.9, A), (16, 0.8, A), (5, 0.7, B)]), ("i2", [(0, 0.6, C)]))
    r = score(t, s)
    assert r.mAP == 1.0
    assert {c for c, ap in r.per_class_ap.items() if ap is not None} == {0, 5, 16}
    assert r.per_class_ap[0] == r.per_class_ap[5] == r.per_class_ap[16] == 1.0
    assert r.per_class_ap[1] is None
    assert r.n_truth[0] == 2 and r.n_tp[0] == 2


def test_empty_submission_scores_zero():
    t = truth(("i1", [("0", A), ("3", B)]))
    r = score(t, sub(("i1", [])))
    assert r.mAP == 0.0 and r.per_class_ap[0] == 0.0 and r.per_class_ap[3] == 0.0


def test_duplicates_give_one_tp_and_fps():
    t = truth(("i1", [("0", A), ("0", B)]))
    # A twice (0.9 TP, 0.8 FP), then B (0.7 TP): precision 1, 1/2, 2/3 -> AP = (1 + 2/3) / 2
    r = score(t, sub(("i1", [(0, 0.9, A), (0, 0.8, A), (0, 0.7, B)])))
    assert r.per_class_ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert r.n_tp[0] == 2 and r.n_pred[0] == 3


def test_no_fallback_to_second_best_cell():
    # truth cells may overlap: A = [0,10), A' = [0,9). The second prediction overlaps A best (already
    # matched) and is a FP although its IoU with A' is 0.9.
    t = truth(("i1", [("0", A), ("0", seg(0, 9))]))
    r = score(t, sub(("i1", [(0, 0.9, A), (0, 0.8, A)])))
    assert r.per_class_ap[0] == pytest.approx(0.5)  # ranks TP, FP; recall ends at 1/2


def test_best_overlap_first_cell_on_ties():
    t = truth(("i1", [("0", A), ("0", A)]))  # two truth cells with the same mask
    r = score(t, sub(("i1", [(0, 0.9, A), (0, 0.8, A)])))
    assert r.n_tp[0] == 1 and r.per_class_ap[0] == pytest.approx(0.5)


def test_iou_exactly_threshold_matches_and_just_below_does_not():
    t = truth(("i1", [("0", A)]))
    assert score(t, sub(("i1", [(0, 0.5, seg(0, 6))]))).mAP == 1.0  # 6 / 10 = 0.6
    assert score(t, sub(("i1", [(0, 0.5, seg(0, 17))]))).mAP == 0.0  # 10 / 17 = 0.588
    n = 100_000
    t_big = truth(("i1", [("0", seg(0, n, n))]), width=n)
    just_below = sub(("i1", [(0, 0.5, seg(0, 59_999, n))]), width=n)  # IoU 0.59999
    exact = sub(("i1", [(0, 0.5, seg(0, 60_000, n))]), width=n)
    assert score(t_big, just_below).mAP == 0.0
    assert score(t_big, exact).mAP == 1.0


def test_multilabel_partial():
    t = truth(("i1", [("0|16", A), ("0", B)]))
    r = score(t, sub(("i1", [(0, 0.9, A), (0, 0.8, B)])))
    assert r.per_class_ap[0] == 1.0 and r.per_class_ap[16] == 0.0
    assert r.mAP == pytest.approx(0.5)


def test_missing_and_extra_images():
    t = truth(("i1", [("0", A)]), ("i2", [("0", B)]))
    s = sub(("i1", [(0, 0.9, A)]), ("x9", [(0, 0.99, C)]))  # i2 missing, x9 not in the truth
    r = score(t, s)
    assert r.per_class_ap[0] == pytest.approx(0.5) and r.n_pred[0] == 1


def test_absent_class_predictions_under_both_rules():
    t = truth(("i1", [("0", A)]), ("i2", [("5", B)]))
    s = sub(("i1", [(0, 0.5, A), (5, 0.9, A)]), ("i2", [(5, 0.8, B)]))
    gt = score(t, s, verified="gt")
    assert gt.per_class_ap[5] == 1.0 and gt.n_pred[5] == 1
    every = score(t, s, verified="all")
    assert every.per_class_ap[5] == pytest.approx(0.5) and every.n_pred[5] == 2  # FP 0.9, TP 0.8
    assert every.mAP == pytest.approx(0.75)
    with pytest.raises(ValueError, match="verified"):
        score(t, s, verified="some")


def test_negative_is_an_ordinary_class():
    t = truth(("i1", [("18", A), ("0", B)]))
    s = sub(("i1", [(18, 0.4, A), (18, 0.9, B), (0, 0.6, B)]))
    r = score(t, s)
    # class 18: B (0.9) does not overlap A -> FP; A (0.4) TP -> AP 1/2
    assert r.per_class_ap[18] == pytest.approx(0.5) and r.per_class_ap[0] == 1.0


def test_ranking_across_images():
    t = truth(("i1", [("0", A), ("0", B)]), ("i2", [("0", C)]))
    s = sub(("i1", [(0, 0.9, A), (0, 0.8, seg(60, 70))]), ("i2", [(0, 0.7, C), (0, 0.6, seg(80, 90))]))
    # TP FP TP FP with 3 truths: precision 1, .5, .667, .5 -> AP = (1 + 2/3) / 3
    assert score(t, s).per_class_ap[0] == pytest.approx((1 + 2 / 3) / 3)


def test_within_image_descending_confidence():
    t = truth(("i1", [("0", A)]))
    # the 0.3 prediction comes first in the row but the 0.9 one is matched first
    assert score(t, sub(("i1", [(0, 0.3, A), (0, 0.9, A)]))).mAP == 1.0


def test_ties_keep_submission_order():
    t = truth(("i1", [("0", A)]), ("i2", [("0", B)]))
    miss, hit = ("i1", [(0, 0.5, C)]), ("i2", [(0, 0.5, B)])
    # truth order is irrelevant; the submission's row order ranks tied confidences
    assert score(t, sub(miss, hit)).per_class_ap[0] == pytest.approx(0.25)  # FP, TP: 1/2 * 1/2
    assert score(t, sub(hit, miss)).per_class_ap[0] == pytest.approx(0.5)  # TP, FP
    # within a row, tied triples keep their order too
    one = truth(("i1", [("0", A)]))
    assert score(one, sub(("i1", [(0, 0.5, C), (0, 0.5, A)]))).mAP == pytest.approx(0.5)
    assert score(one, sub(("i1", [(0, 0.5, A), (0, 0.5, C)]))).mAP == 1.0


def test_empty_masks_are_dropped():
    t = truth(("i1", [("0", A)]))
    empty = seg(0, 0)
    for verified in ("gt", "all"):
        r = score(t, sub(("i1", [(0, 0.99, empty), (3, 0.99, empty), (0, 0.5, A)])), verified=verified)
        assert r.mAP == 1.0 and r.n_pred[0] == 1 and r.n_pred[3] == 0


def test_json_contract():
    r = score(truth(("i1", [("0", A)])), sub(("i1", [(0, 0.9, A)])))
    line = r.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert list(data) == ["mAP", "per_class_ap"]
    assert list(data["per_class_ap"]) == [str(c) for c in range(19)]
    assert data["mAP"] == 1.0 and data["per_class_ap"]["0"] == 1.0 and data["per_class_ap"]["18"] is None


@pytest.mark.parametrize(
    "bad_sub, message",
    [
        (sub(("i1", [(0, 0.9, "garbage")])), "submission i1: mask does not decode"),
        (sub(("i1", [(0, 0.9, seg(0, 5, 50))])), "does not decode at 100x1"),
        (sub(("i1", [(19, 0.9, A)])), "triple 1: class '19' is not an id"),
        (sub(("i1", [(0, "nan", A)])), "not finite"),
        (sub(("i1", [(0, "high", A)])), "confidence 'high' is not a number"),
        (sub(("i1", [])).assign(PredictionString="0 0.5"), "triples"),
        (sub(("i1", []), ("i1", [])), "duplicate"),
    ],
)
def test_score_errors(bad_sub, message):
    with pytest.raises(ScoreError, match=message):
        score(truth(("i1", [("0", A)])), bad_sub)


def test_truth_errors():
    with pytest.raises(ScoreError, match="no cell instances"):
        score(truth(("i1", [])), sub(("i1", [])))
    with pytest.raises(ScoreError, match="truth i1: .*pairs"):
        score(truth(("i1", [("0", A)])).assign(PredictionString="0"), sub(("i1", [])))
    with pytest.raises(ScoreError, match="truth i1: .*outside"):
        score(truth(("i1", [("19", A)])), sub(("i1", [])))


def test_intersections_from_runs_match_pixels():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    labels = np.zeros((h, w), np.int32)
    for i in range(1, 9):
        y, x = rng.integers(0, 30, 2)
        labels[y : y + rng.integers(3, 15), x : x + rng.integers(3, 25)] = i
    truth_masks = [labels == i for i in range(1, 9) if (labels == i).any()]
    truth_runs = [mask_runs(s, h, w) for s in encode_label_map(labels).values()]
    preds = [rng.random((h, w)) < 0.3 for _ in range(5)]  # overlapping, ragged
    preds.append(truth_masks[0])
    pred_runs = [mask_runs(encode_mask(p), h, w) for p in preds]
    expected = np.array([[np.sum(p & t) for t in truth_masks] for p in preds])
    assert np.array_equal(intersection_table(truth_runs, pred_runs), expected)
    # overlapping truth masks take the per-mask path and still agree
    truth_masks.append(preds[0])
    truth_runs.append(pred_runs[0])
    expected = np.array([[np.sum(p & t) for t in truth_masks] for p in preds])
    assert np.array_equal(intersection_table(truth_runs, pred_runs), expected)


def test_files_and_cli(tmp_path, capsys):
    t = truth(("i1", [("0|16", A), ("5", B)]))
    t.to_csv(tmp_path / "truth.csv", index=False)
    rows = {"i1": f"0 0.9 {A} 5 0.8 {C}"}
    write_submission(rows, t, tmp_path / "sub.csv")
    df = read_truth(tmp_path / "truth.csv")
    assert df.ImageWidth.tolist() == [W]
    r = score(tmp_path / "truth.csv", tmp_path / "sub.csv")
    assert r.per_class_ap[0] == 1.0 and r.per_class_ap[5] == 0.0 and r.per_class_ap[16] == 0.0

    assert main(["score", str(tmp_path / "truth.csv"), str(tmp_path / "sub.csv"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mAP"] == pytest.approx(1 / 3)
    assert main(["score", str(tmp_path / "truth.csv"), str(tmp_path / "sub.csv"), "--verified", "all"]) == 0
    out = capsys.readouterr().out
    assert CLASS_NAMES[16] in out and "mAP 0.3333" in out
    (tmp_path / "bad.csv").write_text("ID,Width\n")
    assert main(["score", str(tmp_path / "truth.csv"), str(tmp_path / "bad.csv")]) == 2
    assert "header" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# cell-level proxy


def test_proxy_by_hand():
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.4]])
    out = cell_proxy_scores(targets, probs)
    assert out["ap"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["auc"][0] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered right
    assert out["ap"][1] is None and out["auc"][1] is None
    assert out["mAP"] == out["ap"][0] and out["n_pos"] == {0: 2, 1: 0}
    ties = cell_proxy_scores(np.array([[1], [0]]), np.array([[0.5], [0.5]]))
    assert ties["ap"][0] == pytest.approx(0.5) and ties["auc"][0] == pytest.approx(0.5)
    only_pos = cell_proxy_scores(np.ones((3, 1)), np.array([[0.1], [0.2], [0.3]]))
    assert only_pos["ap"][0] == 1.0 and only_pos["auc"][0] is None and only_pos["mAUC"] is None


def test_proxy_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 19)) < 0.2).astype(np.float32)
    probs = np.round(rng.random((300, 19)) * 0.5 + targets * 0.3, 2)  # rounded: many ties
    out = cell_proxy_scores(targets, probs)
    for c in range(19):
        assert out["ap"][c] == pytest.approx(metrics.average_precision_score(targets[:, c], probs[:, c]))
        assert out["auc"][c] == pytest.approx(metrics.roc_auc_score(targets[:, c], probs[:, c]))


def test_proxy_bad_input():
    with pytest.raises(ValueError, match="shape"):
        cell_proxy_scores(np.zeros((3, 19)), np.zeros((3, 18)))
    with pytest.raises(ValueError, match="NaN"):
        cell_proxy_scores(np.zeros((1, 2)), np.array([[np.nan, 0.0]]))


def test_nan_prediction_strings_from_plain_read_csv(tmp_path):
    t = truth(("i1", [("0", A)]), ("i2", [("0", B)]))
    write_submission({"i1": f"0 0.9 {A}"}, t, tmp_path / "sub.csv")
    plain = pd.read_csv(tmp_path / "sub.csv")  # the empty row of i2 becomes NaN
    assert score(t, plain).per_class_ap[0] == pytest.approx(0.5)


@pytest.mark.real_data
def test_real_cellmask_shifted_predictions_match_pixel_iou(real_hpa):
    import cv2

    from hpasc.submission import image_prediction_string

    image_id = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"
    labels = cv2.imread(str(real_hpa / "sample" / f"{image_id}_cellmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int64)
    h, w = labels.shape
    t = pd.DataFrame(
        [(image_id, w, h, " ".join(f"0|7 {m}" for m in encode_label_map(labels).values()))],
        columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"],
    )
    perfect = t.assign(PredictionString=image_prediction_string(labels, np.eye(19)[[0] * labels.max()]))
    assert score(t, perfect).per_class_ap[0] == 1.0
    shifted = np.roll(labels, 70, axis=1)
    ids = np.unique(shifted[shifted > 0])
    probs = np.zeros((len(ids), 19))
    probs[:, 0] = np.linspace(0.9, 0.1, len(ids))
    s = t.assign(PredictionString=image_prediction_string(shifted, probs, ids))
    # reference: pixel joint histogram; shifted cell i can only be matched to truth cell i here
    n = int(labels.max()) + 1
    joint = np.bincount((shifted * n + labels).ravel(), minlength=n * n).reshape(n, n)
    areas_p, areas_t = joint.sum(1), joint.sum(0)
    iou = np.diag(joint)[1:] / (areas_p[1:] + areas_t[1:] - np.diag(joint)[1:])
    best_is_self = all(np.argmax(joint[i, 1:]) + 1 == i for i in ids if joint[i, 1:].any())
    assert best_is_self
    r = score(t, s)
    assert r.n_tp[0] == int((iou[ids - 1] >= 0.6).sum()) and 0 < r.n_tp[0] < len(ids)


# ---------------------------------------------------------------------------------------------------
# against a plain reference: full-size pycocotools masks, pixel IoU, the VOC-style AP formula


def _reference_map(truth_df: pd.DataFrame, sub_df: pd.DataFrame, verified: str) -> float:
    from pycocotools import mask as coco_mask

    from hpasc.rle import counts_bytes

    def full(s, h, w):
        return coco_mask.decode({"size": [h, w], "counts": counts_bytes(s)}).astype(bool)

    preds = {c: [] for c in range(19)}  # (confidence, is_tp) in submission order
    n_gt = np.zeros(19, int)
    truth_rows = {r.ID: r for r in truth_df.itertuples()}
    for r in truth_df.itertuples():
        for lab in r.PredictionString.split()[0::2]:
            for c in map(int, lab.split("|")):
                n_gt[c] += 1
    for r in sub_df.itertuples():
        if r.ID not in truth_rows:
            continue
        t = truth_rows[r.ID]
        h, w = t.ImageHeight, t.ImageWidth
        tt = t.PredictionString.split()
        t_masks = [full(s, h, w) for s in tt[1::2]]
        t_labels = [set(map(int, lab.split("|"))) for lab in tt[0::2]]
        tok = r.PredictionString.split()
        triples = [(int(c), float(p), full(m, h, w)) for c, p, m in zip(tok[0::3], tok[1::3], tok[2::3])]
        for c in range(19):
            mine = [(p, m) for cc, p, m in triples if cc == c and m.any()]
            cells = [m for m, lab in zip(t_masks, t_labels) if c in lab]
            if not cells and verified == "gt":
                continue
            order = sorted(range(len(mine)), key=lambda i: -mine[i][0])  # sorted() is stable
            matched = [False] * len(cells)
            for i in order:
                p, m = mine[i]
                ious = [np.float32((m & g).sum()) / np.float32((m | g).sum()) for g in cells]
                tp = False
                if ious:
                    b = int(np.argmax(ious))
                    if ious[b] >= np.float32(0.6) and not matched[b]:
                        matched[b] = tp = True
                preds[c].append((p, tp))
    aps = []
    for c in range(19):
        if n_gt[c] == 0:
            continue
        ranked = sorted(preds[c], key=lambda x: -x[0])
        tp = np.array([t for _, t in ranked], float)
        if not len(tp):
            aps.append(0.0)
            continue
        recall = np.concatenate([[0], np.cumsum(tp) / n_gt[c], [1]])
        precision = np.concatenate([[0], np.cumsum(tp) / np.arange(1, len(tp) + 1), [0]])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        idx = np.where(recall[1:] != recall[:-1])[0] + 1
        aps.append(float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx])))
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", range(12))
def test_random_scenarios_match_reference(seed):
    rng = np.random.default_rng(seed)
    truth_rows, sub_rows = [], []
    for i in range(4):
        h, w = (int(v) for v in rng.integers(6, 14, 2))
        labels = np.zeros((h, w), np.int32)
        for cell in range(1, int(rng.integers(0, 5)) + 1):
            y, x = rng.integers(0, max(h, w), 2)
            labels[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = cell
        enc = encode_label_map(labels)
        image_classes = rng.choice([0, 3, 16, 18], size=2, replace=False)
        truth_rows.append((f"i{i}", w, h, " ".join(
            f"{'|'.join(map(str, sorted(rng.choice(image_classes, int(rng.integers(1, 3)), replace=False))))} {m}"
            for m in enc.values())))
        parts = []
        for _ in range(int(rng.integers(0, 12))):
            m = np.zeros((h, w), bool)
            if enc and rng.random() < 0.6:  # a truth cell, sometimes shifted by a pixel
                m = labels == rng.choice(list(enc))
                if rng.random() < 0.4:
                    m = np.roll(m, int(rng.choice([-1, 1])), axis=int(rng.integers(0, 2)))
            elif rng.random() < 0.9:
                y, x = rng.integers(0, max(h, w), 2)
                m[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
            conf = round(float(rng.random()), 1)  # coarse: plenty of ties
            parts.append(f"{rng.choice([0, 3, 16, 18])} {conf} {encode_mask(m)}")
        sub_rows.append((f"i{i}", w, h, " ".join(parts)))
    cols = ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    t, s = pd.DataFrame(truth_rows, columns=cols), pd.DataFrame(sub_rows, columns=cols)
    if not any(r[3] for r in truth_rows):
        pytest.skip("no truth cells drawn")
    s = s.iloc[rng.permutation(len(s))]  # submission order differs from truth order
    for verified in ("gt", "all"):
        assert score(t, s, verified=verified).mAP == pytest.approx(_reference_map(t, s, verified), abs=1e-12)
