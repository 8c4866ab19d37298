"""``hpasc plan``: the kernel's wall time on the competition test set, estimated before submitting.

A few images of each test size are run through :func:`hpasc.predict.predict` itself — the kernel's code,
with the given runs, TTA and device — and the measured rate per image is extrapolated to the test set
(by default the real one: 462 x 2048, 68 x 1728 and 29 x 3072 px, from ``sample_submission.csv``; any
other listing with ``--sample-submission``). The timing images are synthetic cells at each size, 16-bit
as the real test set, unless a folder of real images is given (they are resized to each size).

Each member's forward passes are timed on their own, and the model stage scales with the TTA views, so
the same measurement prices every rung of the time budget's ladder (:func:`hpasc.predict.budget.
degradation_ladder`: fewer views, then the lightest-weighted members dropped): the plan says which rung a
budget would end on.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..synthetic.world import DUMMY_PREDICTION, REAL_TEST_SIZES
from .budget import Level, degradation_ladder

KAGGLE_LIMIT = 9 * 3600.0  # seconds a Kaggle kernel may run
STAGES = ("read", "segment", "encode", "crop", "model", "combine")


@dataclass
class SizeTiming:
    """What ``k`` images of one side cost in one predict run."""

    side: int
    count: int  # images of this side in the planned test set
    measured: int  # images timed
    wall: float  # seconds per image, wall clock, stages overlapping as in the kernel
    stages: dict[str, float] = field(default_factory=dict)  # seconds per image (summed over threads)
    members: dict[str, float] = field(default_factory=dict)  # model seconds per image by member, all
    # TTA views, heaviest weight first (the order in which the budget drops members)


@dataclass
class Plan:
    """Measured timings per image side, the one-off setup, and the time budget's ladder to price."""

    sizes: list[SizeTiming]
    setup: float  # model loading + pre-flight, once per kernel
    ladder: list[Level]
    device: str
    budget: float

    def total(self, level: Level | None = None) -> float:
        """Projected kernel seconds at ``level`` (default: full settings): the model stage keeps the
        measured share of the members the rung keeps, times its share of the TTA views; the rest stays;
        empty rows cost nothing but the setup."""
        full = self.ladder[0]
        level = level or full
        if level.empty:
            return self.setup
        views = len(level.tta) / len(full.tta)
        total = self.setup
        for s in self.sizes:
            model = s.stages.get("model", 0.0)
            costs = list(s.members.values())
            if costs and sum(costs) > 0:  # the members this rung keeps, by their measured shares
                kept = model * sum(costs[: level.n_members]) / sum(costs) * views
            else:
                kept = model * level.n_members / full.n_members * views
            total += max(s.wall - (model - kept), 0.0) * s.count
        return total

    def fitting_level(self) -> Level | None:
        """The first ladder rung whose projection fits the budget (None: even empty rows do not)."""
        for level in self.ladder:
            if self.total(level) <= self.budget:
                return level
        return None


def listing_sizes(sample_submission: os.PathLike | str | None = None) -> dict[int, int]:
    """Image side -> number of images: of a sample submission, or the real test set's."""
    if sample_submission is None:
        return dict(REAL_TEST_SIZES)
    frame = pd.read_csv(sample_submission, usecols=["ImageWidth", "ImageHeight"])
    sides = frame[["ImageWidth", "ImageHeight"]].max(axis=1).astype(int)
    return {int(side): int(n) for side, n in sides.value_counts().sort_index().items()}


def _timing_images(folder: Path, side: int, n: int, real: Path | None, seed: int) -> pd.DataFrame:
    """``n`` 16-bit images of ``side`` px in ``folder`` and their sample-submission rows."""
    import cv2

    from ..io import read_image, write_image
    from ..synthetic.label_table import sample_label_set
    from ..synthetic.render import generate_image

    real_ids = sorted(p.name[: -len("_red.png")] for p in real.glob("*_red.png")) if real else []
    rows = []
    for k in range(n):
        image_id = f"plan{side}x{k:02d}"
        if real_ids:
            image = read_image(real, real_ids[k % len(real_ids)])
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
        else:
            rng = np.random.default_rng([seed, side, k])
            image = generate_image(rng, side, sample_label_set(rng), 0.5).image
        write_image(folder, image_id, np.clip(image, 0, 1), bits=16)
        rows.append({"ID": image_id, "ImageWidth": side, "ImageHeight": side,
                     "PredictionString": DUMMY_PREDICTION})
    return pd.DataFrame(rows)


def make_plan(run_dirs: Sequence[os.PathLike | str], sample_submission: os.PathLike | str | None = None,
              per_size: int = 2, images: os.PathLike | str | None = None, device: str = "auto",
              workers: int = 2, weights: os.PathLike | str | None = None,
              inference_overrides: Sequence[str] | None = None, seg_overrides: Sequence[str] | None = None,
              budget: float = 8 * 3600.0, seed: int = 0) -> Plan:
    """Time ``per_size`` images of each side of the test set through ``predict`` and extrapolate."""
    from . import predict

    if per_size < 1:
        raise ValueError(f"per_size must be >= 1, got {per_size}")
    counts = listing_sizes(sample_submission)
    real = Path(images) if images else None
    timings, setups, stats = [], [], {}
    with tempfile.TemporaryDirectory(prefix="hpasc-plan-") as tmp:
        for side, count in counts.items():
            folder = Path(tmp) / f"s{side}"
            sample = _timing_images(folder, side, per_size, real, seed)
            sample.to_csv(folder / "sample.csv", index=False)
            stats = {}
            predict(run_dirs, folder, folder / "sample.csv", folder / "submission.csv", weights=weights,
                    inference_overrides=inference_overrides, seg_overrides=seg_overrides, device=device,
                    workers=workers, stats=stats)
            setups.append(stats["setup"])
            timings.append(_timing(side, count, per_size, stats))
    return Plan(timings, float(np.median(setups)), degradation_ladder(stats["members"], stats["tta"]),
                stats["device"], budget)


def _timing(side: int, count: int, measured: int, stats: dict) -> SizeTiming:
    """Per-image seconds of one predict run. A few images fill the model's last batch mostly with zero
    padding, which a full test set does not pay: the model stage is priced per crop (a call always
    runs ``batch_size`` crops) and the wall time corrected by what the padding cost."""
    stages = {k: v / measured for k, v in stats["seconds"].items()}
    wall = (stats["total"] - stats["setup"]) / measured
    members = {name: sec / measured for name, sec in stats.get("member_seconds", {}).items()}
    if stats.get("chunks"):
        model = stats["seconds"].get("model", 0.0)
        keep = stats["cells"] / (stats["chunks"] * stats["batch_size"])  # the share that was not padding
        stages["model"] = model * keep / measured
        wall -= model * (1 - keep) / measured
        members = {name: sec * keep for name, sec in members.items()}
    return SizeTiming(side, count, measured, max(wall, 0.0), stages, members)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def format_plan(plan: Plan) -> str:
    """The plan as a table per size and stage, the total against the limit and the budget."""
    shown = [s for s in STAGES if any(t.stages.get(s, 0) for t in plan.sizes)]
    head = f"{'side':>6}{'images':>8}" + "".join(f"{s:>9}" for s in shown) + f"{'wall/img':>10}{'total':>10}"
    lines = [f"kernel time plan on {plan.device}: seconds per image by stage (threads overlap, so the wall "
             "time per image is less than their sum)", head]
    for t in plan.sizes:
        lines.append(f"{t.side:>6}{t.count:>8}" + "".join(f"{t.stages.get(s, 0.0):>9.2f}" for s in shown)
                     + f"{t.wall:>10.2f}{_hours(t.wall * t.count):>10}")
    names = list(plan.sizes[0].members) if plan.sizes else []
    if len(names) > 1:
        lines.append("model seconds per image by member (all TTA views): "
                     + "; ".join(f"{name} " + "/".join(f"{t.members.get(name, 0.0):.2f}" for t in plan.sizes)
                                 for name in names)
                     + f" (sides {'/'.join(str(t.side) for t in plan.sizes)})")
    n = sum(t.count for t in plan.sizes)
    total = plan.total()
    lines.append(f"setup (model loading, checks): {plan.setup:.1f} s; measured on "
                 f"{sum(t.measured for t in plan.sizes)} images")
    lines.append(f"projected: {_hours(total)} for {n} images (Kaggle limit {_hours(KAGGLE_LIMIT)}, "
                 f"time budget {_hours(plan.budget)})")
    for level in plan.ladder[1:]:
        what = "empty rows" if level.empty else f"{level.n_members} model(s), TTA {'/'.join(level.tta)}"
        lines.append(f"  if degraded to {what}: {_hours(plan.total(level))}")
    fit = plan.fitting_level()
    if fit == plan.ladder[0]:
        lines.append("fits: the full settings finish within the budget")
    elif fit is None:
        lines.append("does not fit even with empty rows: raise the budget")
    else:
        what = "empty rows" if fit.empty else f"{fit.n_members} model(s), TTA {'/'.join(fit.tta)}"
        lines.append(f"does not fit at full settings: the budget would degrade to {what}")
    return "\n".join(lines)
