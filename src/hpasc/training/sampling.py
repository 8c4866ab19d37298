"""A seeded, resumable epoch sampler, and per-item seeding of the augmentations.

For a run killed mid-epoch to resume to the very same weights, every random choice must be a function
of (seed, epoch, position) rather than of process history:

- the order (or the class-balanced draw) of an epoch comes from a generator seeded by (seed, epoch), and
  the sampler can start at any batch of it;
- each item is fetched as ``(epoch, index)`` and ``SeededItems`` reseeds the augmentation for exactly that
  pair before calling the wrapped dataset — whatever worker process runs it, whenever.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class EpochSampler(Sampler):
    """Indices of one epoch as ``(epoch, index)`` pairs, sharded over DDP ranks, resumable by batch.

    Uniform shuffling without replacement, or — with ``weights`` — a weighted draw with replacement
    (class-balanced sampling). The epoch has ``num_samples`` items per rank (default ``n / world``,
    rounded down to whole batches when ``drop_last``); ``start_batch`` skips batches already trained.

    ``groups`` (one image id per item) makes the epoch a sequence of whole images: images are shuffled
    (or, with ``weights``, drawn with replacement by the mean weight of their cells) and each image's
    cells follow one another, so a batch holds the cells of a few images — what an image-level head
    needs to learn anything (random batches rarely hold two cells of one image). Each rank then takes
    one contiguous stretch of the epoch, keeping images together.
    """

    def __init__(self, n: int, batch_size: int, seed: int, weights: Sequence[float] | None = None,
                 rank: int = 0, world: int = 1, drop_last: bool = True, num_samples: int | None = None,
                 groups: Sequence[int] | None = None):
        if n <= 0:
            raise ValueError("the sampler needs at least one item")
        if groups is not None and len(groups) != n:
            raise ValueError(f"sampler groups: need one group id per item ({n}), got {len(groups)}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        if self.weights is not None and (len(self.weights) != n or not bool((self.weights >= 0).all())
                                         or float(self.weights.sum()) <= 0):
            raise ValueError(f"sampling weights: need {n} non-negative values with a positive sum")
        per_rank = num_samples if num_samples is not None else n // world
        if drop_last and per_rank >= batch_size:
            per_rank -= per_rank % batch_size
        self.per_rank = max(per_rank, 1)
        self.epoch = 0
        self.start_batch = 0
        self._groups = None if groups is None else _group_index(np.asarray(groups), self.weights)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's item indices for ``epoch`` (all of them, before skipping)."""
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        total = self.per_rank * self.world
        if self._groups is not None:
            order = self._groups.epoch_items(gen, total)
            return order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        if self.weights is None:
            reps = -(-total // self.n)  # whole permutations until the epoch is filled
            order = torch.cat([torch.randperm(self.n, generator=gen) for _ in range(reps)])[:total]
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=gen)
        return order[self.rank::self.world].numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size:]
        return iter([(self.epoch, int(i)) for i in idx])

    def __len__(self) -> int:
        return max(self.per_rank - self.start_batch * self.batch_size, 0)


class _GroupIndex:
    """Items sorted by group, with each group's start, size and (optional) draw weight."""

    def __init__(self, items: np.ndarray, starts: np.ndarray, sizes: np.ndarray, weights: torch.Tensor | None):
        self.items, self.starts, self.sizes, self.weights = items, starts, sizes, weights

    def epoch_items(self, gen: torch.Generator, total: int) -> np.ndarray:
        """``total`` item indices: whole groups in a seeded order (the last one cut at ``total``)."""
        n_groups = len(self.sizes)
        picks, filled = [], 0
        while filled < total:  # one round = every group once (or as many weighted draws)
            if self.weights is None:
                round_ = torch.randperm(n_groups, generator=gen).numpy()
            else:
                round_ = torch.multinomial(self.weights, n_groups, replacement=True, generator=gen).numpy()
            picks.append(round_)
            filled += int(self.sizes[round_].sum())
        chosen = np.concatenate(picks)
        lengths = self.sizes[chosen]
        # position of every output item inside its group, without a Python loop over groups
        first_out = np.cumsum(lengths) - lengths
        within = np.arange(int(lengths.sum())) - np.repeat(first_out, lengths)
        return self.items[np.repeat(self.starts[chosen], lengths) + within][:total]


def _group_index(groups: np.ndarray, weights: torch.Tensor | None) -> _GroupIndex:
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.reshape(-1)
    items = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    group_weights = None
    if weights is not None:
        group_weights = torch.from_numpy(np.bincount(codes, weights=weights.numpy()) / sizes)
    return _GroupIndex(items, starts, sizes, group_weights)


def seed_item(seed: int, epoch: int, index: int, transform: object = None) -> None:
    """Reseed everything an item's augmentation may draw from, as a function of (seed, epoch, index)."""
    s = _mix(seed, epoch, index)
    random.seed(s)
    np.random.seed(s % 2**32)
    # the CPU generator only: torch.manual_seed also queues a CUDA seed with a captured stack trace per
    # call when CUDA is not initialised, which cost a quarter of a CPU training epoch
    torch.default_generator.manual_seed(s)
    # albumentations >= 2 keeps its own generators inside Compose, deaf to the global seeds above.
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(s), random.Random(s))


class SeededItems(Dataset):
    """Wraps a map-style dataset so that item ``(epoch, i)`` is ``dataset[i]`` with reproducible randomness.

    The wrapped dataset's augmentation pipeline is looked up as its ``transform`` attribute.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.transform = getattr(dataset, "transform", None)
        # nothing random per item (no augmentation, or a batch augmentation): no reseeding to pay for
        self.random = getattr(self.transform, "augment", True) is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys):
        """A batch of ``(epoch, index)`` keys: one batched fetch when nothing is random per item (the
        wrapped dataset's ``__getitems__``), else item by item, each reseeded."""
        fetch = getattr(self.dataset, "__getitems__", None)
        if self.random or fetch is None:
            return [self[key] for key in keys]
        return fetch([index for _, index in keys])

    def __getitem__(self, key):
        epoch, index = key
        if not self.random:
            return self.dataset[index]
        if torch.utils.data.get_worker_info() is not None:
            seed_item(self.seed, epoch, index, self.transform)
            return self.dataset[index]
        # In the main process (num_workers 0) the global generators also drive dropout: leave them as
        # they were, so the model's randomness does not depend on which items were loaded.
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            seed_item(self.seed, epoch, index, self.transform)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
