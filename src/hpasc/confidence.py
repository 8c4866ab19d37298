"""Confidence recipes: per-cell class probabilities -> the confidences written to the submission.

The metric ranks every (cell, class) prediction of the whole test set by confidence, so the numbers
only need the right *order*; what matters is how a cell's own evidence and its image's evidence are
weighed. All functions here work on ONE image's cells (``combine_grouped`` loops over images for
out-of-fold tables). No torch: the blending and CV tools use this on stored probabilities.

The steps of ``combine``, in order:

1. **image level** — an image-level probability per class, either from an image head
   (``image_probs``) or aggregated over the image's cells (``cfg.image_agg``, see ``image_level``);
2. **recipe** (``cfg.recipe``, registry ``RECIPES``) — mixes cell and image probabilities;
3. **Negative** (``cfg.negative``) — class 18 re-formed explicitly;
4. **border** (``cfg.border_weight``) — cells touching the image border, which are usually cut off and
   so match their truth mask badly, are scaled down the smaller they are relative to the image's median
   cell.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import InferenceConfig
from .labels import NEGATIVE, NUM_CLASSES

# recipe(cell (n, 19), image (19,) or (n, 19) — one row per cell, cfg) -> (n, 19); image broadcasts
Recipe = Callable[[np.ndarray, np.ndarray, InferenceConfig], np.ndarray]
RECIPES: dict[str, Recipe] = {}
IMAGE_AGGREGATIONS = ("mean", "max", "topk", "vote", "head")
NEGATIVE_MODES = ("keep", "max", "complement")


def register_recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Decorator: make a recipe available as ``inference.recipe: <name>``."""
    def deco(fn: Recipe) -> Recipe:
        RECIPES[name] = fn
        return fn
    return deco


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown confidence recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None


# --------------------------------------------------------------------------- image level

def image_level(cell_probs: np.ndarray, how: str = "mean", topk: int = 3,
                vote_threshold: float = 0.5) -> np.ndarray:
    """Image-level probability per class (19,) from one image's cell probabilities (n, 19).

    - ``mean``: average over cells — robust, favours patterns shared by most cells;
    - ``max``: the most confident cell — keeps a class that only a few cells show (mitotic spindle);
    - ``topk``: mean of the ``topk`` highest cells of each class (all cells when fewer) — between the two;
    - ``vote``: fraction of cells whose probability reaches ``vote_threshold`` (each cell votes for
      every class it calls; above 0.5 a majority of the image's cells agree).

    No cells -> zeros. ``head`` is not computable from cells: pass the head's output as ``image_probs``.
    """
    probs = _check_probs(cell_probs)
    if how not in IMAGE_AGGREGATIONS or how == "head":
        raise ValueError(f"image_level: unknown aggregation {how!r}; use mean | max | topk | vote "
                         "(an image head's output is passed as image_probs)")
    if len(probs) == 0:
        return np.zeros(NUM_CLASSES, np.float32)
    if how == "mean":
        out = probs.mean(axis=0)
    elif how == "max":
        out = probs.max(axis=0)
    elif how == "topk":
        if topk < 1:
            raise ValueError(f"image_level: topk must be >= 1, got {topk}")
        k = min(int(topk), len(probs))
        # partition puts the k largest of each column last, in any order; their mean is order-free
        out = np.partition(probs, len(probs) - k, axis=0)[len(probs) - k:].mean(axis=0)
    else:  # vote
        out = (probs >= vote_threshold).mean(axis=0)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- recipes

@register_recipe("cell")
def recipe_cell(cell: np.ndarray, image: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """The cell model's probability alone: ``conf = p_cell``. The image level is ignored."""
    return cell.copy()


@register_recipe("cell_x_image")
def recipe_cell_x_image(cell: np.ndarray, image: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """The winners' recipe: ``conf = p_cell * p_image ** alpha``.

    The image factor ranks cells of images that clearly show a class above equally confident cells of
    images that do not; ``alpha`` (``cfg.alpha``) sets how much: 0 is ``cell``, 1 a plain product.
    """
    return cell * np.power(image, cfg.alpha)


@register_recipe("image")
def recipe_image(cell: np.ndarray, image: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """Every cell gets its image's probability: ``conf = p_image``.

    A baseline (the demo's "image-level prediction for every cell"); it cannot tell cells apart.
    """
    return np.broadcast_to(image, cell.shape).copy()


# --------------------------------------------------------------------------- the combination

def _check_probs(cell_probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(cell_probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"cell probabilities must have shape (n, {NUM_CLASSES}), got {probs.shape}")
    return probs


def _per_cell(values, n: int, name: str, dtype) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=dtype).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per cell ({n}), got shape {np.shape(values)}")
    return arr


def _negative(conf: np.ndarray, cell: np.ndarray, image: np.ndarray, mode: str) -> None:
    """Re-form class 18 in place.

    - ``keep``: Negative goes through the recipe like any other class;
    - ``max``: ``max(p_cell[18], p_image[18])`` — an image called negative makes all its cells negative
      candidates, and a single negative-looking cell is kept even in a positive image;
    - ``complement``: ``1 - max(conf[0..17])`` — a cell is as negative as it is not anything else
      (uses the recipe's other classes, so it is consistent with what was written for them).
    """
    if mode == "keep":
        return
    if mode == "max":
        conf[:, NEGATIVE] = np.maximum(cell[:, NEGATIVE], image[..., NEGATIVE])
    elif mode == "complement":
        others = np.delete(conf, NEGATIVE, axis=1)
        conf[:, NEGATIVE] = 1.0 - (others.max(axis=1) if others.shape[0] else 0.0)
    else:
        raise ValueError(f"unknown negative mode {mode!r}; use {' | '.join(NEGATIVE_MODES)}")


# --------------------------------------------------------------------------- Negative from the stain

STAIN_REFERENCE_PERCENTILE = 90.0  # a cell's stain is measured against this percentile of its image's cells


def relative_stain(cell_signal: np.ndarray) -> np.ndarray:
    """One image's cells' protein signal (their mean green, any scale) -> [0, 1]: the image's dimmest
    cell is 0 and its 90th percentile 1, so neither the background offset nor a bright outlier cell sets
    the scale (cells of one uniform signal are all 1, or all 0 without any signal)."""
    values = np.asarray(cell_signal, np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(0, np.float32)
    low = float(values.min())
    top = float(np.percentile(values, STAIN_REFERENCE_PERCENTILE))
    if top - low <= 1e-9 * max(abs(top), 1e-12):
        return np.full(values.shape, 1.0 if top > 0 else 0.0, np.float32)
    return np.clip((values - low) / (top - low), 0.0, 1.0).astype(np.float32)


def stain_negative(cell_probs: np.ndarray, stain: np.ndarray, gate: float = 0.0) -> np.ndarray:
    """Cell probabilities with Negative raised for cells that show neither a class nor protein signal:
    ``p[18] = max(p[18], (1 - max(p[0..17])) * (1 - stain))``, ``stain`` from ``relative_stain``.

    Negative means "no staining in this cell"; images labelled Negative are rare (0.16 % of the
    competition's training images), so a model learns little about Negative cells inside positive images.
    Both factors are needed: a dim cell of a dim pattern keeps its class, a bright cell is never Negative.
    ``gate`` > 0 first scales the classes 0..17 by ``stain ** gate`` (``inference.stain_gate``): a cell
    without protein signal cannot show a localisation, whatever the image's labels taught the model.
    """
    probs = _check_probs(cell_probs)
    stain = _per_cell(stain, len(probs), "stain", np.float32)
    if stain is None:
        raise ValueError("stain_negative needs one stain value per cell")
    if gate < 0:
        raise ValueError(f"stain_negative: gate must be >= 0, got {gate}")
    out = probs.astype(np.float32, copy=True)
    if gate > 0:
        keep = np.arange(NUM_CLASSES) != NEGATIVE
        out[:, keep] *= np.power(np.clip(stain, 0, 1), np.float32(gate))[:, None]
    unstained = (1.0 - np.delete(out, NEGATIVE, axis=1).max(axis=1, initial=0.0)) * (1.0 - np.clip(stain, 0, 1))
    out[:, NEGATIVE] = np.maximum(out[:, NEGATIVE], unstained)
    return out


def border_factor(border: np.ndarray | None, rel_area: np.ndarray | None, weight: float,
                  n: int) -> np.ndarray:
    """Per-cell multiplier: 1 inside; ``1 - weight * (1 - min(rel_area, 1))`` for border cells.

    A border cell as big as the image's median cell keeps its confidence; a sliver tends to
    ``1 - weight``. Without ``rel_area`` every border cell gets ``1 - weight``.
    """
    factor = np.ones(n, np.float32)
    if weight == 0 or border is None:
        return factor
    shrink = np.ones(n, np.float32) if rel_area is None else 1.0 - np.clip(rel_area, 0.0, 1.0)
    factor[border] = 1.0 - weight * shrink[border]
    return np.clip(factor, 0.0, 1.0)


def _apply(cell: np.ndarray, image: np.ndarray, cfg: InferenceConfig, border, rel_area) -> np.ndarray:
    """Recipe, Negative and border steps; ``image`` is (19,) or one row per cell (n, 19)."""
    conf = np.asarray(get_recipe(cfg.recipe)(cell, image, cfg), np.float32)
    _negative(conf, cell, image, cfg.negative)
    conf *= border_factor(border, rel_area, cfg.border_weight, len(cell))[:, None]
    return np.clip(conf, 0.0, 1.0).astype(np.float32, copy=False)


def combine(cell_probs: np.ndarray, cfg: InferenceConfig, border: np.ndarray | None = None,
            rel_area: np.ndarray | None = None, image_probs: np.ndarray | None = None) -> np.ndarray:
    """One image's cell probabilities (n, 19) -> submission confidences (n, 19) float32 in [0, 1].

    ``image_probs`` (19,), the output of an image head, is used as the image level whenever given;
    otherwise ``cfg.image_agg`` aggregates the cells (``head`` then is an error). ``border`` (bool) and
    ``rel_area`` (area / the image's median cell area) come from the segmentation.
    """
    cell = _check_probs(cell_probs)
    border = _per_cell(border, len(cell), "border", bool)
    rel_area = _per_cell(rel_area, len(cell), "rel_area", np.float32)
    get_recipe(cfg.recipe)  # an unknown name is an error before anything else
    if image_probs is not None:
        image = np.asarray(image_probs, np.float32).reshape(-1)
        if image.shape != (NUM_CLASSES,):
            raise ValueError(f"image_probs must have {NUM_CLASSES} values, got shape {np.shape(image_probs)}")
    elif cfg.image_agg == "head":
        raise ValueError("inference.image_agg is 'head' but no image-head probabilities were given "
                         "(the models have no image head?)")
    else:
        image = image_level(cell, cfg.image_agg, cfg.topk, cfg.vote_threshold)
    return _apply(cell, image, cfg, border, rel_area)


def _grouped_image_level(sorted_probs: np.ndarray, group: np.ndarray, starts: np.ndarray,
                         cfg: InferenceConfig) -> np.ndarray:
    """``image_level`` of every group at once: rows sorted by ``group`` (0..G-1), ``starts`` of each."""
    counts = np.diff(np.append(starts, len(sorted_probs))).astype(np.float64)[:, None]
    how = cfg.image_agg
    if how == "mean":
        return np.add.reduceat(sorted_probs, starts, axis=0, dtype=np.float64) / counts
    if how == "max":
        return np.maximum.reduceat(sorted_probs, starts, axis=0)
    if how == "vote":
        return np.add.reduceat(sorted_probs >= cfg.vote_threshold, starts, axis=0, dtype=np.float64) / counts
    if how == "topk":
        if cfg.topk < 1:
            raise ValueError(f"image_level: topk must be >= 1, got {cfg.topk}")
        out = np.empty((len(starts), NUM_CLASSES), np.float64)
        for c in range(NUM_CLASSES):  # rank of each row within its group, descending per class
            order = np.lexsort((-sorted_probs[:, c], group))
            rank = np.arange(len(order)) - starts[group[order]]
            top = order[rank < cfg.topk]
            out[:, c] = np.bincount(group[top], weights=sorted_probs[top, c], minlength=len(starts))
        return out / np.minimum(counts, cfg.topk)
    raise ValueError(f"combine_grouped: image_agg {how!r} needs per-image probabilities (use combine)")


def combine_grouped(cell_probs: np.ndarray, image_ids, cfg: InferenceConfig,
                    border: np.ndarray | None = None, rel_area: np.ndarray | None = None) -> np.ndarray:
    """``combine`` applied image by image to a table of cells from many images (e.g. out-of-fold
    predictions), vectorised over the images; ``image_ids`` (n,) says which image each row belongs to.
    Row order is kept."""
    cell = _check_probs(cell_probs)
    ids = np.asarray(image_ids)
    if ids.shape != (len(cell),):
        raise ValueError(f"image_ids must have one entry per row ({len(cell)}), got shape {ids.shape}")
    border = _per_cell(border, len(cell), "border", bool)
    rel_area = _per_cell(rel_area, len(cell), "rel_area", np.float32)
    get_recipe(cfg.recipe)
    if len(cell) == 0:
        return np.zeros_like(cell)
    _, group = np.unique(ids, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    images = _grouped_image_level(cell[order], group[order], starts, cfg).astype(np.float32)
    return _apply(cell, images[group], cfg, border, rel_area)
