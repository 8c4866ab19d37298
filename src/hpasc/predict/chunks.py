"""The models on crops: a chunk of cells through every member x TTA, and the image heads."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import CellsConfig
from ..labels import NUM_CLASSES
from .ensemble import Member


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


def crop_key(cells: CellsConfig) -> tuple:
    """What changes the crop pixels (members sharing it share one extraction): the crop cache's key
    (``hpasc.cells.cache_key``) as a hashable tuple."""
    from ..cells import cache_key

    return tuple(sorted(cache_key(cells).items()))


class CropTensors:
    """uint8 crops -> normalised (N, 4, S, S) tensors with each run's own eval transform, built once per
    distinct cells config."""

    def __init__(self):
        self._transforms: dict[CellsConfig, Any] = {}

    def __call__(self, crops: np.ndarray, cells: CellsConfig):
        from ..data import build_transform

        if cells not in self._transforms:
            self._transforms[cells] = build_transform(cells, train=False)
        return self._transforms[cells].batch(crops)


@dataclass
class ChunkOutput:
    probs: np.ndarray  # (n, 19) float64: weighted mean over members x TTA
    features: dict[tuple[str, str], np.ndarray]  # (member, tta) -> (n, F) pooled features (image heads)
    seconds: dict[str, float] = field(default_factory=dict)  # member -> its forward passes, all views


def predict_chunk(members: Sequence[Member], crops: dict[tuple, np.ndarray], tta: Sequence[str],
                  batch_size: int, device: str, tensors: CropTensors, head: bool = False) -> ChunkOutput:
    """All ``members`` x ``tta`` on up to ``batch_size`` cells (crop key -> (n, S, S, 4) uint8).

    The batch is zero-padded to exactly ``batch_size``: conv kernels are picked by shape, so a cell's
    output then never depends on how many cells it was batched with (a shard equals the full run bit for
    bit). Member weights are renormalised over ``members``.
    """
    import torch

    from ..models import forward

    n = len(next(iter(crops.values())))
    if n > batch_size:
        raise ValueError(f"{n} cells in a chunk of {batch_size}")
    total = sum(m.weight for m in members)
    acc = np.zeros((n, NUM_CLASSES), np.float64)
    features: dict[tuple[str, str], np.ndarray] = {}
    seconds: dict[str, float] = {}
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
                start = time.perf_counter()
                for t in tta:
                    out = forward(m.model, x, t, channels_last=True)
                    # sigmoid on the whole padded batch: vectorised and scalar tail paths round
                    # differently, so slicing first would make a cell's value depend on n
                    probs = torch.sigmoid(out["logits"].float())[:n].double().cpu().numpy()
                    acc += (m.weight / total / len(tta)) * probs
                    if head and m.has_image_head:
                        features[(m.name, t)] = out["features"][:n].float().cpu().numpy()
                seconds[m.name] = seconds.get(m.name, 0.0) + time.perf_counter() - start  # synced by .cpu()
    return ChunkOutput(acc, features, seconds)


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
