"""The training loop: schedule, sampler, checkpoints, run folder, resume equivalence, DDP, end to end."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpasc.config import load_config
from hpasc.training.fold_data import TrainDataError, fold_data, read_folds
from hpasc.training.sampling import EpochSampler, SeededItems
from hpasc.training.state import ModelEma, lr_factor, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
from builders import hand_made_cells, hand_made_fold, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")








# --------------------------------------------------------------------------- pieces

def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, min_ratio=0.0) == pytest.approx(0.5)  # half-way down the cosine
    assert lr_factor(100, 100, 10, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_epoch_sampler_order_resume_and_shards():
    s = EpochSampler(10, batch_size=3, seed=5, drop_last=True)
    assert len(s) == 9 and s.batches_per_epoch() == 3
    e0 = [i for _, i in s]
    assert len(set(e0)) == 9 and all(0 <= i < 10 for i in e0)
    assert e0 == [i for _, i in EpochSampler(10, 3, seed=5)]  # a function of (seed, epoch)
    s.set_epoch(1)
    e1 = list(s)
    assert {e for e, _ in e1} == {1} and [i for _, i in e1] != e0
    s.set_epoch(1, start_batch=2)  # resume after two batches: the tail of the same order
    assert list(s) == e1[6:] and len(s) == 3
    r0, r1 = EpochSampler(10, 2, 5, rank=0, world=2), EpochSampler(10, 2, 5, rank=1, world=2)
    a, b = [i for _, i in r0], [i for _, i in r1]
    assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_epoch_sampler_weighted_draws_follow_the_weights():
    s = EpochSampler(4, batch_size=100, seed=0, weights=[0, 0, 1, 3], num_samples=4000)
    counts = np.bincount([i for _, i in s], minlength=4)
    assert counts[0] == counts[1] == 0
    assert counts[3] / counts[2] == pytest.approx(3, rel=0.15)
    with pytest.raises(ValueError, match="weights"):
        EpochSampler(3, 1, 0, weights=[0, 0, 0])


def _runs(values) -> list[tuple[int, int]]:
    """Consecutive runs of equal values as (value, length)."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_epoch_sampler_groups_keep_images_together():
    sizes = {10: 3, 11: 5, 12: 2, 13: 4}
    groups = np.random.default_rng(0).permutation(np.repeat(list(sizes), list(sizes.values())))
    s = EpochSampler(14, batch_size=4, seed=1, groups=groups)  # 14 items, drop_last -> 12 per epoch
    order = [i for _, i in s]
    assert len(order) == 12 and len(set(order)) == 12
    runs = _runs(groups[order])
    assert len({g for g, _ in runs}) == len(runs)  # each image in one piece
    assert all(n == sizes[g] for g, n in runs[:-1]) and runs[-1][1] <= sizes[runs[-1][0]]  # whole, last cut
    s.set_epoch(1)
    e1 = [i for _, i in s]
    assert e1 != order
    s.set_epoch(1, start_batch=1)  # resume: the tail of the same order
    assert [i for _, i in s] == e1[4:]
    # two ranks take consecutive stretches of the one-process order: 14 // 2 = 7 -> 4 items each
    r0, r1 = (EpochSampler(14, 4, 1, rank=r, world=2, groups=groups) for r in (0, 1))
    single = EpochSampler(14, 4, 1, groups=groups, num_samples=8)
    assert [i for _, i in r0] + [i for _, i in r1] == [i for _, i in single]
    # class-balanced draw of whole images (with replacement): zero-weight images never come
    weights = np.where(groups == 11, 0.0, 1.0)
    picked = groups[[i for _, i in EpochSampler(14, 4, 2, weights=weights, groups=groups, num_samples=400)]]
    assert set(picked) == {10, 12, 13}
    assert all(n % sizes[g] == 0 for g, n in _runs(picked)[:-1])  # whole images (repeats may touch)
    with pytest.raises(ValueError, match="group"):
        EpochSampler(14, 4, 1, groups=groups[:5])


def test_image_head_runs_get_batches_of_whole_images(tmp_path):
    from hpasc.training.loop import Trainer

    data = hand_made_fold()  # 6 training images of 6 cells, batches of 8
    ids = data.table["ID"].to_numpy()

    def images_per_batch(cfg) -> list[int]:
        trainer = Trainer(cfg, data, tmp_path / "run")
        trainer.sampler.set_epoch(0)
        return [len(set(ids[b["index"].numpy()])) for b in trainer.loader]

    grouped = images_per_batch(tiny_cfg(tmp_path, "model.image_head=true", "cells.augment=none"))
    # runs of 6 cut into batches of 8: every batch holds the tail of one image and the head of the next
    assert grouped == [2] * 4
    mixed = images_per_batch(tiny_cfg(tmp_path, "cells.augment=none"))
    assert len(mixed) == 4 and sum(mixed) > 12  # random batches spread over ~5 of the 6 images
    # the config decides either way: grouped batches without the head, random ones with it
    assert images_per_batch(tiny_cfg(tmp_path, "train.group_by_image=true", "cells.augment=none")) == [2] * 4
    head_mixed = images_per_batch(tiny_cfg(tmp_path, "model.image_head=true", "train.group_by_image=false",
                                           "cells.augment=none"))
    assert sum(head_mixed) > 12


def test_seeded_items_repeat_their_augmentation():
    from hpasc.config import CellsConfig
    from hpasc.data import CellDataset, build_transform

    crops, _ = hand_made_cells(n_images=1, cells=2)
    ds = SeededItems(CellDataset(crops, transform=build_transform(CellsConfig(size=32, augment="strong"), True)), 7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = ds[(3, 1)]["image"], ds[(3, 1)]["image"], ds[(4, 1)]["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the main process's generators are left alone


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    import random

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_ema_update_hand_computed():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = ModelEma(model, decay=0.9)
    torch.nn.init.constant_(model.weight, 1.0)
    ema.update(model)  # first update: decay min(0.9, 2/11)
    d = 2 / 11
    assert ema.module.weight.item() == pytest.approx(1 - d)


# --------------------------------------------------------------------------- the loop

def test_trainer_learns_and_writes_the_run_folder(tmp_path):
    from hpasc.models import load_run
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.epochs=4", "cells.augment=light")
    data = hand_made_fold()
    run = train_on(cfg, data, tmp_path / "run")
    for name in ("config.yaml", "best.pt", "last.pt", "log.csv", "oof.csv", "curves.png"):
        assert (run / name).is_file(), name
    log = pd.read_csv(run / "log.csv")
    assert list(log.columns) == ["epoch", "lr", "bce", "triplet", "val_loss", "val_map", "val_auc",
                                 "val_comp_map", "seconds"]
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    assert log["val_comp_map"].isna().all()  # no cell truth here
    assert log["bce"].iloc[-1] < log["bce"].iloc[0]
    assert log["val_auc"].iloc[-1] > 0.9  # three patterns anyone can tell apart
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == len(data.val_rows) and list(oof.columns[:2]) == ["ID", "cell_id"]
    assert oof.shape[1] == 21 and oof.iloc[:, 2:].to_numpy().max() <= 1
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == int(log.loc[log["val_map"].idxmax(), "epoch"])
    cfg2, model = load_run(run)
    assert cfg2.model == cfg.model and not model.training


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("augment,mil", [("standard", 0), ("standard_batch", 0), ("standard", 1)])
def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path, augment, mil):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.accum_steps=2", "train.ema=0.9", "train.epochs=2", f"cells.augment={augment}",
                   f"loss.mil_weight={mil}")
    data = hand_made_fold()
    # 36 training cells -> 4 batches of 8 = 2 optimizer steps per epoch
    full = train_on(cfg, data, tmp_path / "full")
    part = train_on(cfg, data, tmp_path / "part", stop_after_steps=3)  # killed in the middle of epoch 2
    state = torch.load(part / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["batch"] == 2 and state["progress"]["step"] == 3
    train_on(cfg, data, part, resume=True)
    a, b = _weights(full / "last.pt"), _weights(part / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(full / "last.pt", weights_only=True)["ema"]
    ema_b = torch.load(part / "last.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    if mil:  # the stored logits of every training cell come back too
        bank_a = torch.load(full / "last.pt", weights_only=True)["mil_bank"]
        bank_b = torch.load(part / "last.pt", weights_only=True)["mil_bank"]
        assert bank_a["seen"].sum() == 36 and torch.equal(bank_a["logits"], bank_b["logits"])
    la, lb = pd.read_csv(full / "log.csv"), pd.read_csv(part / "log.csv")
    cols = ["epoch", "lr", "bce", "triplet", "val_loss", "val_map"]
    pd.testing.assert_frame_equal(la[cols], lb[cols])


def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path):
    from hpasc.train import train_on

    run = train_on(tiny_cfg(tmp_path, "train.epochs=5", "train.val_every=2"), hand_made_fold(), tmp_path / "r")
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4, 5] and log["bce"].notna().all()
    assert list(log.loc[log["val_map"].notna(), "epoch"]) == [2, 4, 5]
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] in (2, 4, 5)
    assert (run / "curves.png").stat().st_size > 0 and (run / "oof.csv").is_file()


def test_early_stopping_and_a_finished_run_resumes_to_nothing(tmp_path):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.lr=0.0", "train.patience=1", "train.epochs=5", "loss.triplet_weight=0",
                   "model.dropout=0.0", "cells.augment=none")
    run = train_on(cfg, hand_made_fold(), tmp_path / "run")
    # lr 0: only BatchNorm statistics move, the score soon stops improving; patience 1 stops at the first
    # epoch that does not beat the best before it
    scores = pd.read_csv(run / "log.csv")["val_map"].tolist()
    first_flat = next(e for e in range(1, len(scores) + 1) if e > 1 and scores[e - 1] <= max(scores[:e - 1]))
    assert len(scores) == first_flat < 5
    before = (run / "last.pt").stat().st_mtime_ns
    train_on(cfg, hand_made_fold(), run, resume=True)
    assert (run / "last.pt").stat().st_mtime_ns == before


def _two_batches(trainer) -> tuple[dict, dict]:
    trainer.sampler.set_epoch(0)
    it = iter(trainer.loader)
    return next(it), next(it)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    from hpasc.training.loop import Trainer

    # no triplet (a batch-hard loss is not additive over batches), eval mode (BN running stats, no dropout)
    cfg = tiny_cfg(tmp_path, "train.accum_steps=2", "loss.triplet_weight=0", "cells.augment=none")
    trainer = Trainer(cfg, hand_made_fold(), tmp_path / "run")
    b1, b2 = _two_batches(trainer)
    trainer.model.eval()
    big = {k: torch.cat([b1[k], b2[k]]) for k in ("image", "target", "index")}
    trainer.criterion(trainer.model(big["image"]), big)["loss"].backward()
    expected = _grads(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    trainer._micro_step(b1, accumulating=True)
    trainer._micro_step(b2, accumulating=False)
    assert torch.allclose(_grads(trainer.model), expected, rtol=1e-4, atol=1e-7)


def _record_grad_norm_at_step(trainer, seen: list) -> None:
    """Make the trainer's optimizer note the gradient norm it is handed before stepping."""
    step = trainer.optimizer.step

    def noting_step(*args, **kwargs):
        seen.append(float(_grads(trainer.model).norm()))
        return step(*args, **kwargs)

    trainer.optimizer.step = noting_step


def test_gradient_clipping_caps_the_norm_the_optimizer_sees(tmp_path):
    from hpasc.training.loop import Trainer

    seen = []
    for clip in (1e-3, None):
        cfg = tiny_cfg(tmp_path, f"train.grad_clip={'null' if clip is None else clip}")
        trainer = Trainer(cfg, hand_made_fold(), tmp_path / "run")
        b1, _ = _two_batches(trainer)
        trainer._micro_step(b1, accumulating=False)
        _record_grad_norm_at_step(trainer, seen)
        trainer._optimizer_step()
    clipped, raw = seen
    assert raw > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)


def test_select_metric_errors(tmp_path):
    from hpasc.train import train_on

    with pytest.raises(ValueError, match="truth_csv"):
        train_on(tiny_cfg(tmp_path, "train.select_metric=comp_map"), hand_made_fold(), tmp_path / "run")


# --------------------------------------------------------------------------- DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, overrides: tuple[str, ...] = ()) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from hpasc.models import unwrap
    from hpasc.training.distributed import cleanup, init_distributed
    from hpasc.training.loop import Trainer

    info = init_distributed("cpu")
    cfg = tiny_cfg(Path(out), "train.epochs=1", *overrides)
    trainer = Trainer(cfg, hand_made_fold(), Path(out) / "run", info)
    trainer.fit()
    torch.save({"model": unwrap(trainer.model).state_dict(), "steps": trainer.progress.step,
                "world": info.world, "bank": trainer.bank.state_dict() if trainer.bank is not None else None},
               Path(out) / f"rank{rank}.pt")
    cleanup(info)


@pytest.mark.slow
@pytest.mark.parametrize("mil", [0, 1])
def test_ddp_two_gloo_processes_train_in_step(tmp_path, mil):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), (f"loss.mil_weight={mil}",)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 2  # 36 cells / 2 ranks = 18 -> 2 batches of 8
    for k, v in r0["model"].items():
        if v.dtype.is_floating_point and "running" not in k:  # BN statistics stay per process
            assert torch.equal(v, r1["model"][k]), k
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "rank1").exists()
    if mil:  # each rank stored the logits of both ranks' batches: the same bank, every cell trained on in it
        assert r0["bank"]["seen"].sum() == 32 and torch.equal(r0["bank"]["logits"], r1["bank"]["logits"])


# --------------------------------------------------------------------------- fold data

def test_read_folds_made_from_train_csv_and_mismatch_error(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    ids = [f"im{i}" for i in range(6)]
    for i in ids:
        (root / "train" / f"{i}_green.png").write_bytes(b"")
    pd.DataFrame({"ID": ids, "Label": ["0", "1", "0", "1", "0", "1"]}).to_csv(root / "train.csv", index=False)
    cfg = load_config(None, [f"data.root={root}", f"data.work_dir={tmp_path / 'work'}", "data.folds_csv=nope.csv",
                             "train.folds=[0, 1]"])
    folds = read_folds(cfg)
    assert sorted(folds["ID"]) == ids and set(folds["fold"]) == {0, 1}
    assert (tmp_path / "work" / "folds.csv").is_file()
    pd.DataFrame({"ID": ["other"], "Label": ["0"], "fold": [0]}).to_csv(root / "folds.csv", index=False)
    with pytest.raises(TrainDataError, match="another dataset"):
        read_folds(load_config(None, [f"data.root={root}"]))


def test_source_names_tell_sources_apart(tmp_path):
    from hpasc.training.fold_data import source_folders

    cfg = tiny_cfg(tmp_path, f"data.root={tmp_path / 'comp'}",
                   f"data.sources=[{{name: hpa_public, root: '{tmp_path / 'ext'}'}}]")
    assert source_folders(cfg) == {"competition": tmp_path / "comp" / "train", "hpa_public": tmp_path / "ext" / "train"}
    reserved = tiny_cfg(tmp_path, f"data.sources=[{{name: competition, root: '{tmp_path / 'ext'}'}}]")
    with pytest.raises(TrainDataError, match="'competition' is reserved for the competition images"):
        source_folders(reserved)
    twice = tiny_cfg(tmp_path, f"data.sources=[{{name: a, root: '{tmp_path}'}}, {{name: a, root: '{tmp_path}'}}]")
    with pytest.raises(TrainDataError, match="'a' is given to two sources"):
        source_folders(twice)


def test_fold_data_splits_a_cache(tmp_path):
    from hpasc.cells import CellCache

    crops, table = hand_made_cells(n_images=6, cells=2)
    table.loc[table.ID == "img05", "Label"] = "0|13"  # a multi-label image: not single-label
    cache = CellCache(tmp_path, table, crops, {})
    cfg = load_config(None, ["cells.selection=single_label"])
    fd = fold_data(cfg, 1, cache, tmp_path, tmp_path)  # folds: img00-02 -> 0, img03-05 -> 1
    assert set(table.loc[fd.val_rows, "ID"]) == {"img03", "img04", "img05"}
    assert set(table.loc[fd.train_rows, "ID"]) == {"img00", "img01", "img02"}
    assert fd.val_targets.shape == (6, 19) and fd.val_targets[-1, [0, 13]].tolist() == [1, 1]
    with pytest.raises(TrainDataError, match="no validation images"):
        fold_data(cfg, 7, cache, tmp_path, tmp_path)


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_cli_trains_a_fold_of_synthetic_data_end_to_end(synth_small, tmp_path):
    from hpasc.cli import main
    from hpasc.folds import make_folds

    make_folds(pd.read_csv(synth_small / "train.csv"), n_folds=2, seed=0).to_csv(tmp_path / "folds.csv", index=False)
    args = ["train", str(REPO / "configs" / "tiny.yaml"), "--fold", "1",
            f"data.root={synth_small}", f"data.folds_csv={tmp_path / 'folds.csv'}", f"data.work_dir={tmp_path}",
            f"data.truth_csv={synth_small / 'truth' / 'train.csv'}", f"train.out_dir={tmp_path / 'runs'}",
            "train.epochs=2", "train.val_every=1", "train.num_workers=0", "cells.size=48", "pseudo.epochs=2"]
    assert main(args) == 0
    run = tmp_path / "runs" / "tiny" / "fold1"
    log = pd.read_csv(run / "log.csv")
    assert len(log) == 2 and log["val_comp_map"].between(0, 1).all()
    oof = pd.read_csv(run / "oof.csv")
    val_ids = set(pd.read_csv(tmp_path / "folds.csv").query("fold == 1").ID)
    assert set(oof.ID) == val_ids  # every validation image, all of its cells
    cells = pd.read_csv(next((tmp_path / "cells").glob("*/cells.csv")))
    assert len(oof) == int(cells.ID.isin(val_ids).sum())
    # tiny.yaml's pseudo-label round: round 1 learned from round 0's out-of-fold cells, from its weights
    round1 = tmp_path / "runs" / "tiny" / "round1" / "fold1"
    assert len(pd.read_csv(round1 / "log.csv")) == 2 and set(pd.read_csv(round1 / "oof.csv").ID) == val_ids
    assert load_config(round1 / "config.yaml").model.pretrained == str(run / "best.pt")
    assert main(args + ["--round", "3"]) == 2  # the config has rounds 0..1
    assert main(args + ["--resume"]) == 0  # finished: nothing to do, still fine
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), "model.pretrained=/nope.pth",
                 f"data.root={synth_small}", f"data.folds_csv={tmp_path / 'folds.csv'}",
                 f"data.work_dir={tmp_path}", f"train.out_dir={tmp_path / 'runs'}", "cells.size=48"]) == 2
    assert math.isfinite(log["bce"].iloc[-1])


def test_image_head_is_trained_on_the_images_of_a_batch(tmp_path):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "model.image_head=true", "train.epochs=1")
    run = train_on(cfg, hand_made_fold(), tmp_path / "run")
    first = torch.load(run / "best.pt", weights_only=True)["model"]["image_classifier.weight"]
    torch.manual_seed(cfg.train.seed)
    from hpasc.models import build_model

    untrained = build_model(cfg.model).state_dict()["image_classifier.weight"]
    assert first.shape == (19, untrained.shape[1]) and not torch.equal(first, untrained)


def test_stain_negative_reaches_the_out_of_fold_probabilities(tmp_path):
    from hpasc.confidence import stain_negative
    from hpasc.train import train_on

    data = hand_made_fold()
    green = data.crops[..., 1].reshape(len(data.crops), -1).mean(axis=1).astype(np.float32)
    data.table["mean_green"] = np.where(data.table["cell_id"] % 2 == 0, 0.0, green)  # every other cell unstained
    plain = pd.read_csv(train_on(tiny_cfg(tmp_path, "train.epochs=2"), data, tmp_path / "plain") / "oof.csv")
    with pytest.raises(ValueError, match="mean_green"):
        train_on(tiny_cfg(tmp_path, "train.epochs=1", "inference.stain_negative=true"), hand_made_fold(),
                 tmp_path / "no_column")
    stained = pd.read_csv(train_on(tiny_cfg(tmp_path, "train.epochs=2", "inference.stain_negative=true"), data,
                                   tmp_path / "stain") / "oof.csv")
    cols = [f"p{c}" for c in range(19)]
    val = data.table.loc[data.val_rows]
    by_image = val.groupby("ID")["mean_green"]
    low, top = by_image.transform("min"), by_image.transform(lambda v: np.percentile(v, 90))
    stain = ((val["mean_green"] - low) / (top - low)).clip(0, 1)
    expected = stain_negative(plain[cols].to_numpy(np.float32), stain.to_numpy())
    assert np.allclose(stained[cols].to_numpy(), expected, atol=2e-6)
    assert not np.allclose(expected, plain[cols].to_numpy(), atol=1e-3)  # the rule changed some cells


def test_oof_keeps_tiny_probabilities_distinct_from_zero(tmp_path):
    """A probability of 1e-9 is still a prediction for the metric: it must not be written as 0."""
    from hpasc.runs import write_oof

    probs = np.full((2, 19), 0.5, np.float32)
    probs[0, 3], probs[1, 7] = 1e-9, 0.123456789
    write_oof(tmp_path / "oof.csv", ["a", "a"], [1, 2], probs)
    back = pd.read_csv(tmp_path / "oof.csv")
    assert list(back.columns) == ["ID", "cell_id"] + [f"p{c}" for c in range(19)]
    assert back.loc[0, "p3"] == pytest.approx(1e-9, rel=1e-6) and back.loc[0, "p3"] > 0
    assert back.loc[1, "p7"] == pytest.approx(0.1234568, abs=1e-7)


def test_a_corrupt_checkpoint_is_a_named_error(tmp_path):
    from hpasc.cli import is_user_error
    from hpasc.training.state import CheckpointError, load_checkpoint, save_checkpoint

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable checkpoint"):
        load_checkpoint(bad)
    save_checkpoint({"epoch": 1}, bad)  # a readable file without model weights
    with pytest.raises(CheckpointError, match=r"last\.pt: not an hpasc checkpoint"):
        load_checkpoint(bad)
    assert is_user_error(CheckpointError("x"))  # the CLI prints it as one line


@pytest.mark.slow
def test_training_on_competition_plus_public_images(synth_small, tmp_path):
    """``data.sources``: public-HPA-like images in another folder join training — folds made over both
    with antibodies whole, crops from both folders, the source weight in the sampler, validation of the
    source optional."""
    from hpasc.cli import main
    from hpasc.synthetic import synthesize
    from hpasc.training.fold_data import prepare_cells

    ext = tmp_path / "ext"
    synthesize(ext, n_train=6, n_test=1, size=256, seed=11)
    table = pd.read_csv(ext / "train.csv", dtype=str)
    assert not set(table.ID) & set(pd.read_csv(synth_small / "train.csv").ID)
    table.assign(source="hpa_public", antibody=["ab0", "ab0", "ab1", "ab1", "ab2", "ab2"]).to_csv(
        ext / "train.csv", index=False)
    work = tmp_path / "work"
    base = [f"data.root={synth_small}", "data.folds_csv=absent.csv", f"data.work_dir={work}",
            f"train.out_dir={tmp_path / 'runs'}", "train.folds=[0, 1]", "cells.size=32", "train.num_workers=0",
            f"data.sources=[{{name: hpa_public, root: '{ext}', weight: 0.25}}]"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", base)
    cache, images_dir, masks_dir = prepare_cells(cfg)
    folds = pd.read_csv(work / "folds.csv", dtype=str)
    assert len(folds) == 14 and set(folds.source) == {"competition", "hpa_public"}
    assert (folds[folds.source == "hpa_public"].groupby("antibody").fold.nunique() == 1).all()
    assert set(cache.table.ID) == set(folds.ID)  # segmented and cropped from both folders
    assert images_dir[table.ID[0]] == ext / "train" and images_dir[folds.ID[0]] == synth_small / "train"
    fd = fold_data(cfg, 0, cache, images_dir, masks_dir)
    train_sources = cache.table.loc[fd.train_rows, "source"]
    assert set(np.unique(fd.train_weights)) == {0.25, 1.0}
    assert np.array_equal(fd.train_weights == 0.25, (train_sources == "hpa_public").to_numpy())
    no_val = load_config(REPO / "configs" / "tiny.yaml",
                         base[:-1] + [f"data.sources=[{{name: hpa_public, root: '{ext}', validate: false}}]"])
    fd_no_val = fold_data(no_val, 0, cache, images_dir, masks_dir)
    assert fd_no_val.train_weights is None  # weight 1 everywhere: the plain shuffle
    assert set(cache.table.loc[fd_no_val.val_rows, "source"]) == {"competition"}
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), "--fold", "0", *base, "train.epochs=1"]) == 0
    assert (tmp_path / "runs" / "tiny" / "fold0" / "best.pt").is_file()
    bad = base[:-1] + [f"data.sources=[{{name: x, root: '{tmp_path / 'nope'}'}}]"]
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), "--fold", "0", *bad]) == 2
