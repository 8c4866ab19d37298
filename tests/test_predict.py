"""Ensemble inference: weights, TTA, the time-budget ladder, robustness to broken images, shards + merge."""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpasc import predict as P
from hpasc.confidence import combine
from hpasc.config import InferenceConfig
from hpasc.predict import chunks, ensemble, runner


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_run) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "tiny", 0, seed=1)
    make_run(root, "tiny", 1, seed=2)
    return root / "tiny"


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("masks")  # shared segmentation cache: each image segmented once


def run_predict(runs, data, out, masks, **kw) -> Path:
    return P.predict([runs], data / "test", data / "sample_submission.csv", out, masks_dir=masks,
                     workers=kw.pop("workers", 1), **kw)


# --------------------------------------------------------------------------- pieces without models

def test_apply_tta_geometry():
    x = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    assert torch.equal(P.apply_tta(x, "hflip")[..., 0], x[..., 2])
    assert torch.equal(P.apply_tta(x, "vflip")[..., 0, :], x[..., 2, :])
    y = P.apply_tta(x, "rot90")
    assert torch.equal(y[0, 0], torch.rot90(x[0, 0]))
    assert torch.equal(P.apply_tta(P.apply_tta(x, "rot90"), "rot270"), x)
    assert torch.equal(P.apply_tta(x, "rot180"), torch.flip(x, dims=(2, 3)))
    # a 3 x 3 grid 0..8: the diagonal mirror swaps 1 and 3, the anti-diagonal one 0 and 8
    grid = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert P.apply_tta(grid, "transpose").flatten().tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert P.apply_tta(grid, "transverse").flatten().tolist() == [8, 5, 2, 7, 4, 1, 6, 3, 0]
    # D4: eight distinct views of an asymmetric crop, each an isometry (the set of values kept)
    from hpasc.tta import D4

    views = {tuple(P.apply_tta(grid, name).flatten().tolist()) for name in D4}
    assert len(views) == 8 and all(sorted(v) == list(range(9)) for v in views)
    with pytest.raises(ValueError, match="TTA"):
        P.apply_tta(x, "zoom")


def _fake_runs(root: Path, layout: dict[str, int]) -> list[Path]:
    for config, n in layout.items():
        for k in range(n):
            d = root / config / f"fold{k}"
            d.mkdir(parents=True)
            (d / "config.yaml").write_text("{}\n")
            (d / "best.pt").write_bytes(b"")
    return P.expand_runs([root / c for c in layout])


def test_weights_file_and_member_weights(tmp_path):
    runs = _fake_runs(tmp_path, {"b0": 2, "r50": 1})
    assert [f"{r.parent.name}/{r.name}" for r in runs] == ["b0/fold0", "b0/fold1", "r50/fold0"]
    # no file: each config weighs the same, its folds share it
    assert ensemble._member_weights(runs, None, "-") == [0.5, 0.5, 1.0]
    path = tmp_path / "w.yaml"
    path.write_text("runs:\n  b0: 0.6\n  r50/fold0: 0.4\nalpha: 0.7\ninference:\n  negative: keep\n")
    weights, overrides = P.read_weights(path)
    assert weights == {"b0": 0.6, "r50/fold0": 0.4} and overrides == {"negative": "keep", "alpha": 0.7}
    assert ensemble._member_weights(runs, weights, str(path)) == [0.3, 0.3, 0.4]
    with pytest.raises(P.PredictError, match="r50/fold0"):
        ensemble._member_weights(runs, {"b0": 1.0}, str(path))
    path.write_text("runs: {b0: -1}\n")
    with pytest.raises(P.PredictError, match="w.yaml.*b0"):
        P.read_weights(path)
    path.write_text("b0: 1\n")
    with pytest.raises(P.PredictError, match="runs"):
        P.read_weights(path)
    with pytest.raises(P.PredictError, match="not a run folder"):
        P.expand_runs([tmp_path / "nothing"])


def test_inference_config_overrides_in_order():
    base = InferenceConfig(alpha=0.5, tta=("none",))
    cfg = P.inference_config(base, {"alpha": 0.7}, ["inference.alpha=0.9", "tta=[none,rot90]"])
    assert cfg.alpha == 0.9 and cfg.tta == ("none", "rot90")
    with pytest.raises(ValueError, match="tta"):
        P.inference_config(base, ["tta=[twist]"])


def test_cpu_threads_leaves_the_reading_threads_their_cores_and_restores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(chunks, "available_cpus", lambda: 8)
    with P.cpu_threads("cpu", 3):
        assert torch.get_num_threads() == 5
    assert torch.get_num_threads() == before
    with P.cpu_threads("cpu", 12):
        assert torch.get_num_threads() == 1
    with P.cpu_threads("cuda", 3):
        assert torch.get_num_threads() == before


def test_parse_shard():
    assert P.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(P.PredictError):
            P.parse_shard(bad)


def test_degradation_ladder():
    ladder = P.degradation_ladder(5, ("none", "hflip"))
    assert [(lv.n_members, lv.tta) for lv in ladder] == [
        (5, ("none", "hflip")), (5, ("none",)), (3, ("none",)), (1, ("none",)), (0, ("none",))]
    assert [lv.n_members for lv in P.degradation_ladder(1, ("none",))] == [1, 0]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_steps_down_when_the_projection_overruns():
    clock = FakeClock()
    budget = P.Budget(100.0, n_images=10, ladder=P.degradation_ladder(4, ("none", "hflip")), clock=clock)
    assert budget.reserve == pytest.approx(5.2)  # min(10, 5 + 0.02 * 10)
    clock.now = 5.0
    budget.tick()  # 5 s/image -> finish at 50 s: fine
    assert budget.level == 0
    clock.now = 30.0
    budget.tick()  # 15 s/image -> 30 + 8 * 15 = 150 > 94.8: step down
    assert budget.level == 1
    clock.now = 32.0
    budget.tick()  # 2 s/image at the new level -> 32 + 7 * 2 = 46: stays
    assert budget.level == 1
    clock.now = 95.0
    budget.tick()  # past the deadline: empty rows for the rest
    assert budget.current.empty


def test_budget_without_limit_never_degrades():
    clock = FakeClock()
    budget = P.Budget(None, 3, P.degradation_ladder(2, ("none",)), clock=clock)
    clock.now = 1e9
    budget.tick(3)
    assert budget.level == 0


def test_image_prediction_string_applies_the_recipe():
    from hpasc.rle import encode_label_map
    from hpasc.submission import image_prediction_string, prediction_string

    labels = np.zeros((8, 8), np.int32)
    labels[1:3, 1:3] = 1
    labels[5:7, 4:8] = 2
    probs = np.zeros((2, 19), np.float32)
    probs[0, 3], probs[1, 3], probs[1, 18] = 0.8, 0.4, 0.5
    cfg = InferenceConfig(recipe="cell_x_image", alpha=1.0, image_agg="max", negative="keep", floor=0.01)
    text = image_prediction_string(labels, combine(probs, cfg), floor=cfg.floor)
    enc = encode_label_map(labels)
    # class 3: 0.8 * 0.8, 0.4 * 0.8; Negative: 0.5 * 0.5 on cell 2
    assert text == f"3 0.64 {enc[1]} 3 0.32 {enc[2]} 18 0.25 {enc[2]}"
    assert text == prediction_string(enc, combine(probs, cfg), [1, 2], 0.01)
    with pytest.raises(ValueError, match="1 rows of probs but 2 cell ids"):
        image_prediction_string(labels, combine(probs[:1], cfg))


def _write_sub(path: Path, rows: list[tuple[str, str]]) -> None:
    pd.DataFrame({"ID": [r[0] for r in rows], "ImageWidth": 8, "ImageHeight": 8,
                  "PredictionString": [r[1] for r in rows]}).to_csv(path, index=False)


def test_merge_without_shard_files_and_its_errors(tmp_path):
    from hpasc.rle import encode_mask

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    triple = f"0 0.5 {encode_mask(mask)}"
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_sub(a, [("x", triple), ("y", "")])
    _write_sub(b, [("x", ""), ("y", triple)])
    out = P.merge(tmp_path / "m.csv", [a, b])
    merged = pd.read_csv(out, keep_default_na=False)
    assert merged["PredictionString"].tolist() == [triple, triple]
    _write_sub(b, [("x", triple), ("y", "")])
    with pytest.raises(P.PredictError, match="already predicted"):
        P.merge(tmp_path / "m.csv", [a, b])
    _write_sub(b, [("z", ""), ("y", "")])
    with pytest.raises(P.PredictError, match="other images"):
        P.merge(tmp_path / "m.csv", [a, b])
    b.write_text("ID,Width\nx,8\n")
    with pytest.raises(P.PredictError, match=r"b\.csv: header is ID,Width"):
        P.merge(tmp_path / "m.csv", [a, b])


def test_merge_keeps_the_cell_file_format_when_a_part_has_no_cells(tmp_path):
    """A shard whose images all failed writes a header-only .cells.csv; the merged file must still be
    byte-identical to a single run's (an empty part once turned the numbers into Python reprs: 1 -> 1.0)."""
    from hpasc.rle import encode_mask

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_sub(a, [("x", f"0 0.5 {encode_mask(mask)}"), ("y", "")])
    _write_sub(b, [("x", ""), ("y", "")])
    header = "ID,cell_id," + ",".join(P.PROB_COLUMNS) + ",border,rel_area\n"
    row = "".join(f"x,{k}," + ",".join(["0.5"] * 19) + f",False,{area}\n" for k, area in ((1, "0.5"), (2, "1")))
    P.cells_path(a).write_text(header + row)
    P.cells_path(b).write_text(header)
    out = P.merge(tmp_path / "m.csv", [a, b])
    assert P.cells_path(out).read_text() == header + row


# --------------------------------------------------------------------------- end to end on synthetic images

def test_predict_writes_a_valid_submission_and_cell_probs(synth_small, runs, masks, tmp_path):
    from hpasc.submission import validate_submission

    stats: dict = {}
    out = run_predict(runs, synth_small, tmp_path / "sub.csv", masks, stats=stats)
    sample = synth_small / "sample_submission.csv"
    assert validate_submission(out, sample) == []
    sub = pd.read_csv(out, keep_default_na=False)
    assert sub["ID"].tolist() == pd.read_csv(sample)["ID"].tolist()
    assert (sub["PredictionString"] != "").all()
    assert stats["failed"] == {} and set(stats["seconds"]) >= {"read", "segment", "crop", "model", "encode"}
    probs = P.load_cell_probs(out)
    assert set(probs) == set(sub["ID"])
    for image_id, text in zip(sub["ID"], sub["PredictionString"]):
        p = probs[image_id]
        assert p.shape[1] == 19 and np.all((p >= 0) & (p <= 1))
        n_masks = len(set(text.split()[2::3]))
        assert n_masks == len(p)  # every cell written (floor 0: all 19 classes of each cell)


def test_stain_negative_raises_negative_of_the_unstained_cells_only(synth_small, runs, masks, tmp_path):
    from hpasc.cells.features import cell_channel_mean
    from hpasc.confidence import relative_stain, stain_negative
    from hpasc.io import read_image
    from hpasc.segmentation import read_masks

    # a model that calls no class (every probability ~0.05), so the dim cells' Negative can rise
    quiet = tmp_path / "runs" / "tiny"
    shutil.copytree(runs, quiet)
    for best in quiet.glob("fold*/best.pt"):
        state = torch.load(best, weights_only=True)
        state["model"]["classifier.bias"].fill_(-3.0)
        state["model"]["classifier.weight"].zero_()
        torch.save(state, best)
    plain = P.load_cell_probs(run_predict(quiet, synth_small, tmp_path / "plain.csv", masks))
    stained = P.load_cell_probs(run_predict(quiet, synth_small, tmp_path / "stain.csv", masks,
                                            inference_overrides=["stain_negative=true"]))
    raised = 0
    for image_id, p in plain.items():
        cells = read_masks(masks, image_id)[0]
        stain = relative_stain(cell_channel_mean(read_image(synth_small / "test", image_id), cells))
        assert np.allclose(stained[image_id], stain_negative(p, stain), atol=1e-6)
        raised += int((stained[image_id][:, 18] > p[:, 18] + 1e-3).sum())
    assert raised > 0  # the synthetic Negative cells have no green: some cells are raised


def test_cli_predict_matches_the_library_and_weights_change_nothing_when_equal(synth_small, runs, masks,
                                                                               tmp_path):
    from hpasc.cli import main

    lib = run_predict(runs, synth_small, tmp_path / "lib.csv", masks)
    weights = tmp_path / "w.yaml"
    weights.write_text("runs:\n  tiny: 1.0\n")
    code = main(["predict", "--runs", str(runs), "--images", str(synth_small / "test"),
                 "--sample-submission", str(synth_small / "sample_submission.csv"),
                 "--out", str(tmp_path / "cli.csv"), "--masks", str(masks), "--workers", "2",
                 "--weights", str(weights)])
    assert code == 0
    assert (tmp_path / "cli.csv").read_text() == lib.read_text()


def test_shard_and_merge_equal_a_single_run(synth_small, runs, masks, tmp_path):
    from hpasc.cli import main

    single = run_predict(runs, synth_small, tmp_path / "single.csv", masks)
    parts = [run_predict(runs, synth_small, tmp_path / f"part{i}.csv", masks, shard=f"{i}/2") for i in range(2)]
    assert main(["merge", str(tmp_path / "merged.csv"), *map(str, parts)]) == 0
    assert (tmp_path / "merged.csv").read_text() == single.read_text()
    assert P.cells_path(tmp_path / "merged.csv").read_text() == P.cells_path(single).read_text()
    with pytest.raises(P.PredictError, match="missing"):
        P.merge(tmp_path / "bad.csv", parts[:1])


def _broken_copy(src: Path, dst: Path) -> list[str]:
    """The synthetic test set plus four broken images; returns their IDs."""
    shutil.copytree(src / "test", dst / "test")
    sample = pd.read_csv(src / "sample_submission.csv")
    template = sample.iloc[0]
    img = template.ID
    names = ["missing_channel", "truncated", "all_black", "tiny64"]
    for name in names:
        for color in ("red", "green", "blue", "yellow"):
            shutil.copy(dst / "test" / f"{img}_{color}.png", dst / "test" / f"{name}_{color}.png")
    (dst / "test" / "missing_channel_yellow.png").unlink()
    data = (dst / "test" / "truncated_green.png").read_bytes()
    (dst / "test" / "truncated_green.png").write_bytes(data[: len(data) // 3])
    from hpasc.io import write_image

    h, w = int(template.ImageHeight), int(template.ImageWidth)
    write_image(dst / "test", "all_black", np.zeros((h, w, 4), np.float32))
    rng = np.random.default_rng(0)
    write_image(dst / "test", "tiny64", rng.random((64, 64, 4)).astype(np.float32))
    extra = pd.DataFrame({"ID": names, "ImageWidth": [w, w, w, 64], "ImageHeight": [h, h, h, 64],
                          "PredictionString": template.PredictionString})
    pd.concat([sample, extra]).to_csv(dst / "sample_submission.csv", index=False)
    return names


def test_broken_images_cost_only_their_own_row(synth_small, runs, tmp_path, caplog):
    from hpasc.submission import validate_submission

    names = _broken_copy(synth_small, tmp_path)
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="hpasc.predict"):
        out = run_predict(runs, tmp_path, tmp_path / "sub.csv", None, stats=stats, workers=2)
    assert validate_submission(out, tmp_path / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False).set_index("ID")
    assert len(sub) == 3 + len(names)
    for name in ("missing_channel", "truncated", "all_black"):
        assert sub.loc[name, "PredictionString"] == ""
        assert name in stats["failed"]
        assert any(name in r.getMessage() for r in caplog.records)
    assert "missing channel" in stats["failed"]["missing_channel"]
    assert "no cells" in stats["failed"]["all_black"]
    assert (sub.drop(index=names)["PredictionString"] != "").all()  # the good images are untouched


def test_nan_from_a_model_costs_only_that_image(synth_small, runs, masks, tmp_path, monkeypatch, caplog):
    real = P.predict_chunk
    calls = []

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        if not calls:
            out.probs[0] = np.nan  # the first cell of the first image
        calls.append(1)
        return out

    monkeypatch.setattr(runner, "predict_chunk", poisoned)
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="hpasc.predict"):
        out = run_predict(runs, synth_small, tmp_path / "sub.csv", masks, stats=stats)
    sub = pd.read_csv(out, keep_default_na=False)
    first = sub["ID"].iloc[0]
    assert sub["PredictionString"].iloc[0] == "" and (sub["PredictionString"].iloc[1:] != "").all()
    assert "NaN" in stats["failed"][first] and len(stats["failed"]) == 1
    assert any(first in r.getMessage() for r in caplog.records)


def test_a_model_exception_costs_only_the_images_of_its_chunk(synth_small, runs, masks, tmp_path,
                                                              monkeypatch):
    real = P.predict_chunk
    calls = []

    def broken(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "predict_chunk", broken)
    stats: dict = {}
    out = run_predict(runs, synth_small, tmp_path / "sub.csv", masks, stats=stats,
                      inference_overrides=["batch_size=8"])  # the first chunk holds only image 0
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(stats["failed"]) == [sub["ID"].iloc[0]] and "out of memory" in stats["failed"][sub["ID"].iloc[0]]
    assert (sub["PredictionString"].iloc[1:] != "").all()


def test_zero_time_budget_still_writes_a_complete_valid_file(synth_small, runs, masks, tmp_path):
    from hpasc.submission import validate_submission

    stats: dict = {}
    out = run_predict(runs, synth_small, tmp_path / "sub.csv", masks, time_budget=0.0, stats=stats)
    assert validate_submission(out, synth_small / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False)
    assert len(sub) == 3 and (sub["PredictionString"] == "").all()
    assert P.Level(0, ("none",)) == P.degradation_ladder(2, ("none", "hflip"))[stats["level"]]


def test_image_head_recipe_uses_the_heads_pooled_over_all_cells_of_an_image(synth_small, masks, tmp_path,
                                                                             make_run):
    """image_agg: head — an image's cells span several chunks (batch 8), yet its image probability is the
    head applied to the mean features of all its cells, as one forward over the whole image gives."""
    from hpasc.models import load_run

    run = make_run(tmp_path / "runs", "head", 0, seed=3, **{"model.image_head": True,
                                                            "inference.tta": ["none"]})
    out = run_predict(run, synth_small, tmp_path / "sub.csv", masks,
                      inference_overrides=["image_agg=head", "batch_size=8", "alpha=1.0", "negative=keep"])
    sub = pd.read_csv(out, keep_default_na=False)
    image_id = sub["ID"].iloc[0]
    cfg, model = load_run(run)
    prep = P.prepare_image(synth_small / "test", image_id, (int(sub.ImageHeight[0]), int(sub.ImageWidth[0])),
                           cfg.segmentation, [cfg.cells], masks)
    x = P.CropTensors()(prep.crops[P.crop_key(cfg.cells)], cfg.cells)
    with torch.inference_mode():
        res = model(x, torch.zeros(len(x), dtype=torch.long))
    cell = torch.sigmoid(res["logits"]).numpy()
    image = torch.sigmoid(res["image_logits"][0]).numpy()
    assert prep.n_cells > 8
    np.testing.assert_allclose(P.load_cell_probs(out)[image_id], cell, atol=1e-5)
    tokens = sub["PredictionString"].iloc[0].split()
    written = np.array([float(v) for v in tokens[1::3]]).reshape(prep.n_cells, 19)
    np.testing.assert_allclose(written, cell * image[None, :], atol=1e-5)


def test_an_overrunning_projection_steps_down_the_ladder_and_still_writes_every_row(
        synth_small, runs, masks, tmp_path, monkeypatch, caplog):
    """Every projection overruns: each finished image moves one rung down (2 models x 2 TTA -> 2 x 1
    -> 1 x 1 -> empty rows), and the file is still complete and valid."""
    from hpasc.submission import validate_submission

    monkeypatch.setattr(P.Budget, "projected_finish", lambda self: math.inf if self._level_done else None)
    seen = []
    real = P.predict_chunk

    def spy(members, crops, tta, *args, **kw):
        seen.append((len(members), tuple(tta)))
        return real(members, crops, tta, *args, **kw)

    monkeypatch.setattr(runner, "predict_chunk", spy)
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="hpasc.predict"):
        out = run_predict(runs, synth_small, tmp_path / "sub.csv", masks, time_budget=3600.0, stats=stats,
                          inference_overrides=["batch_size=8"])  # images span chunks of 8 cells
    assert validate_submission(out, synth_small / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False)
    # the 3rd image finishes on the last rung with models; the empty rung comes after it
    assert len(sub) == 3 and (sub["PredictionString"] != "").all() and stats["level"] == 3
    assert seen[0] == (2, ("none", "hflip")) and seen[-1] == (1, ("none",))
    assert set(seen) == {(2, ("none", "hflip")), (2, ("none",)), (1, ("none",))}
    assert sum("time budget" in r.getMessage() for r in caplog.records) == 3
