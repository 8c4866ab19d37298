"""``hpasc plan``: the arithmetic of the projection (hand-computed) and a real timing run."""
from __future__ import annotations

import pandas as pd
import pytest

from hpasc.predict.budget import Level, degradation_ladder
from hpasc.predict.plan import Plan, SizeTiming, _timing, format_plan, listing_sizes, make_plan


def _plan(budget: float) -> Plan:
    sizes = [SizeTiming(2048, 100, 2, wall=3.0, stages={"segment": 1.0, "model": 2.0}),
             SizeTiming(3072, 10, 2, wall=6.0, stages={"segment": 2.0, "model": 4.0})]
    return Plan(sizes, setup=20.0, ladder=degradation_ladder(4, ["none", "hflip"]), device="cpu", budget=budget)


def test_projection_and_ladder_by_hand():
    plan = _plan(budget=1000.0)
    assert plan.total() == 20 + 100 * 3.0 + 10 * 6.0  # 380 s
    # no TTA halves the model stage: 2048 -> 3 - 1 = 2 s, 3072 -> 6 - 2 = 4 s
    assert plan.total(Level(4, ("none",))) == 20 + 100 * 2.0 + 10 * 4.0
    # one model without TTA: an eighth of the model work
    assert plan.total(Level(1, ("none",))) == pytest.approx(20 + 100 * (3 - 2 * 7 / 8) + 10 * (6 - 4 * 7 / 8))
    assert plan.total(Level(0, ("none",))) == 20
    assert plan.fitting_level() == Level(4, ("none", "hflip"))
    assert "fits: the full settings" in format_plan(plan)
    tight = _plan(budget=300.0)  # 380 > 300, no TTA gives 260
    assert tight.fitting_level() == Level(4, ("none",))
    text = format_plan(tight)
    assert "the budget would degrade to 4 model(s), TTA none" in text
    assert "  2048     100" in text and "projected: 0.11 h for 110 images" in text
    assert _plan(budget=10.0).fitting_level() is None


def test_model_stage_is_priced_per_crop_not_per_padded_batch():
    """2 images, 40 cells, one model call of 256 crops that took 2.56 s: 0.01 s per crop, so the test set
    pays 0.2 s per image of 20 cells, not 1.28; the wall time loses the padding's 2.16 s too."""
    stats = {"seconds": {"segment": 1.0, "model": 2.56}, "total": 6.0, "setup": 1.0, "chunks": 1,
             "batch_size": 256, "cells": 40, "member_seconds": {"big/fold0": 2.0, "small/fold0": 0.56}}
    t = _timing(2048, 462, 2, stats)
    assert t.stages["model"] == pytest.approx(0.2) and t.stages["segment"] == 0.5
    assert t.wall == pytest.approx((6.0 - 1.0 - (2.56 - 0.4)) / 2)
    assert t.members == pytest.approx({"big/fold0": 2.0 / 2 * 40 / 256, "small/fold0": 0.56 / 2 * 40 / 256})


def test_dropping_members_saves_their_own_cost():
    """Heaviest-weight member first; one that costs 3/4 of the model stage stays when the rung keeps one."""
    sizes = [SizeTiming(2048, 10, 2, wall=5.0, stages={"model": 4.0}, members={"b7": 3.0, "b0": 1.0})]
    plan = Plan(sizes, setup=0.0, ladder=degradation_ladder(2, ["none", "hflip"]), device="cpu", budget=1e9)
    assert plan.total() == 50.0
    assert plan.total(Level(2, ("none",))) == pytest.approx(10 * (5 - 4 + 2.0))
    assert plan.total(Level(1, ("none",))) == pytest.approx(10 * (5 - 4 + 1.5))


def test_listing_sizes_default_and_from_a_listing(real_hpa, tmp_path):
    assert listing_sizes() == {1728: 68, 2048: 462, 3072: 29}
    assert listing_sizes(real_hpa / "sample_submission.csv") == {1728: 68, 2048: 462, 3072: 29}
    listing = tmp_path / "s.csv"
    pd.DataFrame({"ID": ["a", "b", "c"], "ImageWidth": [256, 256, 320], "ImageHeight": [256, 256, 320],
                  "PredictionString": ""}).to_csv(listing, index=False)
    assert listing_sizes(listing) == {256: 2, 320: 1}


@pytest.mark.slow
def test_plan_times_the_real_predict(tmp_path, make_run):
    runs = [make_run(tmp_path / "runs", "tiny", k, seed=k) for k in range(2)]
    listing = tmp_path / "s.csv"
    pd.DataFrame({"ID": [f"i{k}" for k in range(5)], "ImageWidth": [256] * 4 + [384],
                  "ImageHeight": [256] * 4 + [384], "PredictionString": ""}).to_csv(listing, index=False)
    plan = make_plan(runs, listing, per_size=2, device="cpu", workers=1, budget=3600)
    assert [(t.side, t.count, t.measured) for t in plan.sizes] == [(256, 4, 2), (384, 1, 2)]
    assert all(t.wall > 0 and t.stages["segment"] > 0 and t.stages["model"] > 0 for t in plan.sizes)
    assert plan.ladder[0] == Level(2, ("none", "hflip"))  # the runs' members and TTA
    assert all(set(t.members) == {"tiny/fold0", "tiny/fold1"} for t in plan.sizes)
    assert sum(plan.sizes[0].members.values()) == pytest.approx(plan.sizes[0].stages["model"], rel=0.3)
    assert plan.total() == pytest.approx(plan.setup + 4 * plan.sizes[0].wall + plan.sizes[1].wall)
    assert "fits" in format_plan(plan)
