"""Cell classifiers: a timm backbone on 4-channel crops with a 19-logit head and an embedding head.

``build_model(cfg.model)`` works with any timm model name (the production configs use
``efficientnet_b0`` … ``efficientnet_b7`` and ``resnet50``). The backbone sees (red, green, blue,
yellow) crops, so its first convolution has 4 input channels. Pretrained weights come **only** from the
local file named in ``model.pretrained``: a timm/ImageNet state dict (timm adapts the 3-channel stem to 4
channels when it loads the file) or a checkpoint of one of our own runs (fine-tuning). Nothing is ever
downloaded — a missing file is an error, not a fallback.

``forward(x)`` returns a dict:
- ``logits`` (B, 19): the cell classifier;
- ``embedding`` (B, D), L2-normalised: what the batch-hard triplet loss pulls together/apart;
- ``features`` (B, F): the pooled backbone features (used by the optional image head);
- ``image_logits`` (G, 19): only with ``model.image_head`` and ``forward(x, groups)``, where ``groups``
  (B,) numbers the image each cell comes from (0..G-1). The image head mean-pools the features of an
  image's cells — the dual cell/image-level head of the 2nd-place solution. Training runs with an image
  head draw batches of whole images (``training.sampling.EpochSampler(groups=...)``), since random
  batches rarely hold two cells of one image and the head would only ever see single cells.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig, load_config, replace
from .labels import NUM_CLASSES
from .runs import BEST_FILE, CONFIG_FILE, LAST_FILE
from .tta import apply_tta

IN_CHANS = 4
# The architectures with a production config in configs/ (any other timm name works as well).
ARCHITECTURES: tuple[str, ...] = tuple(f"efficientnet_b{i}" for i in range(8)) + ("resnet50",)


class ModelError(ValueError):
    """A model config or weights file that cannot be used. Names the file or model."""


def segment_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Row means of ``values`` (B, F) per group id (B,) in 0..G-1 -> (G, F); an empty group gives 0."""
    groups = groups.long()
    n_groups = int(groups.max().item()) + 1 if groups.numel() else 0
    sums = values.new_zeros(n_groups, values.shape[1]).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=n_groups).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]


class CellClassifier(nn.Module):
    """timm backbone (global-pooled features) + cell classifier + embedding (+ optional image head)."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int = NUM_CLASSES,
                 embedding_dim: int = 128, dropout: float = 0.2, image_head: bool = False):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)
        # A separate projection keeps the metric-learning geometry from fighting the classifier;
        # embedding_dim 0 uses the pooled features themselves.
        self.embedder = nn.Linear(num_features, embedding_dim) if embedding_dim > 0 else nn.Identity()
        self.embedding_dim = embedding_dim if embedding_dim > 0 else num_features
        self.image_classifier = nn.Linear(num_features, num_classes) if image_head else None

    def image_logits(self, features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(B, F) cell features + (B,) image ids 0..G-1 -> (G, 19) image-level logits."""
        if self.image_classifier is None:
            raise ModelError("this model was built without an image head (model.image_head: false)")
        return self.image_classifier(self.dropout(segment_mean(features, groups)))

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {
            "logits": self.classifier(self.dropout(features)),
            "embedding": F.normalize(self.embedder(features).float(), dim=1),
            "features": features,
        }
        if groups is not None and self.image_classifier is not None:
            out["image_logits"] = self.image_logits(features, groups)
        return out


# --------------------------------------------------------------------------- weights files

def _is_run_checkpoint(state: object) -> bool:
    """A checkpoint written by hpasc.train (weights of a whole CellClassifier under "model")."""
    return (isinstance(state, dict) and isinstance(state.get("model"), dict)
            and any(str(k).startswith("backbone.") for k in state["model"]))


def _load_run_weights(model: CellClassifier, state: dict, path: Path) -> None:
    """Initialise from another run: every tensor whose name and shape match (heads may differ)."""
    own = model.state_dict()
    usable = {k: v for k, v in state["model"].items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in usable):
        raise ModelError(f"{path}: no backbone tensor fits model {type(model.backbone).__name__}")
    model.load_state_dict(usable, strict=False)


def _create_backbone(cfg: ModelConfig, pretrained_file: Path | None) -> nn.Module:
    import timm

    kwargs = {"in_chans": IN_CHANS, "num_classes": 0, "global_pool": "avg"}
    reserved = sorted(set(cfg.timm_args) & (set(kwargs) | {"pretrained", "pretrained_cfg_overlay", "drop_path_rate"}))
    if reserved:
        raise ModelError(f"model.timm_args: {', '.join(reserved)} set by hpasc itself (use the model.* settings)")
    kwargs.update(cfg.timm_args)
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if pretrained_file is not None:
        # file= makes timm read the local file and adapt the 3-channel stem to 4 channels; clearing
        # the other sources makes a download impossible even if the file branch were skipped.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={
            "file": str(pretrained_file), "source": "", "url": "", "hf_hub_id": ""})
    try:
        return timm.create_model(cfg.name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelError(f"unknown timm model {cfg.name!r} (model.name)") from exc
        if pretrained_file is not None:
            raise ModelError(f"{pretrained_file}: cannot load into {cfg.name} ({exc})") from exc
        raise
    except TypeError as exc:  # a keyword the architecture does not take
        if not cfg.timm_args:
            raise
        raise ModelError(f"model.timm_args {cfg.timm_args}: not accepted by {cfg.name} ({exc})") from None


def build_model(model_cfg: ModelConfig, num_classes: int = NUM_CLASSES) -> CellClassifier:
    """A CellClassifier for ``model_cfg``: random weights, or the local ``model_cfg.pretrained`` file."""
    pretrained = Path(model_cfg.pretrained).expanduser() if model_cfg.pretrained else None
    if pretrained is not None and not pretrained.is_file():
        raise ModelError(f"{pretrained}: pretrained weights file not found (model.pretrained); "
                         "weights are never downloaded — put the file there or set model.pretrained: null")
    run_state = None
    if pretrained is not None and pretrained.suffix not in (".safetensors",):
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled objects, truncated files, foreign formats
            raise ModelError(f"{pretrained}: not a weights file that loads with weights_only=True ({exc}); "
                             "save a plain state dict (tensors only) or .safetensors") from exc
        if _is_run_checkpoint(state):
            run_state, pretrained = state, None
    backbone = _create_backbone(model_cfg, pretrained)
    # timm's pooled output width: head_hidden_size when a pre-logits layer follows the pooling
    # (mobilenetv3), else num_features.
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    model = CellClassifier(backbone, width, num_classes, model_cfg.embedding_dim,
                           model_cfg.dropout, model_cfg.image_head)
    if run_state is not None:
        _load_run_weights(model, run_state, Path(model_cfg.pretrained))
    return model


# --------------------------------------------------------------------------- the one model loop

def forward(model: nn.Module, x: torch.Tensor, tta: str = "none", channels_last: bool = False,
            amp: bool = True) -> dict:
    """One batch through the model as validation and inference both run it: the TTA view, the memory
    format, float16 autocast when ``amp`` on CUDA (never on the CPU), no gradients. ``x`` is already on
    the device."""
    cuda = x.device.type == "cuda"
    view = apply_tta(x, tta)
    if channels_last:
        view = view.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16,
                                                enabled=cuda and amp):
        return model(view)


def predict_logits(model: nn.Module, crops: np.ndarray, rows: np.ndarray, transform, batch_size: int,
                   device: torch.device | str, amp: bool = True) -> np.ndarray:
    """Logits (n, 19) float32 of ``crops[rows]`` in batches (``transform.batch``, then ``forward``);
    ``crops`` may be a memory-mapped cache, only one batch of it is read at a time."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            x = transform.batch(np.asarray(crops[rows[start:start + batch_size]])).to(device, non_blocking=True)
            out.append(forward(model, x, amp=amp)["logits"].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES), np.float32)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def checkpoint_path(run_dir: os.PathLike | str, which: str = "best") -> Path:
    """``best``/``last`` -> ``run_dir/<which>.pt``; anything else is taken as a file path."""
    files = {"best": BEST_FILE, "last": LAST_FILE}
    return Path(run_dir) / files[which] if which in files else Path(which)


def load_run(run_dir: os.PathLike | str, which: str = "best",
             device: str | torch.device = "cpu") -> tuple[Config, CellClassifier]:
    """A trained run folder -> (its resolved config, the model in eval mode on ``device``).

    ``which``: ``best`` (best validation mAP), ``last``, or a path to a checkpoint. From ``last.pt`` the
    EMA weights are used when the run kept an EMA (they are what validation scored).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing; not a run folder")
    cfg = load_config(cfg_path)
    path = checkpoint_path(run_dir, which)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt files raise several types
        raise ModelError(f"{path}: unreadable checkpoint ({exc})") from exc
    weights = (state.get("ema") or state.get("model")) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise ModelError(f"{path}: no model weights in checkpoint")
    model = build_model(replace(cfg.model, pretrained=None))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit {cfg.model.name} ({exc})") from exc
    return cfg, model.to(device).eval()
