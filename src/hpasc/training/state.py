"""What a run carries between steps and across a restart: LR schedule, EMA, RNG states, checkpoints.

Checkpoints hold tensors and plain Python data only, so they load with ``torch.load(weights_only=True)``
(no pickled classes: numpy RNG arrays are stored as tensors).
"""
from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fsutil import atomic_path

CHECKPOINT_FORMAT = 1


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then cosine.

    Warm-up rises from 1/warmup to 1 over ``warmup_steps``; the cosine falls from 1 to ``min_ratio`` at
    ``total_steps``. A pure function of the step, so resuming needs no scheduler state.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ModelEma:
    """Exponential moving average of a model's weights (evaluated instead of the raw weights).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            new = source[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(d).add_(new.to(value.dtype), alpha=1.0 - d)
            else:
                value.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


# --------------------------------------------------------------------------- RNG states

def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants nested tuples (a round trip may hand back lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoint files

def save_checkpoint(state: dict[str, Any], path: os.PathLike | str) -> None:
    """Atomic ``torch.save``: a run killed while saving keeps its previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or is not one of hpasc's (names the file)."""


def load_checkpoint(path: os.PathLike | str, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated or foreign files raise several types
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an hpasc checkpoint (no model weights)")
    return state
