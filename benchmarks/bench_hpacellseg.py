"""Speed of the ``hpacellseg`` backend per stage on real 2048 px images, at the original's scale (0.25).

    python benchmarks/bench_hpacellseg.py [--repeat 1] [--threads N] [--device cpu|cuda]

Builds the two DPN U-Nets with random weights (speed does not depend on the values; nothing is
downloaded) and times, for each sample image of ../shared/hpa/sample: reading the four PNGs (the
baseline, measured in the same run), the pre-processing of both networks (scikit-image rescale), each
network, the resize back to full size and ``label_cell``. Prints seconds and the ratio to reading.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from hpasc.io import read_image
from hpasc.segmentation.dpn_unet import DPNUnet
from hpasc.segmentation.hpacellseg import label_cell, prepare_input, restore

from common import SHARED_SAMPLE, best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nets = {role: DPNUnet(3).eval().to(device) for role in ("nuclei", "cell")}
    ids = sorted(p.name[: -len("_red.png")] for p in SHARED_SAMPLE.glob("*_red.png"))[: args.images]
    if not ids:
        raise SystemExit(f"no sample images in {SHARED_SAMPLE}")
    print(f"torch threads {torch.get_num_threads()}, device {device}, {len(ids)} images of 2048 px")
    totals: dict[str, list[float]] = {}
    for image_id in ids:
        times = {"read": best_of(lambda: read_image(SHARED_SAMPLE, image_id), args.repeat)}
        image = read_image(SHARED_SAMPLE, image_id)
        stacks = {"nuclei": np.dstack([image[..., 2]] * 3), "cell": np.ascontiguousarray(image[..., [0, 3, 2]])}
        maps = {}
        for role, stack in stacks.items():
            times[f"{role} prepare"] = best_of(lambda: prepare_input(stack, 0.25), args.repeat)
            x, (rows, cols), _ = prepare_input(stack, 0.25)

            def run(role=role, x=x):
                with torch.inference_mode():
                    out = torch.softmax(nets[role](x.to(device)), 1)[0].permute(1, 2, 0).cpu().numpy()
                maps[role] = out[:rows, :cols]
            times[f"{role} network"] = best_of(run, args.repeat)
        shape = image.shape[:2]
        times["resize back"] = best_of(lambda: (restore(maps["nuclei"], shape, True),
                                                restore(maps["cell"], shape, False)), args.repeat)
        nuc, cell = restore(maps["nuclei"], shape, True), restore(maps["cell"], shape, False)
        times["label_cell"] = best_of(lambda: label_cell(nuc, cell), args.repeat)
        for stage, value in times.items():
            totals.setdefault(stage, []).append(value)
    read = float(np.mean(totals["read"]))
    print(f"{'stage':<18}{'s / image':>10}{'x read':>9}")
    total = 0.0
    for stage, values in totals.items():
        mean = float(np.mean(values))
        total += 0 if stage == "read" else mean
        print(f"{stage:<18}{mean:>10.2f}{mean / read:>9.1f}")
    print(f"{'segment (all)':<18}{total:>10.2f}{total / read:>9.1f}")


if __name__ == "__main__":
    main()
