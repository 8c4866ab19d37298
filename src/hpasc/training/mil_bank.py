"""The last logits of every training cell, so a multiple-instance term works with ordinary batches.

A multiple-instance (MIL) loss pools the logits of *all* the cells of an image into one image-level logit
and trains it against the image's labels. Batches of whole images would give it that, but they hold only
one or two images, and BatchNorm and the triplet loss suffer from such narrow batches (measured: issue
#12). Instead, the trainer keeps the logits each training cell had when it was last trained, and pools,
for every image of a batch, the batch's cells (live, with gradients) together with the stored logits of
that image's other cells (constants). Each live cell then receives the gradient the pooled image logit
gives it — large for the cells the pool is made of (the likely carriers of a label), small for the
others — while batches stay random.

Cells not seen yet (early in the first epoch) are left out of the pool. Under DDP every rank stores the
logits of every rank's batch (an all-gather of the batch's rows and logits), so the banks stay equal.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistInfo


class LogitBank:
    """``(n_rows, n_classes)`` stored logits of the training cells, grouped by image."""

    def __init__(self, image_codes: np.ndarray, train_rows: np.ndarray, n_classes: int,
                 device: torch.device | str = "cpu"):
        codes = np.asarray(image_codes, np.int64)
        rows = np.asarray(train_rows, np.int64)
        self.n_rows = len(codes)
        self.device = torch.device(device)
        self.logits = torch.zeros(self.n_rows, n_classes, dtype=torch.float32, device=self.device)
        self.seen = torch.zeros(self.n_rows, dtype=torch.bool, device=self.device)
        self.codes = codes
        # the training rows of every image, contiguous: image c's rows are members[starts[c]:starts[c] + sizes[c]]
        n_images = int(codes.max()) + 1 if len(codes) else 0
        order = np.argsort(codes[rows], kind="stable")
        self.members = rows[order]
        self.sizes = np.bincount(codes[rows], minlength=n_images)
        self.starts = np.cumsum(self.sizes) - self.sizes

    def pool_inputs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """For the batch cells ``rows``: their image numbering and the stored logits of those images' other
        (already seen) training cells. Keys: ``group`` (B,) 0..G-1, ``bank_logits`` (M, C), ``bank_group``
        (M,), ``group_size`` (G,) the training cells each image has."""
        rows_np = rows.cpu().numpy().astype(np.int64)
        codes, group = np.unique(self.codes[rows_np], return_inverse=True)
        sizes = self.sizes[codes]
        # every training row of the batch's images, with its image's group number (no Python loop)
        first = np.cumsum(sizes) - sizes
        within = np.arange(int(sizes.sum())) - np.repeat(first, sizes)
        others = self.members[np.repeat(self.starts[codes], sizes) + within]
        other_group = np.repeat(np.arange(len(codes)), sizes)
        keep = ~np.isin(others, rows_np)
        others, other_group = others[keep], other_group[keep]
        idx = torch.from_numpy(others).to(self.device)
        seen = self.seen[idx]
        return {"group": torch.from_numpy(group.reshape(-1)).to(self.device),
                "bank_logits": self.logits[idx][seen],
                "bank_group": torch.from_numpy(other_group).to(self.device)[seen],
                "group_size": torch.from_numpy(sizes).to(self.device)}

    def update(self, rows: torch.Tensor, logits: torch.Tensor, info: DistInfo | None = None) -> None:
        """Store the batch's logits (detached); under DDP every rank's batch, on every rank."""
        rows = rows.to(self.device).long()
        logits = logits.detach().float().to(self.device)
        if info is not None and info.distributed:
            rows, logits = _all_gather_rows(rows, logits)
        self.logits[rows] = logits
        self.seen[rows] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["logits"].shape) != tuple(self.logits.shape):
            raise ValueError(f"logit bank of shape {tuple(state['logits'].shape)} does not fit "
                             f"{tuple(self.logits.shape)} (another training set?)")
        self.logits.copy_(state["logits"])
        self.seen.copy_(state["seen"])


def _all_gather_rows(rows: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, logits), batches of unequal length included (padded for the collective)."""
    world = dist.get_world_size()
    n = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = int(max(int(c) for c in counts))
    pad = longest - len(rows)
    rows_p = torch.cat([rows, rows.new_zeros(pad)])
    logits_p = torch.cat([logits, logits.new_zeros(pad, logits.shape[1])])
    all_rows = [torch.zeros_like(rows_p) for _ in range(world)]
    all_logits = [torch.zeros_like(logits_p) for _ in range(world)]
    dist.all_gather(all_rows, rows_p)
    dist.all_gather(all_logits, logits_p)
    keep = [slice(0, int(c)) for c in counts]
    return (torch.cat([r[k] for r, k in zip(all_rows, keep)]),
            torch.cat([lg[k] for lg, k in zip(all_logits, keep)]))
