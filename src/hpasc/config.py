"""Typed experiment configs: one YAML file per experiment, loaded into frozen dataclasses.

An unknown key, a wrong type or a bad value is a ``ConfigError`` that names the file and the key.
``key.sub=value`` overrides (values parsed as YAML) apply on top of the file. ``save_config`` writes the
resolved config that a run folder keeps beside its weights; inference reads only that file.

Each section belongs to one part of the pipeline; add a field to the section that uses it (with a
default, so older run folders still load).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .fsutil import write_text_atomic


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class SourceConfig:
    """A further training source beside the competition data, e.g. public HPA images (``hpasc external``)."""

    name: str = "hpa_public"
    root: str = ""  # folder with train/ and train.csv (the competition layout)
    train_csv: str = "train.csv"  # relative to root unless absolute
    weight: float = 1.0  # sampling weight of its cells relative to the competition's (1.0)
    validate: bool = True  # False: its images in a fold's validation part are left out of that fold


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # competition data root (train/, train.csv); None -> hpasc.paths.data_root()
    train_csv: str = "train.csv"  # relative to root unless absolute
    folds_csv: str = "folds.csv"  # ID,Label,fold
    work_dir: str = "work"  # caches: masks/, cells/ (segmentation and crops are computed once)
    truth_csv: str | None = None  # cell-level truth (synthetic data) -> competition mAP in validation
    max_images: int | None = None  # use only the first N images (smoke runs)
    # further sources; the folds file then covers them all (made by `hpasc folds` over every train.csv,
    # antibodies grouped, when absent)
    sources: tuple[SourceConfig, ...] = ()


@dataclass(frozen=True)
class SegmentationConfig:
    backend: str = "classic"  # classic | hpacellseg | cellpose
    scale: float = 0.25  # working scale of the backend relative to full resolution
    min_cell_area: int = 0  # full-resolution pixels; 0 -> backend default scaled to the image
    min_nucleus_area: int = 0
    nuclei_weights: str | None = None  # hpacellseg: dpn_unet_nuclei_v1.pth
    cell_weights: str | None = None  # hpacellseg: dpn_unet_cell_3ch_v1.pth
    hpacellseg_padding: str = "auto"  # auto (pad only sizes the network cannot take) | always
    hpacellseg_fixes: tuple[str, ...] = ()  # faults of the original to fix (hpasc.segmentation.hpacellseg.FIXES)
    cellpose_model: str | None = None  # cellpose: local model file (never downloaded)
    cellpose_diameter: float | None = None  # None -> automatic
    flow_threshold: float = 0.7
    cellprob_threshold: float = -5.0
    device: str = "auto"


@dataclass(frozen=True)
class CellsConfig:
    size: int = 128  # crop side fed to the model
    padding: float = 0.05  # box padding as a fraction of the box side
    neighbours: str = "zero"  # keep | zero | blur: what happens to other cells inside the box
    selection: str = "single_label"  # single_label | all
    balance: bool = False  # class-balanced sampling
    balance_cap: float = 10.0  # max over-sampling factor of a rare class
    max_cells_per_image: int | None = None
    mean: tuple[float, ...] = (0.08, 0.08, 0.08, 0.08)  # per channel, on [0, 1] data
    std: tuple[float, ...] = (0.12, 0.12, 0.12, 0.12)
    augment: str = "standard"  # preset name: none | light | standard | strong


@dataclass(frozen=True)
class ModelConfig:
    name: str = "efficientnet_b0"  # any timm model name
    pretrained: str | None = None  # local weights file; nothing is ever downloaded
    embedding_dim: int = 128
    dropout: float = 0.2
    image_head: bool = False  # extra image-level head over the cells of an image
    drop_path_rate: float = 0.0  # stochastic depth of the timm backbone
    # extra keyword arguments of timm.create_model, e.g. {channels: [32, 64, 128, 256], stem_width: 16}
    # for a half-width ResNet (CPU budgets); the keys hpasc sets itself are refused (hpasc.models)
    timm_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    bce_weight: float = 1.0
    triplet_weight: float = 0.5  # lambda
    triplet_margin: float = 0.3
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0  # 0 -> plain BCE
    class_weights: tuple[float, ...] | None = None  # 19 values
    image_weight: float = 1.0  # BCE of the image head (model.image_head) against the image labels
    mil_weight: float = 0.0  # BCE of the cell logits pooled over each image (multiple-instance) vs its labels
    mil_pool: str = "lse"  # how an image's cell logits are pooled: lse | max | mean (hpasc.losses.MIL_POOLS)
    mil_sharpness: float = 1.0  # lse: log-mean-exp of sharpness x logits (-> max as it grows, -> mean as it shrinks)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    accum_steps: int = 1
    grad_clip: float | None = 5.0
    ema: float | None = None  # decay, e.g. 0.999
    patience: int | None = None  # early stopping on validation mAP
    seed: int = 42
    num_workers: int = 2
    amp: bool = True  # only on CUDA
    device: str = "auto"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)  # trained by --fold all
    max_steps_per_epoch: int | None = None
    out_dir: str = "runs"
    min_lr_ratio: float = 0.01  # cosine schedule ends at lr * min_lr_ratio
    checkpoint_every: int | None = 50  # optimizer steps between mid-epoch last.pt saves (resume)
    select_metric: str = "auto"  # best.pt by: auto (comp_map if data.truth_csv else map) | comp_map | map | auc
    val_batch_size: int | None = None  # None -> 2 x batch_size
    val_every: int = 1  # validate after every N-th epoch and after the last (best.pt is chosen among those)
    deterministic: bool = False  # deterministic kernels (resume reproduces an uninterrupted run bit for bit)
    threads: int | None = None  # torch CPU threads while training (None: torch's default)
    group_by_image: bool | None = None  # batches of whole images; None -> on exactly when model.image_head


@dataclass(frozen=True)
class PseudoConfig:
    """Pseudo-label rounds (``hpasc.training.pseudo``): round r trains on round r-1's out-of-fold cells."""

    rounds: int = 0  # rounds after round 0; run folders <out_dir>/<name>/round<r>/fold<k>/
    scale: str = "image_max"  # image_max | raw: out-of-fold probabilities scaled within each image
    power: float = 1.0  # sharpening exponent of the scaled probabilities
    negative: bool = True  # per-cell Negative target (1 - the cell's largest image-label target)
    weight: float = 1.0  # target = weight * pseudo + (1 - weight) * image labels
    init: str = "scratch"  # scratch | previous: round r starts from round r-1's best.pt of the same fold
    epochs: int | None = None  # epochs of rounds >= 1 (None: train.epochs)
    lr: float | None = None  # peak learning rate of rounds >= 1 (None: train.lr)


@dataclass(frozen=True)
class InferenceConfig:
    recipe: str = "cell_x_image"  # see hpasc.confidence
    alpha: float = 0.5  # exponent of the image-level probability
    image_agg: str = "mean"  # mean | max | topk | vote | head
    topk: int = 3
    border_weight: float = 0.0  # 0 -> off; down-weights border cells by relative area
    negative: str = "max"  # how class 18 is formed: keep | max | complement
    tta: tuple[str, ...] = ("none",)  # none | hflip | vflip | rot90 | rot180 | rot270
    batch_size: int = 128
    floor: float = 0.0  # confidences below are not written
    vote_threshold: float = 0.5  # image_agg vote: a cell votes for a class at this probability
    stain_negative: bool = False  # Negative also from the lack of protein signal (hpasc.confidence.stain_negative)
    stain_gate: float = 0.0  # with stain_negative: classes 0..17 scaled by stain ** stain_gate (0: off)


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    cells: CellsConfig = field(default_factory=CellsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


# --------------------------------------------------------------------------- building from dicts

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field annotation (supports the types used above)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with text keys, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


# --------------------------------------------------------------------------- value rules

@dataclass(frozen=True)
class _Rule:
    """A test on a setting's value; on a list it tests each item unless ``whole`` (e.g. a length)."""

    test: Callable[[Any], bool]
    what: str
    whole: bool = False


def _at_least(lo: float) -> _Rule:
    return _Rule(lambda v: v >= lo, f">= {lo:g}")


def _above(lo: float) -> _Rule:
    return _Rule(lambda v: v > lo, f"> {lo:g}")


def _within(lo: float, hi: float, hi_open: bool = False) -> _Rule:
    if hi_open:
        return _Rule(lambda v: lo <= v < hi, f"in [{lo:g}, {hi:g})")
    return _Rule(lambda v: lo <= v <= hi, f"in [{lo:g}, {hi:g}]")


def _length(n: int) -> _Rule:
    return _Rule(lambda v: len(v) == n, f"a list of {n} values", whole=True)


# "<Section class>.<field>" -> its rule(s); None values (where allowed) are not tested.
_RULES: dict[str, _Rule | tuple[_Rule, ...]] = {
    "DataConfig.max_images": _at_least(1),
    "SourceConfig.weight": _at_least(0),
    "SegmentationConfig.scale": _within(0.01, 1.0),
    "SegmentationConfig.min_cell_area": _at_least(0),
    "SegmentationConfig.min_nucleus_area": _at_least(0),
    "SegmentationConfig.cellpose_diameter": _above(0),
    "SegmentationConfig.flow_threshold": _at_least(0),
    "CellsConfig.size": _within(8, 1024),
    "CellsConfig.padding": _within(0, 1),
    "CellsConfig.balance_cap": _at_least(1),
    "CellsConfig.max_cells_per_image": _at_least(1),
    "CellsConfig.mean": _length(4),
    "CellsConfig.std": (_length(4), _above(0)),
    "ModelConfig.embedding_dim": _at_least(1),
    "ModelConfig.dropout": _within(0, 1, hi_open=True),
    "ModelConfig.drop_path_rate": _within(0, 1, hi_open=True),
    "LossConfig.bce_weight": _at_least(0),
    "LossConfig.triplet_weight": _at_least(0),
    "LossConfig.triplet_margin": _at_least(0),
    "LossConfig.label_smoothing": _within(0, 0.5),
    "LossConfig.focal_gamma": _at_least(0),
    "LossConfig.class_weights": (_length(19), _at_least(0)),
    "LossConfig.image_weight": _at_least(0),
    "LossConfig.mil_weight": _at_least(0),
    "LossConfig.mil_sharpness": _above(0),
    "TrainConfig.epochs": _at_least(1),
    "TrainConfig.batch_size": _at_least(1),
    "TrainConfig.lr": _at_least(0),  # 0 freezes the weights (BatchNorm statistics still move)
    "TrainConfig.weight_decay": _at_least(0),
    "TrainConfig.warmup_epochs": _at_least(0),
    "TrainConfig.accum_steps": _at_least(1),
    "TrainConfig.grad_clip": _above(0),
    "TrainConfig.ema": _within(0, 1, hi_open=True),
    "TrainConfig.patience": _at_least(1),
    "TrainConfig.num_workers": _at_least(0),
    "TrainConfig.folds": _within(0, 99),
    "TrainConfig.max_steps_per_epoch": _at_least(1),
    "TrainConfig.min_lr_ratio": _within(0, 1),
    "TrainConfig.checkpoint_every": _at_least(1),
    "TrainConfig.val_batch_size": _at_least(1),
    "TrainConfig.val_every": _at_least(1),
    "TrainConfig.threads": _at_least(1),
    "PseudoConfig.rounds": _within(0, 20),
    "PseudoConfig.power": _above(0),
    "PseudoConfig.weight": _within(0, 1),
    "PseudoConfig.epochs": _at_least(1),
    "PseudoConfig.lr": _at_least(0),
    "InferenceConfig.alpha": _at_least(0),
    "InferenceConfig.topk": _at_least(1),
    "InferenceConfig.border_weight": _within(0, 1),
    "InferenceConfig.batch_size": _at_least(1),
    "InferenceConfig.floor": _within(0, 1),
    "InferenceConfig.vote_threshold": _within(0, 1),
    "InferenceConfig.stain_gate": _at_least(0),
}

# "<Section class>.<field>" -> "module:attribute" naming the registry (a mapping or a sequence of
# names, or a function returning one) owned by the module that implements the choice. Imported only
# when a config is checked, so plug-ins registered by name are accepted like the built-ins.
CHOICES: dict[str, str] = {
    "SegmentationConfig.backend": "hpasc.segmentation.base:available_backends",
    "SegmentationConfig.hpacellseg_padding": "hpasc.segmentation.hpacellseg:PADDING_MODES",
    "SegmentationConfig.hpacellseg_fixes": "hpasc.segmentation.hpacellseg:FIXES",
    "CellsConfig.neighbours": "hpasc.cells:NEIGHBOUR_MODES",
    "CellsConfig.selection": "hpasc.data:SELECTIONS",
    "CellsConfig.augment": "hpasc.data:AUGMENTATIONS",
    "LossConfig.mil_pool": "hpasc.losses:MIL_POOLS",
    "TrainConfig.select_metric": "hpasc.training.loop:SELECT_METRICS",
    "PseudoConfig.scale": "hpasc.training.pseudo:PSEUDO_SCALES",
    "PseudoConfig.init": "hpasc.training.pseudo:PSEUDO_INITS",
    "InferenceConfig.recipe": "hpasc.confidence:RECIPES",
    "InferenceConfig.image_agg": "hpasc.confidence:IMAGE_AGGREGATIONS",
    "InferenceConfig.negative": "hpasc.confidence:NEGATIVE_MODES",
    "InferenceConfig.tta": "hpasc.tta:TTA_NAMES",
}
_DEVICE_FIELDS = {"SegmentationConfig.device", "TrainConfig.device"}


def choices(key: str) -> list[str]:
    """The accepted names of a choice setting (``"InferenceConfig.recipe"``), from its registry."""
    module, attr = CHOICES[key].split(":")
    found = getattr(importlib.import_module(module), attr)
    return list(found() if callable(found) else found)


def _check_value(key: str, value: Any, where: str) -> None:
    if value is None:
        return
    if key in _DEVICE_FIELDS:
        from .device import DeviceError, check_device_name

        try:
            check_device_name(value, where)
        except DeviceError as exc:
            raise ConfigError(str(exc)) from None
    if key in CHOICES:
        known = choices(key)
        for item in value if isinstance(value, tuple) else (value,):
            if item not in known:
                raise ConfigError(f"{where}: unknown choice {item!r}; choices: {' | '.join(known)}")
    rules = _RULES.get(key, ())
    for rule in rules if isinstance(rules, tuple) else (rules,):
        if rule.whole or not isinstance(value, tuple):
            if not rule.test(value):
                raise ConfigError(f"{where}: {value!r} is not {rule.what}")
        elif not all(rule.test(item) for item in value):
            raise ConfigError(f"{where}: every value must be {rule.what}, got {value!r}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys, bad types, values out of range and unknown
    choices are errors naming ``where`` and the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        key_where = f"{where} {k}" if where.endswith(":") else f"{where}.{k}"  # "file.yaml: train.lr"
        kwargs[k] = _coerce(v, hints[k], key_where)
        _check_value(f"{cls.__name__}.{k}", kwargs[k], key_where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict of YAML-friendly values (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "model.name=resnet50"]`` -> ``[("train.epochs", 3), ...]``."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def read_yaml_mapping(path: os.PathLike | str, what: str = "file", error: type[Exception] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping -> dict; a missing file or bad YAML raises ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML ({str(exc)[:300]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping")
    return data


def load_config(path: os.PathLike | str | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """YAML file (or none: defaults) + overrides -> typed config.

    The config's ``name`` defaults to the file's stem, so ``configs/b0.yaml`` runs in ``runs/b0/``.
    """
    data: dict = {}
    where = "config:"
    if path is not None:
        path = Path(path)
        where = f"{path}:"
        data = read_yaml_mapping(path, "config file")
        if cls is Config:
            data.setdefault("name", path.stem)
    for key, value in parse_overrides(overrides):
        _set_path(data, key, value)
    return from_dict(cls, data, where)


def replace(cfg: Any, **changes: Any) -> Any:
    """Copy of a (frozen) config with dotted-path changes: ``replace(cfg, **{"train.epochs": 2})``."""
    tree = to_dict(cfg)
    for key, value in changes.items():
        _set_path(tree, key, value)
    return from_dict(type(cfg), tree)


def save_config(cfg: Any, path: os.PathLike | str) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
