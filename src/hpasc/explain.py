"""Why did the model call this cell class c? Grad-CAM per class and integrated gradients per channel.

- **Grad-CAM** (Selvaraju et al.): the last spatial feature map ``A`` (K, h, w) of the backbone, weighted
  per channel by the spatial mean of d logit_c / dA, summed over channels and rectified, upsampled to the
  crop. Shows *where* in the crop the evidence for class c is. The layer is found automatically: the
  last module (without children) whose output is a spatial map (4-D, more than 1 x 1) — for timm CNNs that is
  the activation after the head convolution (EfficientNet) or the last block of ``layer4`` (ResNet),
  i.e. the map global pooling reads.
- **Integrated gradients** (Sundararajan et al.): ``(x - x0) * mean over the straight path x0 -> x of
  d logit_c / dx``, with the black crop as baseline ``x0``. Attributions sum to ``logit_c(x) -
  logit_c(x0)`` (completeness) and are kept per input channel, so they also tell *which stain*
  (microtubules, protein, nucleus, ER) carried the decision.

``explain_image`` runs both on the cells of one image and writes one overlay PNG per cell.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import CHANNELS
from .labels import CLASS_NAMES


class ExplainError(ValueError):
    """Bad image/cell/class request; the message names what is missing."""


# --------------------------------------------------------------------------- Grad-CAM

def _logits(output) -> torch.Tensor:
    """Model output (dict with "logits", or a tensor) -> logits (B, C)."""
    return output["logits"] if isinstance(output, dict) else output


def find_target_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last leaf module that outputs a spatial (B, K, h, w) map with h * w > 1 during ``model(x)``
    (a global pool's (B, K, 1, 1) output is not a map; it is the fallback only when nothing else is)."""
    order: list[nn.Module] = []
    pooled: list[nn.Module] = []

    def record(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            (order if out.shape[2] * out.shape[3] > 1 else pooled).append(module)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not order and not pooled:
        raise ExplainError(f"{type(model).__name__}: no module produces a spatial (4-D) feature map")
    return (order or pooled)[-1]


class GradCAM:
    """Grad-CAM maps of a classifier for chosen classes.

    ``layer``: the module whose output is explained (default: ``find_target_layer``), a module or its
    name in ``model.named_modules()``.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str | None = None):
        self.model = model
        if isinstance(layer, str):
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ExplainError(f"{type(model).__name__}: no module named {layer!r}")
            layer = modules[layer]
        self.layer = layer

    def __call__(self, x: torch.Tensor, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """x (B, C_in, S, S) -> (maps (B, n_classes, S, S) in [0, 1], probabilities (B, n_out)).

        Each map is normalised by its maximum (an all-zero map stays zero: no positive evidence)."""
        layer = self.layer or find_target_layer(self.model, x[:1])
        store: dict[str, torch.Tensor] = {}
        handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
        try:
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)  # gradients flow even with frozen weights
                logits = _logits(self.model(x))
                act = store["act"]
                maps = []
                for k, c in enumerate(classes):
                    (grad,) = torch.autograd.grad(logits[:, int(c)].sum(), act, retain_graph=k < len(classes) - 1)
                    weights = grad.mean(dim=(2, 3), keepdim=True)
                    maps.append(F.relu((weights * act).sum(dim=1)))
        finally:
            handle.remove()
        cam = torch.stack(maps, dim=1).detach()  # (B, n, h, w)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        peak = cam.flatten(2).amax(dim=2)[..., None, None]
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
        return cam.float().cpu().numpy(), torch.sigmoid(logits.detach()).float().cpu().numpy()


# --------------------------------------------------------------------------- integrated gradients

def integrated_gradients(model: nn.Module, x: torch.Tensor, cls: int, baseline: torch.Tensor | None = None,
                         steps: int = 32, batch_size: int = 32) -> np.ndarray:
    """Attributions (C_in, S, S) of ``logit_cls`` for one input ``x`` (1, C_in, S, S) or (C_in, S, S).

    Midpoint Riemann sum over ``steps`` points of the path from ``baseline`` (default zeros) to ``x``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x.detach()[None] if x.dim() == 3 else x.detach()
    if x.shape[0] != 1:
        raise ValueError(f"integrated_gradients explains one input, got a batch of {x.shape[0]}")
    base = torch.zeros_like(x) if baseline is None else baseline.detach().reshape(x.shape).to(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x[0])
    with torch.enable_grad():
        for start in range(0, steps, batch_size):
            a = alphas[start:start + batch_size].view(-1, 1, 1, 1)
            path = (base + a * (x - base)).requires_grad_(True)
            out = _logits(model(path))[:, int(cls)].sum()
            (grad,) = torch.autograd.grad(out, path)
            total += grad.sum(dim=0)
    return ((x[0] - base[0]) * total / steps).float().cpu().numpy()


# --------------------------------------------------------------------------- run folder -> PNGs

def crops_to_tensor(crops: np.ndarray, cells_cfg) -> torch.Tensor:
    """uint8 crops (n, S, S, 4) -> the model's normalised input (n, 4, S, S), as at inference."""
    from .data import build_transform

    transform = build_transform(cells_cfg, train=False)
    return torch.stack([transform(crop) for crop in crops])


def choose_classes(probs: np.ndarray, cls: int | None, threshold: float, max_classes: int) -> list[int]:
    """The requested class, else the classes with p >= threshold (best first), else the top class."""
    if cls is not None:
        if not 0 <= cls < len(probs):
            raise ExplainError(f"class {cls} outside 0..{len(probs) - 1}")
        return [int(cls)]
    order = [int(c) for c in np.argsort(-probs, kind="stable")]
    chosen = [c for c in order if probs[c] >= threshold][:max_classes]
    return chosen or order[:1]


def plot_cell(crop: np.ndarray, cams: np.ndarray, classes: Sequence[int], probs: np.ndarray,
              ig: np.ndarray, title: str, path: str | os.PathLike) -> Path:
    """Row 1: the crop and a Grad-CAM overlay per class; row 2: integrated gradients per channel."""
    from matplotlib.figure import Figure

    from .report import composite, save_figure

    cols = max(len(classes) + 1, len(CHANNELS))
    fig = Figure(figsize=(2.3 * cols, 5), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    rgb = composite(crop, stretch=True)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("cell (R+Y, G+Y, B)", fontsize=8)
    for k, c in enumerate(classes):
        ax = axes[0, k + 1]
        ax.imshow(rgb)
        ax.imshow(cams[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"Grad-CAM {c} {CLASS_NAMES[c][:18]}\np={probs[c]:.3f}", fontsize=8)
    bound = float(np.abs(ig).max()) or 1.0
    for k, name in enumerate(CHANNELS):
        ax = axes[1, k]
        ax.imshow(ig[k], cmap="coolwarm", vmin=-bound, vmax=bound)
        share = np.abs(ig[k]).sum() / max(np.abs(ig).sum(), 1e-12)
        ax.set_title(f"IG {name} ({share:.0%} of |attr|)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_overview(image: np.ndarray, labels: np.ndarray, probs: dict[int, np.ndarray], title: str,
                  path: str | os.PathLike, max_side: int = 1024) -> Path:
    """The whole image with cell outlines and ids (what ``--cell N`` refers to) and each explained cell's
    top class."""
    import cv2
    from matplotlib.figure import Figure

    from .report import composite, save_figure

    f = min(1.0, max_side / max(labels.shape))
    size = (max(1, round(labels.shape[1] * f)), max(1, round(labels.shape[0] * f)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.resize(labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST).astype(np.int32)
    rgb = composite(small, stretch=True)
    edge = np.zeros(lab.shape, bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    rgb[edge] = 1.0
    fig = Figure(figsize=(8, 8 * size[1] / size[0]), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(rgb)
    ax.axis("off")
    ys, xs = np.nonzero(lab)
    ids = lab[ys, xs]
    count = np.maximum(np.bincount(ids), 1)
    cy, cx = np.bincount(ids, ys) / count, np.bincount(ids, xs) / count
    for cid in np.unique(ids):
        text = str(cid)
        if cid in probs:
            top = int(np.argmax(probs[cid]))
            text += f"\n{top}:{probs[cid][top]:.2f}"
        ax.text(cx[cid], cy[cid], text, color="white", fontsize=7, ha="center", va="center",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def explain_image(run_dir: str | os.PathLike, image_id: str, cell: int | None = None, cls: int | None = None,
                  images_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                  masks_dir: str | os.PathLike | None = None, which: str = "best", threshold: float = 0.5,
                  max_classes: int = 4, ig_steps: int = 32, device: str = "auto") -> list[Path]:
    """Grad-CAM (each predicted class, or ``cls``) and integrated gradients (the first of those classes)
    for every cell of ``image_id`` (or just ``cell``); one PNG per cell in ``out_dir`` (default
    ``<run_dir>/explain``), plus ``{ID}_overview.png`` with the cell ids. Returns the per-cell PNG paths."""
    from tqdm import tqdm

    from . import runs
    from .cells import extract_crops
    from .device import resolve_device
    from .io import read_image
    from .models import load_run
    from .paths import data_root
    from .segmentation.folder import read_label_map

    device = str(resolve_device(device, where="explain --device"))
    cfg, model = load_run(run_dir, which=which, device=device)
    images = Path(images_dir) if images_dir else data_root(cfg.data.root) / "train"
    masks = Path(masks_dir) if masks_dir else runs.masks_dir(cfg.data.work_dir)
    image = read_image(images, image_id)
    labels = read_label_map(masks, image_id)[0]
    n_cells = int(labels.max())
    if cell is not None and not 1 <= cell <= n_cells:
        raise ExplainError(f"{masks}/{image_id}.png: no cell {cell} (the label map has cells 1..{n_cells})")
    cell_ids = [cell] if cell is not None else list(range(1, n_cells + 1))
    crops = extract_crops(image, labels, cfg.cells.size, cfg.cells.padding, cfg.cells.neighbours)
    x = crops_to_tensor(crops[[c - 1 for c in cell_ids]], cfg.cells).to(device)
    baseline = crops_to_tensor(np.zeros_like(crops[:1]), cfg.cells).to(device)
    with torch.no_grad():
        probs = torch.sigmoid(_logits(model(x)).float()).cpu().numpy()
    out = Path(out_dir) if out_dir else Path(run_dir) / "explain"
    cam = GradCAM(model, find_target_layer(model, x[:1]))  # found once, not by a forward pass per cell
    written = []
    for k, cid in enumerate(tqdm(cell_ids, desc=f"explain {image_id}", disable=None)):
        classes = choose_classes(probs[k], cls, threshold, max_classes)
        maps, _ = cam(x[k:k + 1], classes)
        ig = integrated_gradients(model, x[k:k + 1], classes[0], baseline, steps=ig_steps)
        title = f"{image_id} cell {cid} — IG for class {classes[0]} ({CLASS_NAMES[classes[0]]})"
        written.append(plot_cell(crops[cid - 1], maps[0], classes, probs[k], ig, title,
                                 out / f"{image_id}_cell{cid}.png"))
    plot_overview(image, labels, dict(zip(cell_ids, probs)), f"{image_id}: cell ids, top class:probability",
                  out / f"{image_id}_overview.png")
    return written
