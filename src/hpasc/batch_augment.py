"""Training augmentation of a whole batch at once, in torch, on the batch's device.

The per-crop albumentations pipeline (``hpasc.data``) costs about half a millisecond per crop in the
main process — a quarter of a CPU training step of the demo's small network, and on a GPU a data-loader
bottleneck. ``BatchAugment`` draws the same kinds of changes for every crop of a batch and applies them
in a few tensor operations: one ``grid_sample`` for flips, right-angle turns, rotation, scale and shift;
per-channel gain/bias/gamma; and, for a share of the crops, a Gaussian blur or Gaussian noise. Its
randomness is a function of one integer seed per batch (the loop passes ``(train.seed, epoch, batch)``),
so a resumed run repeats an uninterrupted one.

Input and output are normalised ``(n, 4, S, S)`` float tensors (as ``CellTransform`` makes them): the
intensity changes act on the [0, 1] values in between, as the per-crop presets do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BatchAugment:
    mean: tuple[float, ...] = (0.0,) * 4
    std: tuple[float, ...] = (1.0,) * 4
    affine_p: float = 0.5  # rotation by any angle, scale and shift (flips and right angles always)
    shift: float = 0.06  # fraction of the side
    scale: float = 0.1  # 1 +- scale
    intensity_p: float = 0.5
    brightness: float = 0.05
    contrast: float = 0.2
    gamma: float = 0.2
    blur_noise_p: float = 0.2  # one of: blur (kernel 3 or 5) or noise (std in noise_std)
    noise_std: tuple[float, float] = (0.005, 0.03)

    def with_normalisation(self, mean, std) -> "BatchAugment":
        from dataclasses import replace

        return replace(self, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"batch augmentation: expected (n, {len(self.mean)}, S, S), got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return x
        gen = torch.Generator().manual_seed(int(seed) % 2**63)

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=gen)

        def chance(p: float) -> torch.Tensor:
            return torch.rand(n, generator=gen) < p

        # geometry: output coordinates -> input coordinates, one 2 x 3 matrix per crop
        quarter = torch.randint(0, 4, (n,), generator=gen).float() * (math.pi / 2)
        affine = chance(self.affine_p)
        angle = quarter + torch.where(affine, uniform(-math.pi, math.pi, n), torch.zeros(n))
        zoom = torch.where(affine, uniform(1 - self.scale, 1 + self.scale, n), torch.ones(n))
        shift = torch.where(affine[:, None], uniform(-2 * self.shift, 2 * self.shift, n, 2), torch.zeros(n, 2))
        flip_x = torch.where(chance(0.5), -1.0, 1.0)
        flip_y = torch.where(chance(0.5), -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], 1),
                             torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], 1)], 1)
        # right angles without an affine part land exactly on pixel centres: snap the round-off
        theta = torch.where(affine[:, None, None], theta, theta.round())
        # intensity, per crop and channel
        c = x.shape[1]
        lit = chance(self.intensity_p)[:, None]
        gain = torch.where(lit, uniform(1 - self.contrast, 1 + self.contrast, n, c), torch.ones(n, c))
        bias = torch.where(lit, uniform(-self.brightness, self.brightness, n, c), torch.zeros(n, c))
        power = torch.where(lit, torch.exp(uniform(-self.gamma, self.gamma, n, c)), torch.ones(n, c))
        # blur or noise
        touched = chance(self.blur_noise_p)
        blur = touched & chance(0.5)
        noise = touched & ~blur
        kernel5 = chance(0.5)
        noise_std = uniform(*self.noise_std, n)
        noisy = torch.nonzero(noise).flatten()
        noise_field = torch.randn((len(noisy),) + tuple(x.shape[1:]), generator=gen)  # the noisy crops' only

        dev = x.device
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        unit = F.grid_sample(x * std + mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        unit = unit.clamp(0, 1)
        lit_rows = torch.nonzero(lit.flatten()).flatten()
        if len(lit_rows):  # gamma, gain and bias of the crops drawn for it (pow is dear: not on the others)
            shape = (len(lit_rows), c, 1, 1)
            rows = lit_rows.to(dev)
            unit[rows] = ((unit[rows].pow(power[lit_rows].to(dev).view(shape)) * gain[lit_rows].to(dev).view(shape)
                           + bias[lit_rows].to(dev).view(shape)).clamp(0, 1))
        changed = {}  # only the few crops picked for blur or noise are computed (a depthwise conv is slow on CPUs)
        for size, pick in ((3, blur & ~kernel5), (5, blur & kernel5)):
            rows = torch.nonzero(pick).flatten()
            if len(rows):
                changed[size] = (rows.to(dev), _gaussian(unit[rows.to(dev)], size))
        if len(noisy):
            sub = unit[noisy.to(dev)] + noise_field.to(dev, x.dtype) * noise_std[noisy].to(dev).view(-1, 1, 1, 1)
            changed["noise"] = (noisy.to(dev), sub.clamp(0, 1))
        if changed:
            unit = unit.clone()
            for rows, values in changed.values():
                unit[rows] = values
        return (unit - mean) / std


def _gaussian(x: torch.Tensor, size: int) -> torch.Tensor:
    """Depthwise Gaussian blur with OpenCV's sigma for a kernel of ``size`` (zero padding at the border,
    where a crop's canvas is zero anyway)."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    r = torch.arange(size, device=x.device, dtype=x.dtype) - (size - 1) / 2
    k = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size), padding=(0, size // 2), groups=c)
    return F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1), padding=(size // 2, 0), groups=c)
