"""Learning the cells: matching our cells to truth cells, the truth ceiling, pseudo-label targets and
rounds, and the cell-level CV view."""
from __future__ import annotations

import numpy as np
import pytest
from builders import build_world, hand_made_cells, perfect, tiny_cfg

from hpasc import runs
from hpasc.cells.truth import match_label_maps, truth_cell_labels
from hpasc.config import ConfigError, load_config, replace
from hpasc.data import select_cells
from hpasc.labels import NEGATIVE, NUM_CLASSES, multihot_matrix, to_multihot
from hpasc.training.pseudo import PseudoLabelError, pseudo_targets, round_config, round_targets


# --------------------------------------------------------------------------- matching cells to truth

def test_our_cells_match_truth_cells_by_hand_computed_iou():
    ours = np.zeros((4, 4), np.int32)
    ours[:, :2] = 1  # 8 px
    ours[:, 2:] = 2  # 8 px
    truth = np.zeros((4, 4), np.int32)
    truth[:, :3] = 1  # 12 px: 8 shared with our cell 1, 4 with cell 2
    # our cell 1: IoU 8 / 12 with truth cell 1; our cell 2: 4 / 16; background never matches
    mine, theirs, values = match_label_maps(ours, truth, 0.5)
    assert mine.tolist() == [1] and theirs.tolist() == [1] and values[0] == pytest.approx(2 / 3)
    assert match_label_maps(ours, truth, 0.2)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="shape"):
        match_label_maps(ours, truth[:3])
    with pytest.raises(ValueError, match="min_iou"):
        match_label_maps(ours, truth, 0.0)


def test_truth_cell_labels_recovers_every_cell(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, n_images=4)
    found = truth_cell_labels(world["truth"], world["work"] / "masks" / "train")
    expected = world["cells"].assign(truth_label=lambda d: d.cls.astype(str))
    merged = expected.merge(found, on=["ID", "cell_id"], suffixes=("", "_found"))
    assert len(found) == len(expected) == len(merged)
    assert (merged.truth_label == merged.truth_label_found).all()
    assert np.allclose(found.truth_iou, 1.0)
    only = truth_cell_labels(world["truth"], world["work"] / "masks" / "train", ids=[world["ids"][1]])
    assert set(only.ID) == {world["ids"][1]} and len(only) == 4


def test_selection_truth_takes_the_true_labels_and_needs_them():
    _, table = hand_made_cells(n_images=3, cells=2)
    with pytest.raises(ValueError, match="data.truth_csv"):
        select_cells(table, "truth")
    table["truth_label"] = ["0", None, "13|14", "18", None, "5"]
    rows, targets = select_cells(table, "truth")
    assert rows.tolist() == [0, 2, 3, 5]
    assert np.array_equal(targets, multihot_matrix(["0", "13|14", "18", "5"]))


# --------------------------------------------------------------------------- pseudo-label targets

def _one_image():
    # one image labelled {0, 3}: three cells; class 5 is predicted but not an image label
    probs = np.zeros((3, NUM_CLASSES))
    probs[:, 0] = [0.8, 0.2, 0.1]
    probs[:, 3] = [0.2, 0.3, 0.15]
    probs[:, 5] = 0.9
    labels = np.tile(to_multihot((0, 3)), (3, 1))
    return probs, labels, np.array(["a", "a", "a"])


def test_pseudo_targets_are_restricted_scaled_and_negative():
    probs, labels, ids = _one_image()
    t = pseudo_targets(probs, labels, ids)
    assert np.allclose(t[:, 0], [1.0, 0.25, 0.125])  # divided by the image's best cell (0.8)
    assert np.allclose(t[:, 3], [2 / 3, 1.0, 0.5])  # by 0.3
    assert np.allclose(t[:, 5], 0.0)  # not an image label: absent whatever the model says
    assert np.allclose(t[:, NEGATIVE], [0.0, 0.0, 0.5])  # 1 - the cell's largest label target
    raw = pseudo_targets(probs, labels, ids, scale="raw", negative=False)
    assert np.allclose(raw[:, 0], [0.8, 0.2, 0.1]) and np.allclose(raw[:, NEGATIVE], 0.0)
    sharp = pseudo_targets(probs, labels, ids, power=2.0)
    assert np.allclose(sharp[:, 0], [1.0, 0.0625, 0.015625])
    mixed = pseudo_targets(probs, labels, ids, weight=0.5)
    assert np.allclose(mixed[:, 0], [1.0, 0.625, 0.5625]) and np.allclose(mixed[:, NEGATIVE], [0, 0, 0.25])


def test_pseudo_targets_keep_negative_images_negative_and_images_apart():
    probs = np.full((4, NUM_CLASSES), 0.5)
    probs[:, 0] = [0.6, 0.3, 0.9, 0.9]
    labels = np.stack([to_multihot((0,)), to_multihot((0,)), to_multihot((NEGATIVE,)), to_multihot((NEGATIVE,))])
    t = pseudo_targets(probs, labels, np.array(["p", "p", "n", "n"]))
    assert np.allclose(t[:2, 0], [1.0, 0.5])  # scaled within image p only
    assert np.allclose(t[2:, 0], 0.0) and np.allclose(t[2:, NEGATIVE], 1.0)
    with pytest.raises(ValueError, match="same"):
        pseudo_targets(probs[:3], labels, np.array(["p", "p", "n", "n"]))
    with pytest.raises(ValueError, match="pseudo.scale"):
        pseudo_targets(probs, labels, np.array(["p"] * 4), scale="softmax")


def test_round_targets_use_the_previous_round_and_fall_back_to_image_labels(tmp_path):
    _, table = hand_made_cells(n_images=6, cells=2)
    cfg = tiny_cfg(tmp_path, "pseudo.rounds=1", "train.folds=[0,1,2]")
    rows = table.index.to_numpy()
    image_targets = multihot_matrix(table.Label)
    with pytest.raises(PseudoLabelError, match="round 0"):
        round_targets(cfg, 1, table, rows, image_targets)
    # round 0 trained fold 0 only: its OOF covers the images of fold 0
    val = table[table.fold == 0]
    probs = np.full((len(val), NUM_CLASSES), 0.2)
    runs.write_oof(runs.run_dir(cfg, 0) / runs.OOF_FILE, val.ID, val.cell_id, probs)
    got = round_targets(cfg, 1, table, rows, image_targets)
    covered = (table.fold == 0).to_numpy()
    assert got.covered == covered.sum() > 0
    assert np.array_equal(got.targets[~covered], image_targets[~covered])
    expected = pseudo_targets(probs, image_targets[covered], val.ID.to_numpy())
    assert np.allclose(got.targets[covered], expected)


def test_rounds_have_their_own_folders_and_groups(tmp_path):
    cfg = tiny_cfg(tmp_path, "pseudo.rounds=2")
    assert runs.run_dir(cfg, 3) == tmp_path / "runs" / "hand" / "fold3"
    second = runs.run_dir(cfg, 3, 2)
    assert second == tmp_path / "runs" / "hand" / "round2" / "fold3"
    assert runs.round_of(second) == 2 and runs.round_of(runs.run_dir(cfg, 3)) == 0
    assert runs.group_name(second) == "hand/round2" and runs.group_name(runs.run_dir(cfg, 3)) == "hand"
    with pytest.raises(ConfigError, match="pseudo.scale"):
        load_config(None, ["pseudo.scale=softmax"])
    with pytest.raises(ConfigError, match="pseudo.weight"):
        load_config(None, ["pseudo.weight=1.5"])


def test_a_round_takes_its_epochs_lr_and_the_previous_rounds_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, "pseudo.rounds=2", "train.epochs=12", "train.lr=0.006", "pseudo.epochs=4",
                   "pseudo.lr=0.002", "pseudo.init=previous")
    assert round_config(cfg, 1, 0) is cfg  # round 0 is the config itself
    with pytest.raises(PseudoLabelError, match="round 1's weights .*round1/fold1/best.pt does not exist"):
        round_config(cfg, 1, 2)
    best = runs.run_dir(cfg, 1, 1) / runs.BEST_FILE
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    second = round_config(cfg, 1, 2)
    assert (second.train.epochs, second.train.lr, second.model.pretrained) == (4, 0.002, str(best))
    assert (second.pseudo, second.data) == (cfg.pseudo, cfg.data)
    plain = tiny_cfg(tmp_path, "pseudo.rounds=1")
    assert round_config(plain, 1, 1) == plain  # nothing set: a round from scratch, like round 0
    with pytest.raises(ConfigError, match="pseudo.init: unknown choice .warm.; choices: scratch \\| previous"):
        load_config(None, ["pseudo.init=warm"])
    with pytest.raises(ConfigError, match="pseudo.epochs"):
        load_config(None, ["pseudo.epochs=0"])


def test_train_rejects_a_round_the_config_does_not_have(tmp_path):
    from hpasc.train import train_folds

    with pytest.raises(ConfigError, match="rounds 0..1"):
        train_folds(tiny_cfg(tmp_path, "pseudo.rounds=1"), [0], rounds=[2])


@pytest.mark.slow
def test_a_pseudo_label_round_trains_from_round_zero(tmp_path, one_torch_thread):
    """Round 0 on fold 0 and 1, then round 1 of fold 0 learns from their OOF cells."""
    from builders import hand_made_fold

    from hpasc.train import train_on
    from hpasc.training.fold_data import FoldData

    cfg = tiny_cfg(tmp_path, "pseudo.rounds=1", "train.epochs=1", "train.folds=[0,1,2]")
    for k in (0, 1, 2):
        train_on(cfg, hand_made_fold(k), runs.run_dir(cfg, k))
    base = hand_made_fold(0)
    got = round_targets(cfg, 1, base.table, base.train_rows, base.train_targets)
    assert got.covered == len(base.train_rows)
    data = FoldData(base.crops, base.table, base.train_rows, got.targets, base.val_rows, base.val_targets,
                    base.masks_dir, base.images_dir)
    out = train_on(cfg, data, runs.run_dir(cfg, 0, 1))
    assert out == tmp_path / "runs" / "hand" / "round1" / "fold0"
    assert (out / runs.OOF_FILE).is_file() and (out / runs.BEST_FILE).is_file()
    # a warm round at learning rate 0 keeps round 0's weights: it started from them
    import torch

    warm_cfg = replace(cfg, **{"pseudo.init": "previous", "pseudo.lr": 0.0})
    warm = round_config(warm_cfg, 0, 1)
    assert warm.model.pretrained == str(runs.run_dir(cfg, 0) / runs.BEST_FILE)
    out = train_on(warm, data, tmp_path / "warm" / "fold0")
    before = torch.load(runs.run_dir(cfg, 0) / runs.BEST_FILE, weights_only=True)["model"]
    after = torch.load(out / runs.BEST_FILE, weights_only=True)["model"]
    convs = [k for k, v in before.items() if v.ndim == 4]
    assert convs and all(torch.equal(before[k], after[k]) for k in convs)


# --------------------------------------------------------------------------- the cell-level CV view

def test_cv_reports_the_cell_level_view(tmp_path):
    from hpasc.cv import cross_validate

    world = build_world(tmp_path, {"good": perfect, "blind": lambda onehot, rng: rng.uniform(0, 1, NUM_CLASSES)},
                        n_images=16)
    good = cross_validate([world["runs"] / "good"], progress=False)
    assert good.oracle_map == pytest.approx(1.0)
    assert good.cell_auc["within"] == pytest.approx(1.0) and good.cell_auc["mean"] == pytest.approx(1.0)
    assert "cell AUC within images 1.0000" in good.table()
    blind = cross_validate([world["runs"] / "blind"], progress=False)
    assert blind.oracle_map == pytest.approx(1.0)  # the ceiling is the segmentation's, not the model's
    assert 0.25 < blind.cell_auc["mean"] < 0.75 and 0.2 < blind.cell_auc["within"] < 0.8
    assert cross_validate([world["runs"] / "good"], use_truth=False, progress=False).cell_auc is None


def test_cv_keeps_rounds_apart(tmp_path):
    from hpasc.cv import group_runs

    world = build_world(tmp_path, {"cfg": perfect}, n_images=4)
    round1 = world["runs"] / "cfg" / "round1"
    for k in (0, 1):
        src = world["runs"] / "cfg" / f"fold{k}"
        dst = round1 / f"fold{k}"
        dst.mkdir(parents=True)
        for name in ("config.yaml", "oof.csv", "log.csv"):
            (dst / name).write_bytes((src / name).read_bytes())
    groups = {g.name: sorted(g.fold_dirs) for g in group_runs([world["runs"]])}
    assert groups == {"cfg": [0, 1], "cfg/round1": [0, 1]}


def test_fold_tables_get_the_truth_labels_of_their_cells(tmp_path):
    from hpasc.config import replace
    from hpasc.training.fold_data import TrainDataError, with_truth_labels

    world = build_world(tmp_path, {"a": perfect}, n_images=4)
    table = world["cells"][["ID", "cell_id"]].copy()
    table.index = table.index + 100  # crop rows are the index: they must survive
    cfg = tiny_cfg(tmp_path, "cells.selection=truth")
    with pytest.raises(TrainDataError, match="data.truth_csv"):
        with_truth_labels(cfg, table, world["work"] / "masks" / "train")
    cfg = replace(cfg, **{"data.truth_csv": str(world["truth"])})
    got = with_truth_labels(cfg, table, world["work"] / "masks" / "train")
    assert list(got.index) == list(table.index)
    assert got["truth_label"].tolist() == world["cells"]["cls"].astype(str).tolist()
