"""Splitting a list of work items over machines: ``--shard i/n`` everywhere (predict, segment, cells,
external) means the same thing — items ``i, i+n, i+2n, ...`` (0-based) of the command's item order."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ShardError(ValueError):
    """A ``--shard`` value that is not ``i/n`` with ``0 <= i < n``."""


def parse_shard(text: str | tuple[int, int] | None, error: type[Exception] = ShardError) -> tuple[int, int] | None:
    """``"1/4"`` -> (1, 4): shard 1 (0-based) of 4; None stays None. Bad values raise ``error``."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise error(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    else:
        i, n = text
    if not (n >= 1 and 0 <= i < n):
        raise error(f"shard {i}/{n}: need n >= 1 and 0 <= i < n (0-based)")
    return i, n


def shard_items(items: Sequence[T], shard: tuple[int, int] | str | None) -> list[T]:
    """The items of one shard (all of them for None), in their original order."""
    shard = parse_shard(shard)
    return list(items) if shard is None else list(items[shard[0]::shard[1]])


def shard_tag(shard: tuple[int, int] | None) -> str:
    """``(1, 4)`` -> ``"shard1of4"`` (file-name part of a shard's own outputs); ``""`` for None."""
    return "" if shard is None else f"shard{shard[0]}of{shard[1]}"
