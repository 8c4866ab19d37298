"""The ensemble: run folders and weights files -> loaded members, and the inference settings."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (
    Config,
    InferenceConfig,
    parse_overrides,
    read_yaml_mapping,
)
from ..config import replace as replace_config
from ..runs import group_name

WEIGHTS_KEYS = ("runs", "alpha", "inference")


class PredictError(ValueError):
    """Run folders, weights files or submission parts that cannot be used; the message names the file."""


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
    """Run folders (``config.yaml`` + ``best.pt``) from arguments that are runs or folders of them
    (``hpasc.runs.find_runs``)."""
    from .. import runs

    found = runs.find_runs(run_dirs, need=(runs.BEST_FILE,), error=PredictError)
    if not found:
        raise PredictError("no run folders given")
    return found


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
    groups = [group_name(r) for r in runs]
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


def resolve_device(name: str = "auto") -> str:
    """The inference device by the project's one rule (``hpasc.device``), as a string."""
    from ..device import resolve_device as resolve

    return str(resolve(name, where="predict --device"))


def load_ensemble(run_dirs: Iterable[str | os.PathLike], weights: str | os.PathLike | None = None,
                  device: str = "auto") -> tuple[list[Member], dict[str, Any]]:
    """Run folders (+ weights file) -> (members with normalised weights, inference overrides of the
    weights file). Runs of weight 0 are not loaded."""
    import torch

    from ..models import load_run

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
        group = group_name(run)
        members.append(Member(f"{group}/{run.name}", group, run, cfg, model, w / total))
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
            key = key.removeprefix("inference.")
            changes[key] = value
    return replace_config(base, **changes) if changes else base  # choices checked as the config builds
