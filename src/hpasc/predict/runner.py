"""``predict``: the pipeline over the images of a sample submission (see the package docstring)."""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..confidence import stain_negative
from ..config import ConfigError, InferenceConfig, SegmentationConfig, parse_overrides
from ..config import replace as replace_config
from ..labels import NUM_CLASSES
from ..submission import read_sample
from .budget import Budget, degradation_ladder
from .chunks import CropTensors, cpu_threads, image_head_probs, predict_chunk
from .ensemble import (
    Member,
    PredictError,
    inference_config,
    load_ensemble,
    resolve_device,
)
from .image import Prepared, _row, prepare_image
from ..sharding import shard_items
from .shards import PROB_COLUMNS, _finish, parse_shard

log = logging.getLogger(__name__)


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
        self.chunks = 0  # model calls, each on exactly batch_size crops (zero-padded)
        self.member_seconds: dict[str, float] = {}
        self.cells = 0  # cells sent to the models

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
        self.chunks += 1
        for name, sec in out.seconds.items():
            self.member_seconds[name] = self.member_seconds.get(name, 0.0) + sec
        self.cells += sum(b - a for _, a, b in segments)
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
            if self.infer.stain_negative:
                probs = stain_negative(probs, p.stain, self.infer.stain_gate)
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


def _preflight(members: list[Member], infer: InferenceConfig, seg_cfg: SegmentationConfig,
               masks: Path | None, ids: Sequence[str], device: str) -> None:
    """Fail now, with the cause, on what would otherwise fail every image one by one: the segmentation
    backend (weights files, optional packages) when some image still needs segmenting, and a forward
    pass of every member on an empty batch (architecture, checkpoint, device)."""
    from ..segmentation import get_backend
    from ..segmentation.folder import mask_paths

    if masks is None or any(not mask_paths(masks, i)[0].is_file() for i in ids):
        try:
            get_backend(seg_cfg.backend, seg_cfg)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise PredictError(f"segmentation backend {seg_cfg.backend!r} cannot start: {exc}") from None
    from . import chunks

    crops = {chunks.crop_key(m.cfg.cells): np.zeros((1, m.cfg.cells.size, m.cfg.cells.size, 4), np.uint8)
             for m in members}
    try:
        chunks.predict_chunk(members, crops, ("none",), 1, device, CropTensors(), infer.image_agg == "head")
    except Exception as exc:  # noqa: BLE001 - any failure here is the setup's, not an image's
        raise PredictError(f"the models cannot run on {device}: {type(exc).__name__}: {exc}") from None


def predict(run_dirs: Sequence[str | os.PathLike], images_dir: str | os.PathLike,
            sample_submission: str | os.PathLike, out: str | os.PathLike,
            weights: str | os.PathLike | None = None, masks_dir: str | os.PathLike | None = None,
            seg_cfg: SegmentationConfig | None = None, seg_overrides: Sequence[str] | None = None,
            inference_overrides: dict[str, Any] | Sequence[str] | None = None,
            time_budget: float | None = None, shard: tuple[int, int] | str | None = None,
            workers: int = 2, device: str = "auto", stats: dict | None = None,
            bad_ids: str = "error") -> Path:
    """Predict every image of ``sample_submission`` (or of one shard) -> the validated submission ``out``.

    ``seg_cfg`` defaults to the first run's segmentation settings (then ``seg_overrides``, ``key=value``
    strings); the inference settings are the first run's, then the weights file's, then
    ``inference_overrides``. ``workers`` threads read/segment/crop ahead of the models. ``stats``, when
    given, receives seconds per stage, the failed images with their reasons, the final budget level, the
    setup seconds (loading and checks), the device, the number of members and the TTA views, the model calls
    (``chunks`` of ``batch_size`` crops, zero-padded) for the ``cells`` predicted, with each member's share
    (``member_seconds``, heaviest weight first: the order in which the time budget drops them).

    Everything that would fail every image is checked before the first one: the sample submission
    (duplicate IDs; IDs that are not plain names, unless ``bad_ids="keep"`` turns them into empty rows
    with a warning, as the Kaggle kernel does), the images folder, the runs, the device, the inference
    settings, the segmentation backend and one forward pass of every model. A problem there raises; a
    problem with one image costs only its row.
    """
    import torch
    from tqdm import tqdm

    t0 = time.monotonic()
    images_dir, sample_path, out = Path(images_dir), Path(sample_submission), Path(out)
    sample, invalid = read_sample(sample_path, bad_ids=bad_ids)
    if not images_dir.is_dir():
        raise PredictError(f"{images_dir}: images folder not found")
    shard = parse_shard(shard)
    ids = list(sample["ID"])
    mine = shard_items(ids, shard)
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
    _preflight(members, infer, seg_cfg, masks, [i for i in mine if i not in invalid], device)
    setup = time.monotonic() - t0  # model loading and the checks above
    left = None if time_budget is None else time_budget - setup
    budget = Budget(left, len(mine), degradation_ladder(len(members), infer.tta))
    run = _Run(members, infer, budget, device)
    log.info("predicting %d images with %d model(s) on %s", len(mine), len(members), device)

    def prepare(image_id: str) -> Prepared:
        if image_id in invalid:
            return Prepared(image_id, error=invalid[image_id])
        budget.update()
        if budget.current.empty:
            return Prepared(image_id, skipped=True)
        return prepare_image(images_dir, image_id, sizes[image_id], seg_cfg, crop_cfgs, masks,
                             stain=infer.stain_negative)

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
                     setup=round(setup, 3), members=len(members), tta=list(infer.tta), torch_threads=threads,
                     device=str(device),
                     chunks=run.chunks, cells=run.cells, batch_size=infer.batch_size,
                     member_seconds={m.name: round(run.member_seconds.get(m.name, 0.0), 3) for m in run.members})
    log.info("wrote %s (%d images, %d empty after problems) in %.1f s", out, len(mine), len(run.failures),
             time.monotonic() - t0)
    return out
