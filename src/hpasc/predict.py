"""Ensemble inference: test images -> segmented cells -> per-cell class confidences -> submission CSV.

``predict`` runs, for every image of the sample submission (or of one shard of it)::

    read -> segment (or read cached masks) -> crops per preprocessing -> encode masks
         -> [cells of several images batched] -> every model x TTA, weighted mean of sigmoids
         -> confidence recipe (hpasc.confidence) -> PredictionString

Reading, segmenting, cropping and encoding run in a few threads ahead of the models (numba, OpenCV and
torch release the GIL); only the crops and mask strings of an image wait for the models, never its
pixels, so memory stays bounded by a few images in flight.

**Never lose the submission.** Anything that goes wrong with one image (missing channel, unreadable PNG,
no cells, wrong size, a model returning NaN) gives that image an empty PredictionString and a warning
naming the image and the reason; the run goes on. The file is written atomically and validated at the
end; a row the validator rejects is emptied and the file rewritten.

**Time budget.** With ``time_budget`` the finish is projected from the images done so far; when it would
overrun, inference steps down a ladder of cheaper settings (no TTA, half of the models, the best model,
finally empty rows) so that a complete file is always written in time.

**Ensembles and weights.** A run folder is ``runs/<config>/fold<k>`` (``config.yaml`` + ``best.pt``);
``runs/<config>`` means all its folds. Each config is one member; its folds are averaged. The weights file
(written by ``hpasc blend``)::

    runs:            # member weight; "<config>" covers all its folds, "<config>/fold<k>" one fold
      b0: 0.7
      resnet50: 0.3
    alpha: 0.5       # optional: inference.alpha
    inference: {}    # optional: any other inference.* settings

Without it every config weighs the same. A weight of 0 leaves the run out.

**Shards.** ``shard=(i, n)`` predicts images ``i, i+n, i+2n, ...`` (0-based) of the sample submission and
writes a full-length file (other rows empty) plus ``<out>.shard.json``; ``merge`` puts the parts
together into exactly the file a single run writes.

Beside the submission, ``<out stem>.cells.csv`` keeps the ensemble's raw cell probabilities
(``ID, cell_id, p0..p18, border, rel_area``, the out-of-fold format plus two columns), read back by
``load_cell_probs``.

torch is imported only inside the functions that run models, so ``merge``, ``read_weights`` and
``load_cell_probs`` start fast.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import CellsConfig, Config, ConfigError, InferenceConfig, SegmentationConfig, parse_overrides, read_yaml_mapping
from .config import replace as replace_config
from .confidence import combine
from .fsutil import atomic_path, write_text_atomic
from .labels import NUM_CLASSES
from .submission import prediction_string, read_submission, validate_submission, write_submission

log = logging.getLogger(__name__)

PROB_COLUMNS = tuple(f"p{c}" for c in range(NUM_CLASSES))
TTA_NAMES = ("none", "hflip", "vflip", "rot90", "rot180", "rot270")
WEIGHTS_KEYS = ("runs", "alpha", "inference")


class PredictError(ValueError):
    """Run folders, weights files or submission parts that cannot be used; the message names the file."""


# =========================================================================== ensemble

@dataclass
class Member:
    """One trained fold model of the ensemble."""

    name: str  # "<config>/fold<k>"
    group: str  # "<config>"
    run_dir: Path
    cfg: Config
    model: Any  # torch.nn.Module in eval mode
    weight: float

    @property
    def has_image_head(self) -> bool:
        return getattr(self.model, "image_classifier", None) is not None


def expand_runs(run_dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Each argument is a run folder (``config.yaml`` + ``best.pt``) or a folder of them (``fold*/``)."""
    out: list[Path] = []
    for arg in run_dirs:
        path = Path(arg)
        if (path / "config.yaml").is_file():
            found = [path]
        else:
            found = sorted(p for p in path.glob("*/") if (p / "config.yaml").is_file()
                           and (p / "best.pt").is_file())
            if not found:
                raise PredictError(f"{path}: not a run folder (config.yaml + best.pt) nor a folder of them")
        for run in found:
            if not (run / "best.pt").is_file():
                raise PredictError(f"{run / 'best.pt'}: checkpoint not found")
            if run.resolve() not in {p.resolve() for p in out}:
                out.append(run)
    if not out:
        raise PredictError("no run folders given")
    return out


def read_weights(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, Any]]:
    """A weights file -> ({run or config name: weight}, inference overrides)."""
    path = Path(path)
    data = read_yaml_mapping(path, "weights file", PredictError)
    if not isinstance(data.get("runs"), dict):
        raise PredictError(f"{path}: expected a mapping with a 'runs:' mapping of name -> weight")
    unknown = sorted(set(data) - set(WEIGHTS_KEYS))
    if unknown:
        raise PredictError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(WEIGHTS_KEYS)}")
    weights = {}
    for name, value in data["runs"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PredictError(f"{path}: runs.{name}: weight must be a number >= 0, got {value!r}")
        weights[str(name)] = float(value)
    overrides = dict(data.get("inference") or {})
    if "alpha" in data:
        overrides["alpha"] = data["alpha"]
    return weights, overrides


def _member_weights(runs: list[Path], weights: dict[str, float] | None, source: str) -> list[float]:
    """Per-run weight: a config's weight is shared by its folds; a "<config>/fold<k>" entry is the
    fold's own. Without a weights file, every config weighs 1."""
    groups = [r.parent.name for r in runs]
    out = []
    for run, group in zip(runs, groups):
        n_folds = groups.count(group)
        if weights is None:
            out.append(1.0 / n_folds)
        elif f"{group}/{run.name}" in weights:
            out.append(weights[f"{group}/{run.name}"])
        elif group in weights:
            out.append(weights[group] / n_folds)
        else:
            raise PredictError(f"{source}: no weight for run {group}/{run.name} (add '{group}:' under runs)")
    if not sum(out) > 0:
        raise PredictError(f"{source}: all run weights are 0")
    return out


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def cpu_threads(device: str, workers: int):
    """On CPU, give torch the cores the reading threads leave (at least one) for the duration.

    torch's OpenMP threads wait for each other at every layer; when another thread takes one of their
    cores they stall — measured 6-10x slower per cell with 2 torch threads beside busy reading threads on
    2 cores, against 1 torch thread pipelining with them.
    """
    import torch

    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cpus() - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_ensemble(run_dirs: Iterable[str | os.PathLike], weights: str | os.PathLike | None = None,
                  device: str = "auto") -> tuple[list[Member], dict[str, Any]]:
    """Run folders (+ weights file) -> (members with normalised weights, inference overrides of the
    weights file). Runs of weight 0 are not loaded."""
    import torch

    from .models import load_run

    runs = expand_runs(run_dirs)
    table, overrides = read_weights(weights) if weights else (None, {})
    raw = _member_weights(runs, table, str(weights))
    total = sum(raw)
    device = resolve_device(device)
    members = []
    for run, w in zip(runs, raw):
        if w == 0:
            continue
        cfg, model = load_run(run, device=device)
        model = model.to(memory_format=torch.channels_last)  # ~1.6x faster convs on CPU, tensor cores on GPU
        members.append(Member(f"{run.parent.name}/{run.name}", run.parent.name, run, cfg, model, w / total))
    return members, overrides


def inference_config(base: InferenceConfig, *overrides: dict[str, Any] | Sequence[str] | None) -> InferenceConfig:
    """``base`` with overrides applied in order: mappings or ``key=value`` strings (an optional
    ``inference.`` prefix is accepted)."""
    changes: dict[str, Any] = {}
    for item in overrides:
        if not item:
            continue
        pairs = item.items() if isinstance(item, dict) else parse_overrides(list(item))
        for key, value in pairs:
            key = key[len("inference."):] if key.startswith("inference.") else key
            changes[key] = value
    cfg = replace_config(base, **changes) if changes else base
    bad = [t for t in cfg.tta if t not in TTA_NAMES]
    if bad:
        raise ConfigError(f"inference.tta: unknown {', '.join(bad)}; use {' | '.join(TTA_NAMES)}")
    return cfg


# =========================================================================== models on crops

def apply_tta(x, name: str):
    """A test-time augmentation of an (N, C, S, S) batch. Square crops, so rotations keep the shape."""
    import torch

    if name == "none":
        return x
    if name == "hflip":
        return torch.flip(x, dims=(3,))
    if name == "vflip":
        return torch.flip(x, dims=(2,))
    if name.startswith("rot"):
        return torch.rot90(x, k=int(name[3:]) // 90, dims=(2, 3))
    raise ValueError(f"unknown TTA {name!r}; use {' | '.join(TTA_NAMES)}")


def crop_key(cells: CellsConfig) -> tuple:
    """What changes the crop pixels (members sharing it share one extraction)."""
    return (int(cells.size), float(cells.padding), str(cells.neighbours))


class CropTensors:
    """uint8 crops -> normalised (N, 4, S, S) tensors with each run's own eval transform, built once per
    distinct cells config."""

    def __init__(self):
        self._transforms: dict[CellsConfig, Any] = {}

    def __call__(self, crops: np.ndarray, cells: CellsConfig):
        from .data import build_transform

        if cells not in self._transforms:
            self._transforms[cells] = build_transform(cells, train=False)
        return self._transforms[cells].batch(crops)


@dataclass
class ChunkOutput:
    probs: np.ndarray  # (n, 19) float64: weighted mean over members x TTA
    features: dict[tuple[str, str], np.ndarray]  # (member, tta) -> (n, F) pooled features (image heads)


def predict_chunk(members: Sequence[Member], crops: dict[tuple, np.ndarray], tta: Sequence[str],
                  batch_size: int, device: str, tensors: CropTensors, head: bool = False) -> ChunkOutput:
    """All ``members`` x ``tta`` on up to ``batch_size`` cells (crop key -> (n, S, S, 4) uint8).

    The batch is zero-padded to exactly ``batch_size``: conv kernels are picked by shape, so a cell's
    output then never depends on how many cells it was batched with (a shard equals the full run bit for
    bit). Member weights are renormalised over ``members``.
    """
    import torch

    n = len(next(iter(crops.values())))
    if n > batch_size:
        raise ValueError(f"{n} cells in a chunk of {batch_size}")
    total = sum(m.weight for m in members)
    acc = np.zeros((n, NUM_CLASSES), np.float64)
    features: dict[tuple[str, str], np.ndarray] = {}
    cuda = device.startswith("cuda")
    by_cells: dict[CellsConfig, list[Member]] = {}
    for m in members:
        by_cells.setdefault(m.cfg.cells, []).append(m)
    with torch.inference_mode():
        for cells_cfg, group in by_cells.items():
            c = crops[crop_key(cells_cfg)]
            padded = np.zeros((batch_size,) + c.shape[1:], np.uint8)
            padded[:n] = c
            x = tensors(padded, cells_cfg)
            x = (x.pin_memory() if cuda else x).to(device, non_blocking=True)
            for m in group:
                for t in tta:
                    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16, enabled=cuda):
                        out = m.model(apply_tta(x, t).contiguous(memory_format=torch.channels_last))
                    # sigmoid on the whole padded batch: vectorised and scalar tail paths round
                    # differently, so slicing first would make a cell's value depend on n
                    probs = torch.sigmoid(out["logits"].float())[:n].double().cpu().numpy()
                    acc += (m.weight / total / len(tta)) * probs
                    if head and m.has_image_head:
                        features[(m.name, t)] = out["features"][:n].float().cpu().numpy()
    return ChunkOutput(acc, features)


def image_head_probs(members: Sequence[Member], sums: dict[tuple[str, str], np.ndarray],
                     counts: dict[tuple[str, str], int], device: str) -> np.ndarray | None:
    """Image-level probabilities (19,) from the image heads: each head sees the mean pooled features of
    the image's cells (what ``CellClassifier.image_logits`` pools), averaged over TTA and members."""
    import torch

    by_member: dict[str, list[np.ndarray]] = {}
    for (name, _t), total in sums.items():
        by_member.setdefault(name, []).append(total / max(1, counts[(name, _t)]))
    used = [m for m in members if m.name in by_member]
    if not used:
        return None
    weight = sum(m.weight for m in used)
    out = np.zeros(NUM_CLASSES, np.float64)
    with torch.inference_mode():
        for m in used:
            for mean in by_member[m.name]:
                feats = torch.from_numpy(mean[None].astype(np.float32)).to(device)
                logits = m.model.image_logits(feats, torch.zeros(1, dtype=torch.long, device=device))
                prob = torch.sigmoid(logits.float()).double().cpu().numpy()[0]
                out += (m.weight / weight / len(by_member[m.name])) * prob
    return out.astype(np.float32)


# =========================================================================== one image

@dataclass
class Prepared:
    """One image ready for the models: its crops and mask strings (the pixels are gone)."""

    image_id: str
    error: str | None = None
    skipped: bool = False
    crops: dict[tuple, np.ndarray] = field(default_factory=dict)
    cell_ids: np.ndarray | None = None
    encodings: dict[int, str] = field(default_factory=dict)
    border: np.ndarray | None = None
    rel_area: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return 0 if self.cell_ids is None else len(self.cell_ids)


def _segment(image: np.ndarray, image_id: str, seg_cfg: SegmentationConfig, masks_dir: Path | None):
    """Cached masks when present, else segment (and cache when ``masks_dir`` is given)."""
    from .segmentation import Segmentation, cell_stats, read_masks, segment
    from .segmentation.folder import mask_paths, write_masks

    if masks_dir is not None and mask_paths(masks_dir, image_id)[0].is_file():
        cells, nuclei = read_masks(masks_dir, image_id)
        return Segmentation(cells, nuclei, *cell_stats(cells))
    seg = segment(image, seg_cfg)
    if masks_dir is not None:
        write_masks(masks_dir, image_id, seg)
    return seg


def prepare_image(images_dir: Path, image_id: str, size: tuple[int, int], seg_cfg: SegmentationConfig,
                  crop_cfgs: Sequence[CellsConfig], masks_dir: Path | None = None) -> Prepared:
    """Read, segment, crop and encode one image. Failures become ``Prepared.error`` (never raised)."""
    from .cells import extract_crops
    from .io import read_image
    from .rle import encode_label_map

    out = Prepared(image_id)
    clock = time.perf_counter
    try:
        t = clock()
        image = read_image(images_dir, image_id)
        out.seconds["read"] = clock() - t
        if image.shape[:2] != size:
            out.error = (f"image is {image.shape[1]}x{image.shape[0]} px but the sample submission says "
                         f"{size[1]}x{size[0]}")
            return out
        t = clock()
        seg = _segment(image, image_id, seg_cfg, masks_dir)
        out.seconds["segment"] = clock() - t
        cells = np.asarray(seg.cells)
        if cells.shape != size:
            out.error = f"segmentation has shape {cells.shape}, image {size}"
            return out
        t = clock()
        out.encodings = encode_label_map(cells)
        out.seconds["encode"] = clock() - t
        if not out.encodings:
            out.error = "no cells found"
            return out
        t = clock()
        # row k of the crops and of border/rel_area is cell k+1; an id without pixels (not in a
        # consecutive map, but cheap to guard) has no mask and is left out
        ids = np.array(sorted(out.encodings), np.int64)
        for cells_cfg in crop_cfgs:
            key = crop_key(cells_cfg)
            if key not in out.crops:
                crops = extract_crops(image, cells, cells_cfg.size, cells_cfg.padding, cells_cfg.neighbours)
                out.crops[key] = crops[ids - 1]
        del image
        out.seconds["crop"] = clock() - t
        out.cell_ids = ids
        out.border = np.asarray(seg.border, bool)[ids - 1]
        out.rel_area = np.asarray(seg.rel_area, np.float32)[ids - 1]
    except Exception as exc:  # one image must never stop the run
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def image_prediction_string(cells_label_map: np.ndarray, cell_probs: np.ndarray, infer_cfg: InferenceConfig,
                            border: np.ndarray | None = None, rel_area: np.ndarray | None = None,
                            image_probs: np.ndarray | None = None) -> str:
    """One image's label map + cell probabilities -> its PredictionString.

    Row ``k`` of ``cell_probs`` belongs to the k-th smallest cell id of the map (cell k+1 of a consecutive
    map). The confidence recipe of ``infer_cfg`` is applied, classes under ``infer_cfg.floor`` dropped.
    """
    from .rle import encode_label_map

    encodings = encode_label_map(np.asarray(cells_label_map))
    ids = np.array(sorted(encodings), np.int64)
    probs = np.asarray(cell_probs, np.float32)
    if probs.shape != (len(ids), NUM_CLASSES):
        raise ValueError(f"cell_probs has shape {probs.shape}; the label map has {len(ids)} cells")
    return _row(encodings, ids, probs, infer_cfg, border, rel_area, image_probs)


def _row(encodings: dict[int, str], ids: np.ndarray, probs: np.ndarray, infer_cfg: InferenceConfig,
         border, rel_area, image_probs) -> str:
    if len(ids) == 0:
        return ""
    conf = combine(probs, infer_cfg, border, rel_area, image_probs)
    return prediction_string(encodings, conf, ids, infer_cfg.floor)


# =========================================================================== time budget

@dataclass(frozen=True)
class Level:
    """A rung of the degradation ladder: how many members (best weights first) and which TTA."""

    n_members: int
    tta: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return self.n_members == 0


def degradation_ladder(n_members: int, tta: Sequence[str]) -> list[Level]:
    """Full settings, then no TTA, then half of the members, then the best one, then empty rows."""
    tta = tuple(tta) or ("none",)
    plain = ("none",)
    rungs = [Level(n_members, tta), Level(n_members, plain), Level(max(1, math.ceil(n_members / 2)), plain),
             Level(1, plain), Level(0, plain)]
    out: list[Level] = []
    for rung in rungs:
        if rung not in out:
            out.append(rung)
    return out


class Budget:
    """Projects the finish from the images done at the current level and steps down the ladder when the
    projection passes the deadline (the budget minus a reserve for writing and validating the file)."""

    def __init__(self, seconds: float | None, n_images: int, ladder: list[Level],
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.ladder = ladder
        self.clock = clock
        self.start = clock()
        self.n_images = n_images
        self.level = 0
        self.done = 0
        # writing + validating ~ milliseconds per row; keep a margin that grows with the file
        self.reserve = 0.0 if seconds is None else min(0.1 * seconds, 5.0 + 0.02 * n_images)
        self._level_start = self.start
        self._level_done = 0
        self._lock = threading.RLock()

    @property
    def current(self) -> Level:
        return self.ladder[self.level]

    @property
    def deadline(self) -> float:
        return math.inf if self.seconds is None else self.start + self.seconds - self.reserve

    def projected_finish(self) -> float | None:
        """Now + the remaining images at the current level's measured rate (None before any image)."""
        if not self._level_done:
            return None
        now = self.clock()
        rate = (now - self._level_start) / self._level_done
        return now + rate * (self.n_images - self.done)

    def tick(self, n: int = 1) -> None:
        """``n`` more images finished; step down when the projection overruns."""
        with self._lock:
            self.done += n
            self._level_done += n
        self.update()

    def update(self) -> None:
        """Past the deadline: empty rows. Else one rung down when the projection overruns; the next rung
        is measured on images of its own before it can be judged (a cheaper level's speed is unknown)."""
        if self.seconds is None:
            return
        with self._lock:  # the reading threads ask too
            now = self.clock()
            if now >= self.deadline:
                self._set(len(self.ladder) - 1, now)
                return
            finish = self.projected_finish()
            if finish is not None and finish > self.deadline and self.level < len(self.ladder) - 1:
                self._set(self.level + 1, now)

    def _set(self, level: int, now: float) -> None:
        if level == self.level:
            return
        log.warning("time budget: projected finish after the budget of %.0f s; switching to %s",
                    self.seconds, _describe(self.ladder[level]))
        self.level = level
        self._level_start = now
        self._level_done = 0


def _describe(level: Level) -> str:
    if level.empty:
        return "empty rows for the remaining images"
    return f"{level.n_members} model(s), TTA {'/'.join(level.tta)}"


# =========================================================================== the run

def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"1/4"`` -> (1, 4): shard 1 (0-based) of 4."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise PredictError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    else:
        i, n = text
    if not (n >= 1 and 0 <= i < n):
        raise PredictError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n (0-based)")
    return i, n


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[str], Prepared], ids: Sequence[str],
              window: int) -> Iterator[Prepared]:
    """``fn`` over ``ids`` in the pool, at most ``window`` in flight, results in order."""
    pending = []
    it = iter(ids)
    for image_id in it:
        pending.append(pool.submit(fn, image_id))
        if len(pending) >= window:
            break
    while pending:
        result = pending.pop(0).result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


@dataclass
class _Pending:
    """An image whose cells are (partly) waiting for the models."""

    prep: Prepared
    probs: np.ndarray  # (n, 19) filled chunk by chunk
    sent: int = 0  # cells handed to a chunk
    done: int = 0  # cells predicted
    failed: bool = False
    head_sums: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    head_counts: dict[tuple[str, str], int] = field(default_factory=dict)


class _Run:
    """The model side of one ``predict`` call: cells of consecutive images queue up and go through the
    models in chunks of exactly ``batch_size``; an image's row is made when its last cell is back."""

    def __init__(self, members: list[Member], infer: InferenceConfig, budget: Budget, device: str):
        self.members = sorted(members, key=lambda m: -m.weight)  # the ladder keeps the heaviest
        self.infer = infer
        self.budget = budget
        self.device = device
        self.head = infer.image_agg == "head"
        self.tensors = CropTensors()
        self.queue: deque[_Pending] = deque()
        self.unsent = 0
        self.rows: dict[str, str] = {}
        self.cell_frames: list[pd.DataFrame] = []
        self.seconds: dict[str, float] = {}
        self.failures: dict[str, str] = {}

    def _time(self, stage: str, start: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def fail(self, image_id: str, reason: str) -> None:
        log.warning("image %s: %s; writing an empty prediction for it", image_id, reason)
        self.rows[image_id] = ""
        self.failures[image_id] = reason
        self.budget.tick()

    def add(self, prep: Prepared) -> None:
        self.queue.append(_Pending(prep, np.zeros((prep.n_cells, NUM_CLASSES), np.float64)))
        self.unsent += prep.n_cells
        while self.unsent >= self.infer.batch_size:
            self._chunk()

    def finish(self) -> None:
        while self.unsent > 0:
            self._chunk()
        self._complete()

    def _take(self, k: int) -> list[tuple[_Pending, int, int]]:
        """The next ``k`` unsent cells as (image, start, end) segments, in queue order."""
        segments = []
        for item in self.queue:
            if k == 0:
                break
            if item.failed or item.sent == item.prep.n_cells:
                continue
            end = min(item.prep.n_cells, item.sent + k)
            segments.append((item, item.sent, end))
            k -= end - item.sent
            self.unsent -= end - item.sent
            item.sent = end
        return segments

    def _drop(self, item: _Pending, reason: str) -> None:
        self.unsent -= item.prep.n_cells - item.sent
        item.sent, item.failed = item.prep.n_cells, True
        self.fail(item.prep.image_id, reason)

    def _chunk(self) -> None:
        segments = self._take(self.infer.batch_size)
        if not segments:  # nothing left to send (cannot happen while the counts agree)
            self.unsent = 0
            return
        self.budget.update()
        level = self.budget.current
        if level.empty:
            for item, _, _ in segments:
                if not item.failed:
                    self._drop(item, "skipped: time budget exhausted")
            self._complete()
            return
        t = time.perf_counter()
        keys = segments[0][0].prep.crops.keys()
        crops = {k: np.concatenate([item.prep.crops[k][a:b] for item, a, b in segments]) for k in keys}
        try:
            out = predict_chunk(self.members[:level.n_members], crops, level.tta, self.infer.batch_size,
                                self.device, self.tensors, self.head)
        except Exception as exc:  # noqa: BLE001 - a model failure costs the images of this chunk only
            for item, _, _ in segments:
                if not item.failed:
                    self._drop(item, f"model error {type(exc).__name__}: {exc}")
            self._complete()
            return
        self._time("model", t)
        row = 0
        for item, a, b in segments:
            item.probs[a:b] = out.probs[row:row + b - a]
            for key, feats in out.features.items():
                item.head_sums[key] = item.head_sums.get(key, 0.0) + feats[row:row + b - a].sum(axis=0)
                item.head_counts[key] = item.head_counts.get(key, 0) + b - a
            item.done += b - a
            row += b - a
        self._complete()

    def _complete(self) -> None:
        """Rows for the images at the front of the queue whose cells are all back."""
        while self.queue and (self.queue[0].failed or self.queue[0].done == self.queue[0].prep.n_cells):
            item = self.queue.popleft()
            if not item.failed:
                self._finish_image(item)

    def _finish_image(self, item: _Pending) -> None:
        t = time.perf_counter()
        p = item.prep
        probs = item.probs.astype(np.float32)
        image = image_head_probs(self.members, item.head_sums, item.head_counts, self.device) if self.head else None
        if not np.isfinite(probs).all() or (image is not None and not np.isfinite(image).all()):
            self.fail(p.image_id, "the models returned NaN/inf probabilities")
            return
        if self.head and image is None:
            self.fail(p.image_id, "no image-head output (inference.image_agg: head)")
            return
        try:
            self.rows[p.image_id] = _row(p.encodings, p.cell_ids, probs, self.infer, p.border, p.rel_area, image)
        except Exception as exc:  # noqa: BLE001 - e.g. a recipe that rejects these values
            self.fail(p.image_id, f"confidence recipe failed ({type(exc).__name__}: {exc})")
            return
        self._keep_probs(p, probs)
        self.budget.tick()
        self._time("combine", t)

    def _keep_probs(self, p: Prepared, probs: np.ndarray) -> None:
        frame = pd.DataFrame(probs, columns=list(PROB_COLUMNS))
        frame.insert(0, "cell_id", p.cell_ids)
        frame.insert(0, "ID", p.image_id)
        frame["border"] = p.border if p.border is not None else False
        frame["rel_area"] = p.rel_area if p.rel_area is not None else 1.0
        self.cell_frames.append(frame)


def predict(run_dirs: Sequence[str | os.PathLike], images_dir: str | os.PathLike,
            sample_submission: str | os.PathLike, out: str | os.PathLike,
            weights: str | os.PathLike | None = None, masks_dir: str | os.PathLike | None = None,
            seg_cfg: SegmentationConfig | None = None, seg_overrides: Sequence[str] | None = None,
            inference_overrides: dict[str, Any] | Sequence[str] | None = None,
            time_budget: float | None = None, shard: tuple[int, int] | str | None = None,
            workers: int = 2, device: str = "auto", stats: dict | None = None) -> Path:
    """Predict every image of ``sample_submission`` (or of one shard) -> the validated submission ``out``.

    ``seg_cfg`` defaults to the first run's segmentation settings (then ``seg_overrides``, ``key=value``
    strings); the inference settings are the first run's, then the weights file's, then
    ``inference_overrides``. ``workers`` threads read/segment/crop ahead of the models. ``stats``, when
    given, receives seconds per stage, the failed images with their reasons and the final budget level.
    """
    import torch
    from tqdm import tqdm

    t0 = time.monotonic()
    images_dir, sample_path, out = Path(images_dir), Path(sample_submission), Path(out)
    sample = read_submission(sample_path, kind="sample submission")
    shard = parse_shard(shard)
    ids = list(sample["ID"])
    mine = ids[shard[0]::shard[1]] if shard else ids
    sizes = {r.ID: (int(r.ImageHeight), int(r.ImageWidth)) for r in sample.itertuples(index=False)}
    device = resolve_device(device)
    members, weight_overrides = load_ensemble(run_dirs, weights, device)
    infer = inference_config(members[0].cfg.inference, weight_overrides, inference_overrides)
    if infer.image_agg == "head" and not any(m.has_image_head for m in members):
        raise ConfigError("inference.image_agg is 'head' but none of the runs has an image head")
    seg_cfg = seg_cfg or members[0].cfg.segmentation
    if seg_overrides:
        seg_cfg = replace_config(seg_cfg, **dict(parse_overrides(list(seg_overrides))))
    crop_cfgs = [m.cfg.cells for m in members]
    masks = Path(masks_dir) if masks_dir else None
    left = None if time_budget is None else time_budget - (time.monotonic() - t0)  # after model loading
    budget = Budget(left, len(mine), degradation_ladder(len(members), infer.tta))
    run = _Run(members, infer, budget, device)
    log.info("predicting %d images with %d model(s) on %s", len(mine), len(members), device)

    def prepare(image_id: str) -> Prepared:
        budget.update()
        if budget.current.empty:
            return Prepared(image_id, skipped=True)
        return prepare_image(images_dir, image_id, sizes[image_id], seg_cfg, crop_cfgs, masks)

    workers = max(1, int(workers))
    with cpu_threads(device, workers), ThreadPoolExecutor(workers) as pool:
        threads = torch.get_num_threads()
        for p in tqdm(_prefetch(pool, prepare, mine, 2 * workers), total=len(mine), desc="predict",
                      disable=None):
            for stage, sec in p.seconds.items():
                run.seconds[stage] = run.seconds.get(stage, 0.0) + sec
            if p.skipped or p.error:
                run.fail(p.image_id, p.error or "skipped: time budget exhausted")
            else:
                run.add(p)
        run.finish()
    rows = {i: run.rows.get(i, "") for i in ids}
    _finish(rows, sample_path, out, run.cell_frames, shard, mine)
    if stats is not None:
        stats.update(seconds={k: round(v, 3) for k, v in run.seconds.items()}, images=len(mine),
                     failed=dict(run.failures), level=budget.level, total=round(time.monotonic() - t0, 3),
                     torch_threads=threads)
    log.info("wrote %s (%d images, %d empty after problems) in %.1f s", out, len(mine), len(run.failures),
             time.monotonic() - t0)
    return out


# =========================================================================== writing, shards, merge

def cells_path(out: str | os.PathLike) -> Path:
    """``submissions/x.csv`` -> ``submissions/x.cells.csv`` (the raw cell probabilities)."""
    out = Path(out)
    return out.with_name(out.stem + ".cells.csv")


def shard_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shard.json")


def write_validated(rows: dict[str, str], sample_csv: Path, out: Path) -> None:
    """Write the submission atomically and validate it; rows the validator rejects are emptied (with a
    warning) and the file rewritten, so the result is always a valid file."""
    write_submission(rows, sample_csv, out)
    problems = validate_submission(out, sample_csv)
    if not problems:
        return
    for problem in problems:
        log.warning("%s: %s", out, problem)
    fatal = [p for p in problems if p.row == 0 or p.image_id not in rows]
    if fatal:  # a file-level problem (header, IDs) is a bug, not a bad row
        raise PredictError(f"{out}: the written submission is invalid: {fatal[0]}")
    bad = {p.image_id for p in problems}
    for image_id in bad:
        rows[image_id] = ""
    write_submission(rows, sample_csv, out)
    problems = validate_submission(out, sample_csv)
    if problems:
        raise PredictError(f"{out}: the written submission is invalid: {problems[0]}")


def _write_cells(frames: list[pd.DataFrame], path: Path) -> None:
    columns = ["ID", "cell_id", *PROB_COLUMNS, "border", "rel_area"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    with atomic_path(path) as tmp:
        df[columns].to_csv(tmp, index=False, float_format="%.6g")


def _finish(rows: dict[str, str], sample_csv: Path, out: Path, frames: list[pd.DataFrame],
            shard: tuple[int, int] | None, mine: list[str]) -> None:
    write_validated(rows, sample_csv, out)
    _write_cells(frames, cells_path(out))
    if shard:
        write_text_atomic(shard_path(out), json.dumps({"shard": list(shard), "ids": mine}))


def _read_part(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PredictError(f"{path}: submission part not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != ["ID", "ImageWidth", "ImageHeight", "PredictionString"]:
        raise PredictError(f"{path}: not a submission (columns {list(df.columns)})")
    return df


def _owned_ids(part: Path, df: pd.DataFrame, shards: dict[int, Path], n_seen: set[int]) -> set[str]:
    """The IDs a part predicted: from its ``.shard.json``, else its non-empty rows."""
    meta = shard_path(part)
    if not meta.is_file():
        return set(df.loc[df["PredictionString"] != "", "ID"])
    info = json.loads(meta.read_text())
    i, n = info["shard"]
    if i in shards:
        raise PredictError(f"{part}: shard {i}/{n} was already given as {shards[i]}")
    shards[i] = part
    n_seen.add(n)
    return set(info["ids"])


def merge(out: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> Path:
    """Shard outputs -> one submission, identical to a single run over all images.

    All parts must list the same images (they are full-length files). Each image's row is taken from the
    part that predicted it (its ``.shard.json``; without one, the part whose row is non-empty). With
    shard files every shard 0..n-1 must be present exactly once.
    """
    out = Path(out)
    paths = [Path(p) for p in parts]
    if not paths:
        raise PredictError("merge: no parts given")
    frames = [_read_part(p) for p in paths]
    base = frames[0]
    for p, df in zip(paths[1:], frames[1:]):
        if not df[["ID", "ImageWidth", "ImageHeight"]].equals(base[["ID", "ImageWidth", "ImageHeight"]]):
            raise PredictError(f"{p}: lists other images or sizes than {paths[0]}")
    rows = {i: "" for i in base["ID"]}
    owner: dict[str, Path] = {}
    shards: dict[int, Path] = {}
    n_seen: set[int] = set()
    for p, df in zip(paths, frames):
        owned = _owned_ids(p, df, shards, n_seen)
        for image_id, text in zip(df["ID"], df["PredictionString"]):
            if image_id not in owned:
                continue
            if image_id in owner:
                raise PredictError(f"{p}: image {image_id} was already predicted by {owner[image_id]}")
            owner[image_id] = p
            rows[image_id] = text
    if shards:
        if len(n_seen) != 1:
            raise PredictError(f"merge: parts come from different shardings (n = {sorted(n_seen)})")
        (n,) = n_seen
        missing = sorted(set(range(n)) - set(shards))
        if missing or len(shards) != len(paths):
            raise PredictError(f"merge: shard(s) {missing} of {n} missing" if missing else
                               "merge: mixing parts with and without .shard.json")
    write_validated(rows, paths[0], out)
    cell_files = [cells_path(p) for p in paths]
    if all(f.is_file() for f in cell_files):
        frames = [pd.read_csv(f, dtype={"ID": str}) for f in cell_files]
        order = {image_id: k for k, image_id in enumerate(base["ID"])}
        cells = pd.concat(frames, ignore_index=True)
        cells = cells.iloc[np.lexsort((cells["cell_id"].to_numpy(), cells["ID"].map(order).to_numpy()))]
        _write_cells([cells], cells_path(out))
    return out


def load_cell_probs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The raw ensemble probabilities saved beside a submission (or the ``.cells.csv`` itself) ->
    {image ID: (n_cells, 19) float32, rows by ascending cell id}."""
    path = Path(path)
    if not path.name.endswith(".cells.csv"):
        path = cells_path(path)
    if not path.is_file():
        raise PredictError(f"{path}: cell probabilities not found (written by hpasc predict)")
    df = pd.read_csv(path, dtype={"ID": str})
    missing = [c for c in ("ID", "cell_id", *PROB_COLUMNS) if c not in df.columns]
    if missing:
        raise PredictError(f"{path}: missing column(s) {', '.join(missing)}")
    df = df.sort_values(["ID", "cell_id"], kind="stable")
    probs = df[list(PROB_COLUMNS)].to_numpy(np.float32)
    out = {}
    for image_id, rows in df.groupby("ID", sort=False).indices.items():
        out[image_id] = probs[rows]
    return out


# =========================================================================== Kaggle

def predict_kaggle(time_budget: float | None = None, workers: int | None = None) -> Path:
    """The kernel's whole job: competition test images + the models dataset -> working/submission.csv.

    Runs are the ``<config>/fold<k>`` folders of the models dataset; its ``weights.yaml`` is used when
    present. ``$HPASC_TIME_BUDGET`` (seconds) overrides the default budget (8 h of the 9 h limit).
    """
    from .paths import COMPETITION, MODELS_DATASET, kaggle_input, kaggle_working

    comp, models = kaggle_input(COMPETITION), kaggle_input(MODELS_DATASET)
    # any depth: a dataset uploaded from a parent folder gains a level
    runs = sorted(p.parent for p in models.rglob("best.pt") if (p.parent / "config.yaml").is_file())
    if not runs:
        raise PredictError(f"{models}: no <config>/fold<k>/ run (config.yaml + best.pt) in the models dataset")
    weights = sorted(models.rglob("weights.yaml"), key=lambda p: len(p.parts))
    budget = time_budget or float(os.environ.get("HPASC_TIME_BUDGET") or 8 * 3600)
    return predict(runs, comp / "test", comp / "sample_submission.csv", kaggle_working() / "submission.csv",
                   weights=weights[0] if weights else None, time_budget=budget,
                   workers=workers or min(4, os.cpu_count() or 1))
