"""Training losses: BCE (optionally focal) over the 19 classes + λ × batch-hard triplet on embeddings.

The labels are weak (image level), so only cells that carry exactly one label — in practice cells of
single-label images — have a trustworthy identity for metric learning: the triplet loss uses those and
ignores the rest (identity -1). The BCE sees every cell.

``loss.mil_weight`` adds a multiple-instance term: the cell logits of each image in the batch are pooled
(``mil_pool``: log-mean-exp, max or mean) into one logit per class and trained against the image's labels.
An image labelled with a class then only needs *some* of its cells to show it, while every cell of an
image without the class is pushed down — what ranking cells within an image asks for. The trainer completes
each image's pool with the stored logits of its cells outside the batch (``training.mil_bank``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .labels import NUM_CLASSES


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances; the epsilon keeps sqrt differentiable at 0."""
    sq = (embeddings * embeddings).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)
    return torch.sqrt(d2 + 1e-12)


def batch_hard_triplet(embeddings: torch.Tensor, identities: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017).

    For every anchor with an identity (>= 0) that has at least one other sample of its identity and one
    of another identity in the batch: ``relu(max d(anchor, positive) - min d(anchor, negative) + margin)``;
    the mean over those anchors. Samples with identity < 0 are neither anchors, positives nor negatives.
    No usable anchor -> 0 (still attached to the graph, so DDP and backward see every parameter).
    """
    ids = identities.to(embeddings.device).long()
    valid = ids >= 0
    dist = pairwise_distances(embeddings.float())
    both = valid[:, None] & valid[None, :]
    same = (ids[:, None] == ids[None, :]) & both
    pos = same & ~torch.eye(len(ids), dtype=torch.bool, device=dist.device)
    neg = both & ~same
    anchors = pos.any(1) & neg.any(1)
    if not bool(anchors.any()):
        return embeddings.sum() * 0.0
    d = dist[anchors]
    hardest_pos = torch.where(pos[anchors], d, torch.zeros_like(d)).amax(1)
    far = d.detach().max() + 1.0  # larger than every real distance: never picked as the hardest negative
    hardest_neg = torch.where(neg[anchors], d, far).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def single_label_identities(targets: torch.Tensor) -> torch.Tensor:
    """(B, 19) multi-hot targets -> (B,) class id where exactly one class is set, else -1."""
    hot = targets > 0.5
    single = hot.sum(1) == 1
    return torch.where(single, hot.float().argmax(1), torch.full_like(single, -1, dtype=torch.long))


def group_targets(targets: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, 19) cell targets + (B,) image ids 0..G-1 -> (G, 19): the union of an image's cell targets."""
    groups = groups.long().to(targets.device)
    n = int(groups.max().item()) + 1 if groups.numel() else 0
    out = targets.new_zeros(n, targets.shape[1])
    return out.scatter_reduce(0, groups[:, None].expand_as(targets), targets, reduce="amax")


def segment_pool(logits: torch.Tensor, groups: torch.Tensor, pool: str, sharpness: float = 1.0) -> torch.Tensor:
    """(B, C) logits + (B,) group ids 0..G-1 -> (G, C) pooled logits.

    ``lse``: ``log(mean(exp(s * x))) / s`` per group (between the mean, s -> 0, and the max, s -> inf);
    ``max``; ``mean``. An empty group gives 0 (``mean``/``lse``) or -inf (``max``), so callers pool only
    groups that are present.
    """
    if pool not in MIL_POOLS:
        raise ValueError(f"unknown MIL pooling {pool!r}; choices: {', '.join(MIL_POOLS)}")
    groups = groups.long().to(logits.device)
    n = int(groups.max().item()) + 1 if groups.numel() else 0
    counts = torch.bincount(groups, minlength=n).clamp_min(1).to(logits.dtype)[:, None]
    if pool == "mean":
        return logits.new_zeros(n, logits.shape[1]).index_add_(0, groups, logits) / counts
    index = groups[:, None].expand_as(logits)
    top = logits.new_full((n, logits.shape[1]), -torch.inf).scatter_reduce(0, index, logits, reduce="amax")
    if pool == "max":
        return top
    shift = top.detach().clamp_min(-1e4)  # the group's max: exp never overflows; gradients unchanged
    scaled = torch.exp(sharpness * (logits - shift[groups]))
    sums = logits.new_zeros(n, logits.shape[1]).index_add_(0, groups, scaled)
    return shift + torch.log(sums / counts) / sharpness


MIL_POOLS = ("lse", "max", "mean")


class Criterion(nn.Module):
    """``Criterion(cfg.loss)(outputs, batch) -> {"loss", "bce", "triplet"}`` (+ ``"image_bce"``, ``"mil"``).

    ``outputs`` is the model's dict; ``batch["target"]`` holds (B, 19) multi-hot cell targets. With an
    image head, ``outputs["image_logits"]`` (G, 19) is trained against ``batch["image_target"]`` when
    given, otherwise against the union of the targets of each image's cells (``batch["group"]``).
    With ``mil_weight`` > 0 (``"mil"``): ``multiple_instance``.
    """

    def __init__(self, cfg: LossConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cfg = cfg
        if cfg.class_weights is not None and len(cfg.class_weights) != num_classes:
            raise ValueError(f"loss.class_weights: expected {num_classes} values, got {len(cfg.class_weights)}")
        weights = torch.tensor(cfg.class_weights if cfg.class_weights is not None else [1.0] * num_classes,
                               dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def classification(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean BCE (focal when ``focal_gamma`` > 0) with label smoothing and class weights."""
        targets = targets.float()
        eps = self.cfg.label_smoothing
        if eps > 0:
            targets = targets * (1.0 - eps) + 0.5 * eps
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        if self.cfg.focal_gamma > 0:
            p_true = torch.exp(-loss)  # the probability given to the (soft) truth
            loss = (1.0 - p_true).pow(self.cfg.focal_gamma) * loss
        return (loss * self.class_weights).mean()

    def multiple_instance(self, logits: torch.Tensor, targets: torch.Tensor, batch: dict) -> torch.Tensor:
        """BCE of each image's pooled cell logits against the union of its cells' targets.

        The pool holds the batch's cells of the image (``batch["group"]``) and, when given, the stored
        logits of its other cells (``bank_logits`` / ``bank_group``, constants). Image g's term is weighted
        by its cell count / B (``group_size``, else its cells in the batch), so that a live cell's share
        of the gradient is about what the per-cell BCE gives it (a pool of n cells hands each ~1/n).
        """
        if "group" not in batch:
            raise KeyError("loss.mil_weight needs batch['group'] (each cell's image in the batch)")
        groups = batch["group"].to(logits.device).long()
        pool, pool_groups = logits.float(), groups
        if batch.get("bank_logits") is not None:
            pool = torch.cat([pool, batch["bank_logits"].to(logits.device).float()])
            pool_groups = torch.cat([groups, batch["bank_group"].to(logits.device).long()])
        pooled = segment_pool(pool, pool_groups, self.cfg.mil_pool, self.cfg.mil_sharpness)
        image_target = group_targets(targets, groups)
        size = batch.get("group_size")
        size = (torch.bincount(groups, minlength=len(pooled)) if size is None else size.to(logits.device))
        loss = F.binary_cross_entropy_with_logits(pooled, image_target.float(), reduction="none")
        return ((loss * self.class_weights).mean(1) * size.float()).sum() / len(logits)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        if "target" not in batch:
            raise KeyError("batch has no 'target' (B x 19 multi-hot cell targets)")
        targets = batch["target"].to(outputs["logits"].device).float()
        bce = self.classification(outputs["logits"], targets)
        if self.cfg.triplet_weight > 0:
            triplet = batch_hard_triplet(outputs["embedding"], single_label_identities(targets),
                                         self.cfg.triplet_margin)
        else:
            triplet = outputs["embedding"].sum() * 0.0
        loss = self.cfg.bce_weight * bce + self.cfg.triplet_weight * triplet
        out = {"loss": loss, "bce": bce.detach(), "triplet": triplet.detach()}
        if "image_logits" in outputs:
            image_target = batch.get("image_target")
            if image_target is None:
                image_target = group_targets(targets, batch["group"])
            image_bce = self.classification(outputs["image_logits"], image_target.to(targets.device))
            out["loss"] = out["loss"] + self.cfg.image_weight * image_bce
            out["image_bce"] = image_bce.detach()
        if self.cfg.mil_weight > 0:
            mil = self.multiple_instance(outputs["logits"], targets, batch)
            out["loss"] = out["loss"] + self.cfg.mil_weight * mil
            out["mil"] = mil.detach()
        return out
