"""Test-time augmentation views of a crop batch, by name (``inference.tta``). No torch at import."""
from __future__ import annotations

TTA_NAMES: tuple[str, ...] = ("none", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse")
# the eight symmetries of the square (the dihedral group D4): ``inference.tta`` set to all of them
D4: tuple[str, ...] = ("none", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "transverse")


def apply_tta(x, name: str):
    """A test-time augmentation of an (N, C, S, S) tensor batch. Square crops, so rotations keep the shape."""
    import torch

    if name == "none":
        return x
    if name == "hflip":
        return torch.flip(x, dims=(3,))
    if name == "vflip":
        return torch.flip(x, dims=(2,))
    if name in ("rot90", "rot180", "rot270"):
        return torch.rot90(x, k=int(name[3:]) // 90, dims=(2, 3))
    if name == "transpose":  # mirror on the main diagonal
        return x.transpose(2, 3)
    if name == "transverse":  # mirror on the anti-diagonal
        return torch.flip(x, dims=(2, 3)).transpose(2, 3)
    raise ValueError(f"unknown TTA {name!r}; use {' | '.join(TTA_NAMES)}")
