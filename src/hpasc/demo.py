"""``hpasc demo``: the whole pipeline on the synthetic world, end to end, on a CPU in minutes.

synthesise -> folds -> segment (default backend) -> cell dataset -> train the tiny config on 2-5 folds ->
predict the test images with the fold ensemble -> validate -> score against the synthetic truth, plus two
image-level baselines the model has to beat to show it learned cells rather than images:

- ``image_truth``: every segmented cell gets its image's true labels with confidence 1;
- ``image_model``: every segmented cell gets the model's own image-level prediction (the image's cells'
  probabilities aggregated as the confidence recipe does).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import runs
from .config import Config, load_config, parse_overrides, replace, save_config
from .fsutil import write_text_atomic
from .labels import CLASS_NAMES, to_multihot

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
# What the demo trains in its ten minutes on 2 CPU cores, in image-epochs (training images seen, summed
# over folds and rounds): 2 folds of 512 images x (12 + 4) epochs train in about 6 minutes (issue #12).
TRAIN_BUDGET = 8192
# What every model trains for at least, in image-epochs over its rounds: one of those two folds (256
# images x 16 epochs).
# A smaller dataset trains more epochs instead of fewer steps, at up to MAX_FOLDS x MODEL_BUDGET in all.
MODEL_BUDGET = 4096
MAX_FOLDS = 4


def budget_folds(n_images: int, epochs: int, budget: int = TRAIN_BUDGET) -> int:
    """How many folds the demo trains: as many as the budget pays for, 2 to ``MAX_FOLDS``.

    k folds of n images cost epochs x n x (k - 1) image-epochs (each fold trains on (k - 1) / k of the
    images); more folds give every model more images and the ensemble more members, so a small dataset
    gets up to 4 folds and a large one 2 — measured on the demo's world: 512 images in 2 folds (mAP 0.891,
    8 min) beat 384 in 3 (0.887, 10 min) and 320 in 3 (0.872, 9 min).
    """
    if n_images < 1 or epochs < 1:
        raise ValueError(f"budget_folds: need images and epochs, got {n_images} and {epochs}")
    return int(min(MAX_FOLDS, max(2, 1 + budget // (epochs * n_images))))


def budget_epochs(n_images: int, folds: int, epochs: int, model_budget: int = MODEL_BUDGET) -> int:
    """The config's ``epochs``, or more when a fold's training images x epochs fall short of
    ``model_budget``: a small dataset is trained as long in steps as the demo's, not stopped early.

    Measured on a 160-image world (4 folds of 120 images): 16 epochs test mAP 0.812, within-image cell
    AUC 0.730; 34 epochs 0.882 / 0.840, above what 16 epochs reach on the true cell labels (0.874).
    """
    if n_images < 1 or folds < 2 or epochs < 1:
        raise ValueError(f"budget_epochs: need images, 2+ folds and epochs, got {n_images}, {folds}, {epochs}")
    per_model = n_images * (folds - 1) / folds
    return max(epochs, round(model_budget / per_model))


def schedule_epochs(cfg: Config) -> int:
    """Epochs a fold trains over all its rounds: round 0's plus each pseudo-label round's."""
    from .training.pseudo import round_epochs

    return sum(round_epochs(cfg, r) for r in range(cfg.pseudo.rounds + 1))


def budget_schedule(cfg: Config, n_images: int, folds: int, fixed: set[str] = frozenset()) -> Config:
    """``cfg`` with round 0's and the later rounds' epochs stretched alike by ``budget_epochs`` of their
    sum, so a small dataset trains as many steps per model as the demo's; epochs named in ``fixed``
    (set on the command line: ``train.epochs``, ``pseudo.epochs``) are kept as given, and when one of
    them is, both are."""
    if fixed & {"train.epochs", "pseudo.epochs"}:
        return cfg
    total = schedule_epochs(cfg)
    factor = budget_epochs(n_images, folds, total) / total
    changes = {"train.epochs": max(1, round(cfg.train.epochs * factor))}
    if cfg.pseudo.rounds and cfg.pseudo.epochs is not None:
        changes["pseudo.epochs"] = max(1, round(cfg.pseudo.epochs * factor))
    return replace(cfg, **changes)


def describe_schedule(cfg: Config) -> str:
    from .training.pseudo import round_epochs

    if not cfg.pseudo.rounds:
        return f"{cfg.train.epochs} epochs"
    later = round_epochs(cfg, 1)
    start = "from the round before" if cfg.pseudo.init == "previous" else "from scratch"
    return (f"{cfg.train.epochs} epochs + {cfg.pseudo.rounds} pseudo-label round(s) of {later} epochs "
            f"({start})")


RECIPE_FILE = "recipe.yaml"


def oof_recipe(run_dirs, out: Path, verbose: bool = True) -> dict:
    """The confidence recipe's alpha that maximises the out-of-fold competition mAP of ``run_dirs``
    (``hpasc blend runs``; needs the training images' cell truth), written to ``out`` for ``predict``."""
    from .blend import blend_runs

    result = blend_runs(run_dirs, out, lofo=False, progress=False)
    if verbose:
        print(f"[demo] recipe from out-of-fold cells: alpha {result.alpha:g} (OOF mAP {result.score:.4f}; "
              f"alpha {result.config_alpha:g} of the config: {result.equal_score:.4f})", flush=True)
    return {"alpha": result.alpha, "oof_mAP": result.score, "config_alpha": result.config_alpha,
            "config_oof_mAP": result.equal_score}


@dataclass
class StageClock:
    """Seconds per named stage, printed as the demo goes."""

    seconds: dict[str, float] = field(default_factory=dict)
    verbose: bool = True

    @contextmanager
    def __call__(self, name: str):
        if self.verbose:
            print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if self.verbose:
            print(f"[demo] {name}: {self.seconds[name]:.1f} s", flush=True)


class DemoError(ValueError):
    """A ``--data`` folder that is not in the competition layout (names what is missing)."""


DATA_LAYOUT = ("train", "test", "train.csv", "sample_submission.csv")


def check_data_layout(data: Path) -> None:
    missing = [name for name in DATA_LAYOUT if not (data / name).exists()]
    if missing:
        raise DemoError(f"{data}: not a competition-layout folder, missing {', '.join(missing)} "
                        f"(needs {', '.join(DATA_LAYOUT)}; truth/train.csv and truth/test.csv optional)")


def demo_config(work: Path, config_path: Path | None = None, overrides: tuple[str, ...] = (),
                data: Path | None = None) -> Config:
    """The tiny config pointed at the demo's folders (``data``: default ``work/data``)."""
    cfg = load_config(config_path or TINY_CONFIG, overrides)
    data = data or work / "data"
    truth = data / "truth" / "train.csv"
    return replace(cfg, **{
        "data.root": str(data),
        "data.folds_csv": str(runs.folds_file(work)),
        "data.work_dir": str(work),
        "data.truth_csv": str(truth) if truth.is_file() else None,
        "train.out_dir": str(work / "runs"),
    })


def _truth_image_labels(truth: pd.DataFrame) -> dict[str, tuple[int, ...]]:
    """Image labels as the union of the truth cells' labels (Negative only when nothing else)."""
    from .labels import NEGATIVE
    from .submission import parse_truth_string

    out = {}
    for row in truth.itertuples(index=False):
        ids = {c for labels in parse_truth_string(row.PredictionString, f"truth {row.ID}")[1] for c in labels}
        if len(ids) > 1:
            ids.discard(NEGATIVE)
        out[row.ID] = tuple(sorted(ids))
    return out


def baseline_rows(masks_dir: Path, image_probs: dict[str, np.ndarray]) -> dict[str, str]:
    """Every segmented cell of each image gets the same class confidences (the image's)."""
    from .rle import encode_label_map
    from .segmentation import read_masks
    from .submission import prediction_string

    rows = {}
    for image_id, probs in image_probs.items():
        cells, _ = read_masks(masks_dir, image_id)
        encodings = encode_label_map(cells)
        ids = np.array(sorted(encodings), dtype=np.int64)
        rows[image_id] = prediction_string(encodings, np.tile(probs, (len(ids), 1)), ids)
    return rows


def run_demo(work: str | Path, n_train: int = 512, n_test: int = 48, size: int = 512, seed: int = 0,
             folds: tuple[int, ...] | None = None, n_folds: int | None = None, config_path: str | Path | None = None,
             overrides: tuple[str, ...] = (), verbose: bool = True, data_dir: str | Path | None = None) -> dict:
    """Run the whole pipeline in ``work``; returns (and writes) ``demo_result.json``.

    Every fold of ``n_folds`` (default: ``budget_folds`` of the training images and the config's epochs)
    is trained (``folds`` chooses some) for ``budget_epochs`` (``train.epochs`` among the ``overrides``
    is kept as given), round after round when the config has pseudo-label rounds; the test images are
    predicted by the folds of the last round.

    Without ``data_dir`` the data is a synthetic world made in ``work/data``; with it, the
    competition-layout folder is used as it is (nothing is written into it), scored and cell-evaluated
    when ``DATA/truth/test.csv`` exists.
    """
    from .folds import make_folds
    from .fsutil import read_csv
    from .metric import read_truth, score
    from .predict import predict
    from .predict.chunks import available_cpus
    from .segmentation import segment_folder
    from .submission import validate_submission, write_submission
    from .synthetic import synthesize
    from .train import train_fold

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clock = StageClock(verbose=verbose)
    workers = min(available_cpus(), 4)  # synthesis and segmentation are per image: one process per core
    if data_dir is None:
        data = work / "data"
        with clock("synthesise"):
            synthesize(data, n_train=n_train, n_test=n_test, size=size, seed=seed, workers=workers)
    else:
        data = Path(data_dir).resolve()
        check_data_layout(data)
    sample = data / "sample_submission.csv"
    test_masks = runs.masks_dir(work, "test")
    truth_csv = data / "truth" / "test.csv"
    cfg = demo_config(work, Path(config_path) if config_path else None, overrides, data)
    with clock("folds"):
        train_df = read_csv(data / "train.csv", "train CSV", DemoError, dtype={"ID": str, "Label": str})
        if n_folds is None:
            n_folds = budget_folds(len(train_df), schedule_epochs(cfg))
        folds_df = make_folds(train_df, n_folds=n_folds, seed=seed, source=str(data / "train.csv"))
        folds_df.to_csv(runs.folds_file(work), index=False)
        cfg = budget_schedule(cfg, len(train_df), n_folds, set(dict(parse_overrides(overrides))))
        if verbose:
            print(f"[demo] {len(train_df)} training images: {n_folds} folds x {describe_schedule(cfg)}", flush=True)
    folds = tuple(range(n_folds)) if folds is None else tuple(folds)
    cfg = replace(cfg, **{"train.folds": list(folds)})
    save_config(cfg, work / "demo_config.yaml")
    with clock("segment"):
        segment_folder(data / "train", runs.masks_dir(work, "train"), cfg.segmentation, workers=workers)
        segment_folder(data / "test", test_masks, cfg.segmentation, overlay=True, workers=workers)
    run_dirs: list[Path] = []
    for round_ in range(cfg.pseudo.rounds + 1):
        run_dirs = []
        for fold in folds:
            with clock(f"train round {round_} fold {fold}" if cfg.pseudo.rounds else f"train fold {fold}"):
                run_dirs.append(train_fold(cfg, fold, round_=round_))
    submission = work / "submission.csv"
    recipe, recipe_file = None, None
    if cfg.data.truth_csv:  # cell truth of the training images: the recipe's alpha from out-of-fold cells
        recipe_file = work / RECIPE_FILE
        with clock("recipe"):
            recipe = oof_recipe(run_dirs, recipe_file, verbose)
    with clock("predict"):
        predict(run_dirs, data / "test", sample, submission, weights=recipe_file, masks_dir=test_masks,
                seg_cfg=cfg.segmentation)
    with clock("validate + score"):
        problems = validate_submission(submission, sample)
    if not truth_csv.is_file():  # a folder without cell truth: the submission is all there is to show
        out = {"mAP": None, "submission": str(submission), "truth": None, "baselines": {}, "recipe": recipe,
               "oracle_mAP": None, "cell_auc": None, "beats_baselines": None,
               "validation_problems": [str(p) for p in problems], "runs": [str(r) for r in run_dirs],
               "stage_seconds": clock.seconds}
        write_text_atomic(work / "demo_result.json", json.dumps(out, indent=2))
        if verbose:
            print(f"{submission}: {'valid' if not problems else f'{len(problems)} problem(s)'}; "
                  f"no {truth_csv} to score against")
        return out
    with clock("score + cells"):
        from .cell_eval import evaluate_cells, format_cell_eval

        truth = read_truth(truth_csv)
        result = score(truth, submission)
        cells_eval = evaluate_cells(truth, submission, result.mAP)
    with clock("baselines"):
        baselines = {}
        truth_labels = _truth_image_labels(truth)
        probs_truth = {i: to_multihot(labs) for i, labs in truth_labels.items()}
        path = work / "baseline_image_truth.csv"
        write_submission(baseline_rows(test_masks, probs_truth), sample, path)
        baselines["image_truth"] = score(truth, path).mAP
        model_image = _model_image_probs(work, cfg)
        if model_image:
            path = work / "baseline_image_model.csv"
            write_submission(baseline_rows(test_masks, model_image), sample, path)
            baselines["image_model"] = score(truth, path).mAP
    with clock("report"):
        report_path = _report(run_dirs, work / "report")
    beats = all(result.mAP > v for v in baselines.values())
    out = {
        "mAP": result.mAP,
        "submission": str(submission),
        "truth": str(truth_csv),
        "baselines": baselines,
        "beats_baselines": beats,
        "recipe": recipe,
        "oracle_mAP": cells_eval["oracle_mAP"],
        "oracle_share": cells_eval["oracle_share"],
        "cell_auc": cells_eval["cell_auc"],
        "per_class_ap": {str(k): v for k, v in result.per_class_ap.items()},
        "validation_problems": [str(p) for p in problems],
        "runs": [str(r) for r in run_dirs],
        "report": str(report_path) if report_path else None,
        "overlays": str(test_masks),
        "stage_seconds": clock.seconds,
    }
    write_text_atomic(work / "demo_result.json", json.dumps(out, indent=2))
    if verbose:
        print(summary(out))
        print(format_cell_eval(cells_eval))
    return out


def _model_image_probs(work: Path, cfg: Config) -> dict[str, np.ndarray]:
    """The ensemble's image-level probabilities per test image (cells aggregated by the recipe)."""
    from .confidence import image_level
    from .predict import load_cell_probs

    per_image = load_cell_probs(work / "submission.csv")
    return {i: image_level(p, cfg.inference.image_agg, cfg.inference.topk) for i, p in per_image.items()}


def _report(run_dirs, out_dir: Path):
    try:
        from .report import build_report
    except ImportError:
        return None
    return build_report(run_dirs, out_dir)


def summary(result: dict) -> str:
    """The short report printed at the end of the demo."""
    lines = [f"mAP {result['mAP']:.4f}  (submission {result['submission']})"]
    for name, value in result["baselines"].items():
        lines.append(f"  baseline {name:<12} mAP {value:.4f}")
    if result["beats_baselines"]:
        lines.append("The model beats every image-level baseline: it learned cells, not just images.")
    else:
        lines.append("WARNING: the model does NOT beat every image-level baseline "
                     "(it has not learned more than the image labels).")
    lines.append("per-class AP:")
    for k, ap in result["per_class_ap"].items():
        shown = "   n/a" if ap is None else f"{ap:.4f}"
        lines.append(f"  {int(k):>2} {CLASS_NAMES[int(k)]:<42} {shown}")
    lines.append("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items()))
    return "\n".join(lines)
