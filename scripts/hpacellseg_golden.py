"""Golden outputs of the ORIGINAL HPA Cell Segmentation for hpasc's compatibility test (run locally).

The original code is not part of hpasc and is never committed. Get it yourself and put both packages on
PYTHONPATH, then run this script from a hpasc environment:

    git clone https://github.com/CellProfiling/HPA-Cell-Segmentation /tmp/orig/hpa
    git clone https://github.com/haoxusci/pytorch_zoo /tmp/orig/zoo
    PYTHONPATH=/tmp/orig/hpa:/tmp/orig/zoo python scripts/hpacellseg_golden.py \\
        ../shared/hpa/sample --out tests/data/hpacellseg_golden [--seed 0]

Both networks get the reproducible random weights of ``hpasc.segmentation.dpn_unet.random_state`` (a
function of tensor names, shapes and the seed), so hpasc's tests rebuild bit-identical networks without
the original. For each ``{ID}_{red,yellow,blue}.png`` in the folder it writes

- ``{ID}_nuclei_prob.png`` / ``{ID}_cell_prob.png``: the softmax maps at the network's scale (padding
  removed), sampled on every second row and column (to keep the files small), the border map and the
  nuclei/cell map side by side (the background map is one minus their sum), 16-bit grey
  (value = round(p * 65535)): ``hpasc.segmentation.hpacellseg.golden_layout``;
- ``{ID}_nuclei_labels.png`` / ``{ID}_cell_labels.png``: ``label_cell``'s two label maps, 16-bit;

and ``golden.json`` with the seeds and the library versions.

Random networks in eval mode answer the same everywhere (without real statistics their activations grow
by orders of magnitude through the 100 BatchNorm layers and swamp the image), which would leave nothing
to compare after ``label_cell``. So two things are made to fit the first image (it needs its
``{ID}_cellmask.png``): the BatchNorm running statistics are that image's own (one forward pass in train
mode, rounded to float16), and the 3x3 head of each network (centre tap and bias) is a ridge regression
from the last features to targets from that image (nuclei where blue is above its Otsu threshold, cells
and cell borders from the cell mask), times 3 for sharper maps. These tensors go to
``{role}_overrides.npz`` (plain arrays by parameter name; load with ``allow_pickle=False``) and are applied
on top of ``random_state``; every convolution stays random. ``--overrides DIR`` reuses a previous run's
files instead of fitting (e.g. for goldens of other images or with ``--padding``). With ``--weights DIR`` the two
networks are also saved there as the official files are (whole pickled modules, zip format): what
``hpasc segment --backend hpacellseg`` must load.

Two shims let the 2021 code run on today's libraries without changing what it computes: scikit-image's
``rescale(multichannel=True)`` is passed on as ``channel_axis=-1``, and pytorch_zoo's DPN-92 is built
without downloading ImageNet weights (they are replaced by the random ones anyway).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import cv2
import numpy as np


def _shim_original():
    import skimage.transform as transform

    plain_rescale = transform.rescale

    def rescale(image, scale, multichannel=False, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return plain_rescale(image, scale, **kwargs)

    transform.rescale = rescale
    import pytorch_zoo.abstract_model as abstract_model
    import pytorch_zoo.dpn as dpn

    abstract_model.encoder_params["dpn92"]["init_op"] = functools.partial(dpn.dpn92, pretrained=None)
    abstract_model.encoder_params["dpn92"]["url"] = None


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SystemExit(f"error: {path}: not a readable image")
    return image


def _write16(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(array, dtype=np.uint16)):
        raise SystemExit(f"error: {path}: could not write")


def _network_input(images: Path, image_id: str, role: str) -> np.ndarray:
    """The network input of one image (rescale 0.25, normalise), as (1, 3, H, W) float32: hpasc's
    ``prepare_input``, which the goldens show equal to the original's."""
    from hpasc.segmentation.hpacellseg import prepare_input

    channels = ("blue", "blue", "blue") if role == "nuclei" else ("red", "yellow", "blue")
    image = np.dstack([_read(images / f"{image_id}_{c}.png") for c in channels])
    return prepare_input(image, 0.25)[0].numpy()


def _targets(images: Path, image_id: str, role: str, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel target logits (background, border, object) at the network's scale."""
    from skimage.filters import threshold_otsu
    from skimage.segmentation import find_boundaries

    if role == "nuclei":
        blue = cv2.resize(_read(images / f"{image_id}_blue.png"), shape[::-1], interpolation=cv2.INTER_AREA)
        obj = blue > threshold_otsu(blue)
        border = find_boundaries(obj, mode="thick")
    else:
        mask = _read(images / f"{image_id}_cellmask.png").astype(np.int32)
        mask = cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST)
        border = cv2.dilate(find_boundaries(mask, mode="inner").astype(np.uint8), np.ones((3, 3))) > 0
        obj = mask > 0
    prob = np.stack([~obj & ~border, border, obj & ~border], -1).astype(np.float64)
    return np.log(0.9 * prob + 0.1 / 3)


def _calibrate(net, x) -> dict[str, np.ndarray]:
    """BatchNorm running statistics of the input ``x`` (one train-mode pass), rounded to float16."""
    import torch

    norms = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    out = {}
    for name, m in norms.items():
        for buffer in ("running_mean", "running_var"):
            value = getattr(m, buffer).numpy().astype(np.float16).astype(np.float32)
            out[f"{name}.{buffer}"] = value
    return out


def _fit_head(net, x, target: np.ndarray, gain: float = 3.0) -> dict[str, np.ndarray]:
    """Ridge fit of the 3x3 head's centre tap and bias to the target logits (H, W, 3)."""
    import torch

    feats = {}
    handle = net.last_upsample.register_forward_hook(lambda m, i, o: feats.update(x=o))
    with torch.no_grad():
        net(x)
    handle.remove()
    f = feats["x"][0].numpy().reshape(64, -1).T.astype(np.float64)
    f = np.hstack([f, np.ones((len(f), 1))])
    gram = f.T @ f
    coef = np.linalg.solve(gram + 1e-4 * np.trace(gram) / len(gram) * np.eye(len(gram)),
                           f.T @ target.reshape(-1, 3)).T * gain
    weight = np.zeros((3, 64, 3, 3), np.float32)
    weight[:, :, 1, 1] = coef[:, :64]
    return {"final.0.weight": weight, "final.0.bias": coef[:, 64].astype(np.float32)}


def _apply(net, overrides: dict[str, np.ndarray]) -> None:
    import torch

    state = net.state_dict()
    for name, value in overrides.items():
        state[name].copy_(torch.from_numpy(np.asarray(value)))


def _overrides(net, role: str, images: Path, image_id: str) -> dict[str, np.ndarray]:
    import torch

    x = torch.from_numpy(_network_input(images, image_id, role))
    found = _calibrate(net, x)
    _apply(net, found)
    head = _fit_head(net, x, _targets(images, image_id, role, x.shape[2:]))
    return {**found, **head}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="folder of {ID}_{red,yellow,blue}.png")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padding", action="store_true", help="CellSegmentator(padding=True)")
    parser.add_argument("--overrides", type=Path, help="reuse {role}_overrides.npz from this folder")
    parser.add_argument("--weights", type=Path, help="also save the two networks here, pickled")
    args = parser.parse_args(argv)

    import skimage
    import torch

    _shim_original()
    from hpacellseg.cellsegmentator import CellSegmentator
    from hpacellseg.utils import label_cell
    from pytorch_zoo.unet import DPNUnet

    from hpasc.segmentation.dpn_unet import random_state
    from hpasc.segmentation.hpacellseg import golden_layout

    torch.manual_seed(args.seed)
    nets = {}
    for role, seed in (("nuclei", args.seed), ("cell", args.seed + 1)):
        net = DPNUnet(3)
        net.load_state_dict(random_state(net, seed))
        nets[role] = net.eval()
    ids = sorted(p.name[: -len("_blue.png")] for p in args.images.glob("*_blue.png"))
    if not ids:
        raise SystemExit(f"error: {args.images}: no {{ID}}_blue.png files")
    args.out.mkdir(parents=True, exist_ok=True)
    for role, net in nets.items():
        if args.overrides:
            with np.load(args.overrides / f"{role}_overrides.npz", allow_pickle=False) as npz:
                found = dict(npz)
        else:
            found = _overrides(net, role, args.images, ids[0])
        _apply(net, found)
        np.savez_compressed(args.out / f"{role}_overrides.npz", **found)
    if args.weights:
        args.weights.mkdir(parents=True, exist_ok=True)
        for role, net in nets.items():
            torch.save(net, args.weights / f"{role}.pth")

    seen: dict[str, np.ndarray] = {}

    def keep(role):
        def hook(module, inputs, output):
            seen[role] = torch.softmax(output, dim=1)[0].numpy()
        return hook

    for role, net in nets.items():
        net.register_forward_hook(keep(role))
    segmentator = CellSegmentator(nets["nuclei"], nets["cell"], scale_factor=0.25, device="cpu",
                                  padding=args.padding, multi_channel_model=True)
    for image_id in ids:
        red, yellow, blue = (_read(args.images / f"{image_id}_{c}.png") for c in ("red", "yellow", "blue"))
        nuclei_pred = segmentator.pred_nuclei([blue])[0]
        cell_pred = segmentator.pred_cells([[red], [yellow], [blue]])[0]
        for role in ("nuclei", "cell"):
            prob = seen[role].transpose(1, 2, 0)
            if args.padding:
                rows, cols = segmentator.scaled_shape
                prob = prob[32: 32 + rows, 32: 32 + cols]
            _write16(args.out / f"{image_id}_{role}_prob.png", np.rint(golden_layout(prob) * 65535.0))
        nuclei_mask, cell_mask = label_cell(nuclei_pred, cell_pred)
        _write16(args.out / f"{image_id}_nuclei_labels.png", nuclei_mask)
        _write16(args.out / f"{image_id}_cell_labels.png", cell_mask)
        print(f"{image_id}: {int(cell_mask.max())} cells, {len(np.unique(nuclei_mask)) - 1} nuclei")
    meta = {"seed": args.seed, "nuclei_seed": args.seed, "cell_seed": args.seed + 1,
            "padding": args.padding, "ids": ids, "torch": torch.__version__, "scikit-image": skimage.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__}
    (args.out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
