"""The synthetic HPA world: geometry, weak-label rules, patterns, files on disk, determinism."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pandas as pd
import pytest

from hpasc.io import read_image
from hpasc.labels import NEGATIVE, parse_label
from hpasc.rle import decode_mask
from hpasc.synthetic import (
    SynthesisError,
    assign_cell_labels,
    generate_image,
    image_label,
    label_combinations,
    make_image,
    synthesize,
)
from hpasc.synthetic.patterns import PAINTERS, CellCtx
from hpasc.synthetic.render import SPINDLE

NUCLEAR = (0, 1, 2, 3, 4, 5)
CYTOPLASMIC = (6, 7, 8, 9, 13, 14, 15, 16, 17)


# --------------------------------------------------------------------------- one image in memory

def test_make_image_shapes_and_ranges():
    image, cells, cell_labels = make_image(0, 128, (0, 16))
    assert image.shape == (128, 128, 4) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert cells.shape == (128, 128) and cells.dtype == np.int32
    ids = np.unique(cells)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(cell_labels) + 1))  # consecutive 1..n
    assert len(cell_labels) >= 3


def test_same_seed_same_image_and_other_seed_differs():
    a = generate_image(7, 96, (2, 7))
    b = generate_image(np.random.default_rng(7), 96, (2, 7))
    c = generate_image(8, 96, (2, 7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.cells, b.cells)
    assert a.cell_labels == b.cell_labels
    assert not np.array_equal(a.image, c.image)


def test_nuclei_sit_inside_their_own_cells():
    img = generate_image(3, 160, (0,))
    inside = img.nuclei > 0
    assert np.array_equal(img.cells[inside], img.nuclei[inside])
    assert set(np.unique(img.nuclei)) == set(np.unique(img.cells))  # one nucleus per cell


@pytest.mark.parametrize("labels", [(0, 16), (14,), (1, 2, 7, 12), (8, 9, 13)])
def test_union_of_cell_labels_is_the_image_label(labels):
    img = generate_image(11, 128, labels)
    assert img.label == labels
    for cl in img.cell_labels:
        assert cl and (set(cl) <= set(labels) or cl == (NEGATIVE,))


def test_zero_heterogeneity_gives_every_cell_the_full_set():
    img = generate_image(5, 128, (0, 16), heterogeneity=0.0)
    assert all(cl == (0, 16) for cl in img.cell_labels)


def test_high_heterogeneity_makes_cells_differ_from_the_image():
    img = generate_image(5, 192, (0, 4, 16), heterogeneity=1.0)
    assert img.label == (0, 4, 16)
    assert any(cl != (0, 4, 16) for cl in img.cell_labels)
    assert any(cl == (NEGATIVE,) for cl in img.cell_labels)


def test_negative_image_has_only_negative_cells():
    img = generate_image(2, 128, (NEGATIVE,))
    assert img.label == (NEGATIVE,)
    assert set(img.cell_labels) == {(NEGATIVE,)}


def test_spindle_only_in_dividing_cells():
    img = generate_image(4, 192, (SPINDLE, 0))
    assert img.mitotic.any() and SPINDLE in img.label
    for cl, mit in zip(img.cell_labels, img.mitotic):
        assert (SPINDLE in cl) == bool(mit)


def test_assign_cell_labels_known_cases_and_errors():
    rng = np.random.default_rng(0)
    mitotic = np.array([False, False, True])
    assert assign_cell_labels(rng, (3,), mitotic, 0.0) == [(3,), (3,), (3,)]
    assert assign_cell_labels(rng, (SPINDLE,), mitotic, 0.0) == [(NEGATIVE,), (NEGATIVE,), (SPINDLE,)]
    assert image_label([(NEGATIVE,), (2,), (0, 2)]) == (0, 2)
    assert image_label([(NEGATIVE,)]) == (NEGATIVE,)
    with pytest.raises(ValueError, match="heterogeneity"):
        assign_cell_labels(rng, (3,), mitotic, 1.5)
    with pytest.raises(ValueError, match="class ids"):
        assign_cell_labels(rng, (19,), mitotic, 0.5)
    with pytest.raises(ValueError, match="size"):
        generate_image(0, 8, (0,))


def _disc_ctx(size: int = 120) -> CellCtx:
    """A round cell of radius 50 with a round nucleus of radius 20, centred in the box."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = np.hypot(yy - size / 2, xx - size / 2)
    cell = r < 50
    s_nuc = (r / 20).astype(np.float32)
    edge = cv2.distanceTransform(cell.astype(np.uint8), cv2.DIST_L2, 3)
    ctx = CellCtx(cell=cell, nucleus=s_nuc < 1, s_nuc=s_nuc, edge=edge, cy=size / 2, cx=size / 2,
                  radius=50.0, nuc_radius=20.0, angle=0.3, mitotic=False,
                  nucleoli=np.array([[size / 2 + 5, size / 2 - 4, 2.5]], np.float32))
    return ctx


def test_every_class_has_a_painter_and_it_paints_where_the_biology_says():
    assert sorted(PAINTERS) == list(range(19))
    ctx = _disc_ctx()
    for cid, painter in PAINTERS.items():
        canvas = painter(ctx, np.random.default_rng(cid)) * ctx.cell
        assert canvas.shape == ctx.shape and np.isfinite(canvas).all()
        total = float(canvas.sum())
        if cid == NEGATIVE:
            assert total == 0.0
            continue
        assert total > 0, f"class {cid} paints nothing"
        in_nucleus = float(canvas[ctx.s_nuc < 1.1].sum()) / total
        if cid in NUCLEAR:
            assert in_nucleus > 0.8, (cid, in_nucleus)
        elif cid in CYTOPLASMIC:
            assert in_nucleus < 0.35, (cid, in_nucleus)


def test_positive_cells_are_greener_than_negative_cells():
    img = generate_image(21, 256, (16,), heterogeneity=1.0)
    green = img.image[..., 1]
    pos = [i for i, cl in enumerate(img.cell_labels, 1) if cl == (16,)]
    neg = [i for i, cl in enumerate(img.cell_labels, 1) if cl == (NEGATIVE,)]
    assert pos and neg
    pos_mean = np.mean([green[(img.cells == i) & (img.nuclei == 0)].mean() for i in pos])
    neg_mean = np.mean([green[(img.cells == i) & (img.nuclei == 0)].mean() for i in neg])
    assert pos_mean > 2.0 * neg_mean


def test_label_table_matches_the_real_frequencies():
    combos, probs = label_combinations()
    assert len(combos) == len(set(combos)) == 372
    assert combos[0] == (0,) and probs[0] == pytest.approx(1551 / 21806)
    assert probs.sum() == pytest.approx(1.0)
    p11 = sum(p for c, p in zip(combos, probs) if SPINDLE in c)
    assert p11 == pytest.approx(78 / 21806)  # rare classes stay rare


@pytest.mark.real_data
def test_label_table_is_the_real_train_csv(real_hpa):
    from hpasc.synthetic.label_table import TABLE, format_label_table

    assert format_label_table(real_hpa / "train.csv").split() == TABLE.split()


# --------------------------------------------------------------------------- the dataset on disk

def test_synth_layout_and_truth_consistency(synth_small):
    train = pd.read_csv(synth_small / "train.csv", dtype=str)
    sample = pd.read_csv(synth_small / "sample_submission.csv")
    truth_train = pd.read_csv(synth_small / "truth" / "train.csv")
    truth_test = pd.read_csv(synth_small / "truth" / "test.csv")
    assert list(train.columns) == ["ID", "Label"] and len(train) == 8
    assert list(sample.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert len(sample) == 3 and (sample.PredictionString == "0 1 eNoLCAgIMAEABJkBdQ==").all()
    assert list(truth_test.ID) == list(sample.ID) and list(truth_train.ID) == list(train.ID)
    labels = dict(zip(train.ID, train.Label))
    for split, truth in (("train", truth_train), ("test", truth_test)):
        for row in truth.itertuples():
            h, w = row.ImageHeight, row.ImageWidth
            assert (h, w) == (256, 256)
            tokens = row.PredictionString.split()
            cell_labels = [parse_label(t) for t in tokens[0::2]]
            masks = [decode_mask(m, h, w) for m in tokens[1::2]]
            assert all(m.any() for m in masks)
            assert int(np.sum(masks, axis=0).max()) == 1  # disjoint
            if split == "train":
                assert parse_label(labels[row.ID]) == image_label(cell_labels)
            for color in ("red", "green", "blue", "yellow"):
                assert (synth_small / split / f"{row.ID}_{color}.png").is_file()


def test_synth_bit_depths_and_reading_back(synth_small):
    train_id = pd.read_csv(synth_small / "train.csv").ID[0]
    test_id = pd.read_csv(synth_small / "sample_submission.csv").ID[0]
    assert cv2.imread(str(synth_small / "train" / f"{train_id}_green.png"), -1).dtype == np.uint8
    assert cv2.imread(str(synth_small / "test" / f"{test_id}_green.png"), -1).dtype == np.uint16
    img = read_image(synth_small / "test", test_id)
    assert img.shape == (256, 256, 4) and img.max() <= 1.0 and img[..., 2].max() > 0.2


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthesize_is_byte_identical_for_a_seed(tmp_path):
    a = synthesize(tmp_path / "a", 2, 1, size=96, seed=5)
    b = synthesize(tmp_path / "b", 2, 1, size=96, seed=5)
    c = synthesize(tmp_path / "c", 2, 1, size=96, seed=6)
    assert _digest(a) == _digest(b)
    assert len(_digest(a)) == 4 * 3 + 4  # 12 PNGs, train.csv, sample_submission.csv, 2 truth files
    assert _digest(a)["train.csv"] != _digest(c)["train.csv"]


def test_synthesize_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="test_bits"):
        synthesize(tmp_path, 1, 1, size=64, test_bits=12)
    with pytest.raises(ValueError, match="heterogeneity"):
        synthesize(tmp_path, 1, 1, size=64, heterogeneity=-0.1)
    with pytest.raises(ValueError, match=">= 0"):
        synthesize(tmp_path, -1, 1, size=64)
    with pytest.raises(SynthesisError, match="at least 32 px, got 31"):
        synthesize(tmp_path / "new", 1, 1, size=31)
    assert not (tmp_path / "new").exists()  # checked before anything is written


def test_rerun_into_the_same_folder_leaves_no_stale_images(tmp_path):
    out = synthesize(tmp_path / "out", 3, 2, size=64, seed=1)
    synthesize(out, 2, 1, size=64, seed=2)  # an earlier synth output is replaced, not added to
    fresh = synthesize(tmp_path / "fresh", 2, 1, size=64, seed=2)
    assert _digest(out) == _digest(fresh)
    assert len(list((out / "train").iterdir())) == 2 * 4 and len(list((out / "test").iterdir())) == 4


def test_foreign_non_empty_folder_needs_overwrite(tmp_path):
    out = tmp_path / "real"
    (out / "train").mkdir(parents=True)
    (out / "train" / "keep_red.png").write_bytes(b"real data")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SynthesisError, match="real: folder is not empty"):
        synthesize(out, 1, 1, size=64, seed=3)
    assert (out / "train" / "keep_red.png").is_file()  # refused before touching anything
    synthesize(out, 1, 1, size=64, seed=3, overwrite=True)
    fresh = synthesize(tmp_path / "fresh", 1, 1, size=64, seed=3)
    assert _digest(out) == {**_digest(fresh), "notes.txt": _digest(out)["notes.txt"]}  # only OUTPUTS replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynthesisError, match="not a folder"):
        synthesize(tmp_path / "file", 1, 1, size=64)


def test_cli_synth_errors_exit_2_without_traceback(tmp_path, capsys):
    from hpasc.cli import main

    assert main(["synth", str(tmp_path / "small"), "--size", "16"]) == 2
    assert "size must be at least 32 px, got 16" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    assert main(["synth", str(tmp_path / "busy"), "--train", "1", "--test", "0", "--size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "busy"), "--train", "1", "--test", "0", "--size", "32",
                 "--overwrite"]) == 0
    assert len(pd.read_csv(tmp_path / "busy" / "train.csv")) == 1


def test_cli_synth(tmp_path):
    from hpasc.cli import main

    assert main(["synth", str(tmp_path), "--train", "1", "--test", "1", "--size", "64",
                 "--test-bits", "8"]) == 0
    test_id = pd.read_csv(tmp_path / "sample_submission.csv").ID[0]
    assert cv2.imread(str(tmp_path / "test" / f"{test_id}_red.png"), -1).dtype == np.uint8


def test_real_test_sides_follow_the_real_frequencies():
    from hpasc.synthetic.world import real_test_side

    rng = np.random.default_rng(0)
    sides = np.array([real_test_side(rng) for _ in range(5590)])  # 10 x the real 559 test images
    counts = {s: int((sides == s).sum()) for s in (1728, 2048, 3072)}
    assert sum(counts.values()) == len(sides)
    assert counts[2048] == pytest.approx(4620, abs=150)
    assert counts[1728] == pytest.approx(680, abs=100) and counts[3072] == pytest.approx(290, abs=70)


@pytest.mark.slow
def test_real_sizes_for_the_test_split(tmp_path):
    synthesize(tmp_path, 0, 1, size=64, seed=1, real_sizes=True)
    sample = pd.read_csv(tmp_path / "sample_submission.csv")
    assert (sample.ImageWidth == 2048).all() and (sample.ImageHeight == 2048).all()  # seed 1 draws 2048
    assert len(pd.read_csv(tmp_path / "train.csv")) == 0
    img = read_image(tmp_path / "test", sample.ID[0])
    assert img.shape == (2048, 2048, 4)
    assert cv2.imread(str(tmp_path / "test" / f"{sample.ID[0]}_blue.png"), -1).dtype == np.uint16


@pytest.mark.slow
def test_class_gallery_png(tmp_path):
    from hpasc.synthetic.gallery import class_gallery

    path = class_gallery(tmp_path / "g.png", size=160, tile=48, columns=5)
    sheet = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert sheet.shape == (4 * 48, 5 * 2 * 48, 3)  # 19 classes + 1 blank tile, green | composite
    assert sheet[:48, 48:96].max() > 100  # the composite of class 0 is not empty


@pytest.mark.slow
def test_workers_do_not_change_the_bytes(tmp_path):
    one = synthesize(tmp_path / "one", 3, 2, size=96, seed=9, workers=1)
    two = synthesize(tmp_path / "two", 3, 2, size=96, seed=9, workers=2)
    assert _digest(one) == _digest(two)
