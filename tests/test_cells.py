"""Crops, cell table and crop cache on hand-made label maps with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hpasc.cells import cache as cellmod
from hpasc.cells import (
    CellCacheError,
    build_cell_cache,
    cell_boxes,
    cell_table,
    extract_crops,
    load_cell_cache,
)
from hpasc.config import CellsConfig
from hpasc.io import write_image, write_png_atomic


def two_cells() -> tuple[np.ndarray, np.ndarray]:
    """40 x 60 image: cell 1 = rows 10..30, cols 5..25 (red 1.0); cell 2 = rows 10..30, cols 25..45
    (red 0.5, touching cell 1); background elsewhere with red 0.2."""
    labels = np.zeros((40, 60), np.int32)
    labels[10:30, 5:25] = 1
    labels[10:30, 25:45] = 2
    image = np.zeros((40, 60, 4), np.float32)
    image[..., 0] = 0.2
    image[labels == 1, 0] = 1.0
    image[labels == 2, 0] = 0.5
    image[..., 2] = 0.4  # blue everywhere: background and cells
    return image, labels


# --------------------------------------------------------------------------- boxes


def test_cell_boxes_known_rectangles_and_absent_ids():
    labels = np.zeros((20, 30), np.int32)
    labels[2:5, 3:9] = 1
    labels[10:20, 0:1] = 3  # id 2 absent
    boxes = cell_boxes(labels)
    assert boxes.tolist() == [[2, 3, 5, 9], [0, 0, 0, 0], [10, 0, 20, 1]]
    assert cell_boxes(np.zeros((5, 5), np.int32)).shape == (0, 4)
    with pytest.raises(ValueError, match="2-D integer"):
        cell_boxes(np.zeros((5, 5), np.float32))


def test_cell_boxes_match_a_brute_force_on_random_maps():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 12, (37, 53)).astype(np.int32)
    labels[labels == 5] = 0  # an absent id in the middle
    boxes = cell_boxes(labels)
    assert boxes.shape == (11, 4)
    for k in range(1, 12):
        rows, cols = np.nonzero(labels == k)
        expected = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1] if len(rows) else [0, 0, 0, 0]
        assert boxes[k - 1].tolist() == expected, k


# --------------------------------------------------------------------------- crops


def test_crop_keeps_aspect_ratio_and_centres_the_box():
    labels = np.zeros((50, 80), np.int32)
    labels[10:30, 20:60] = 1  # 20 x 40 box
    image = np.zeros((50, 80, 4), np.float32)
    image[labels == 1] = 1.0
    crops = extract_crops(image, labels, size=40, padding=0.0)
    assert crops.shape == (1, 40, 40, 4) and crops.dtype == np.uint8
    # scale 1: the 20-row box sits in rows 10..30 of the square canvas, zeros above and below
    assert (crops[0, 10:30] == 255).all()
    assert (crops[0, :10] == 0).all() and (crops[0, 30:] == 0).all()
    # downscaled 2x: 10 rows of cell centred in 20 rows
    small = extract_crops(image, labels, size=20, padding=0.0)[0]
    assert (small[5:15] == 255).all() and (small[:5] == 0).all() and (small[15:] == 0).all()


def test_crop_padding_and_clipping_at_the_border():
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    image = np.zeros((40, 40, 4), np.float32)
    image[labels == 1, 1] = 1.0
    # padding 0.25 of the 20 px side = 5 px on each side -> 30 px window, scale 1 at size 30
    crop = extract_crops(image, labels, size=30, padding=0.25)[0, ..., 1]
    assert (crop[5:25, 5:25] == 255).all()
    assert crop.sum() == 20 * 20 * 255
    # a cell in the corner: the window is clipped by the image, not padded beyond it
    corner = np.zeros((40, 40), np.int32)
    corner[0:10, 0:10] = 1
    crop = extract_crops(image, corner, size=15, padding=0.5)[0, ..., 1]
    # window rows/cols 0..15 at scale 1: the image's green block (from 10, 10) appears at 10..15
    assert (crop[10:, 10:] == 255).all() and crop.sum() == 25 * 255


def test_neighbour_modes():
    image, labels = two_cells()
    # cell 1's window with padding 0.5: rows 0..40, cols 0..35 -> includes 10 columns of cell 2
    zero = extract_crops(image, labels, size=40, padding=0.5, neighbours="zero")
    keep = extract_crops(image, labels, size=40, padding=0.5, neighbours="keep")
    blur = extract_crops(image, labels, size=40, padding=0.5, neighbours="blur")
    # window 40 x 35 at scale 1, centred: columns offset (40 - 35) // 2 = 2
    ox = 2
    cell2_cols = slice(ox + 25, ox + 35)
    assert (keep[0, 10:30, cell2_cols, 0] == 128).all()  # 0.5 -> 128
    assert (zero[0, 10:30, cell2_cols] == 0).all()  # every channel of the neighbour is zeroed
    assert (zero[0, 10:30, ox + 5:ox + 25, 0] == 255).all()  # the cell itself untouched
    assert (zero[0, :10, ox:ox + 35, 0] == 51).all()  # background kept (0.2 -> 51)
    # blur: the neighbour region is neither the original nor zero, the cell itself is untouched
    region = blur[0, 10:30, cell2_cols, 0].astype(int)
    assert not (region == 128).all() and region.mean() > 20
    assert (blur[0, 12:28, ox + 5:ox + 22, 0] == 255).all()
    # crop 2 sees cell 1 zeroed in "zero" mode
    assert zero[1, ..., 0].max() == 128 and keep[1, ..., 0].max() == 255


def test_float_and_uint8_input_agree_and_absent_ids_are_blank():
    image, labels = two_cells()
    labels[labels == 2] = 3  # id 2 absent
    as_float = extract_crops(image, labels, size=32)
    as_uint8 = extract_crops(np.rint(image * 255).astype(np.uint8), labels, size=32)
    assert as_float.shape == (3, 32, 32, 4)
    assert np.array_equal(as_float, as_uint8)
    assert not as_float[1].any() and as_float[0].any() and as_float[2].any()


def test_extract_crops_rejects_bad_input():
    image, labels = two_cells()
    with pytest.raises(ValueError, match="H x W x 4"):
        extract_crops(image[..., :3], labels)
    with pytest.raises(ValueError, match="differs"):
        extract_crops(image, labels[:-1])
    with pytest.raises(ValueError, match="neighbours"):
        extract_crops(image, labels, neighbours="smudge")
    assert extract_crops(image, np.zeros_like(labels)).shape == (0, 128, 128, 4)


@pytest.mark.real_data
def test_crops_of_a_real_sample(real_hpa):
    import cv2

    from hpasc.io import read_image

    image_id = "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0"
    sample = real_hpa / "sample"
    labels = cv2.imread(str(sample / f"{image_id}_cellmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    crops = extract_crops(read_image(sample, image_id), labels, size=64)
    assert crops.shape == (labels.max(), 64, 64, 4)
    assert (crops.reshape(len(crops), -1, 4).max(axis=1) > 0).all()  # every channel of every crop has signal


# --------------------------------------------------------------------------- cell table


def test_cell_table_known_values():
    image, labels = two_cells()
    nuclei = np.zeros_like(labels)
    nuclei[15:20, 10:14] = 1  # 20 px nucleus of cell 1
    nuclei[12:14, 30:33] = 2  # 6 px of cell 2
    table = cell_table("img", image, labels, nuclei)
    assert table["ID"].tolist() == ["img", "img"] and table["cell_id"].tolist() == [1, 2]
    assert table[["y0", "x0", "y1", "x1"]].values.tolist() == [[10, 5, 30, 25], [10, 25, 30, 45]]
    assert table["area"].tolist() == [400, 400]
    assert table["nucleus_area"].tolist() == [20, 6]
    assert table["mean_red"].tolist() == pytest.approx([1.0, 0.5])
    assert table["max_red"].tolist() == pytest.approx([1.0, 0.5])
    assert table["mean_blue"].tolist() == pytest.approx([0.4, 0.4])
    assert table["mean_green"].tolist() == [0.0, 0.0]
    assert table["extent"].tolist() == pytest.approx([1.0, 1.0])  # rectangles fill their boxes
    assert table["solidity"].tolist() == pytest.approx([1.0, 1.0])
    assert table["eccentricity"].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # squares
    assert table["border"].tolist() == [False, False]
    assert table["rel_area"].tolist() == pytest.approx([1.0, 1.0])


def test_cell_table_of_an_image_without_cells_and_of_16_bit_input():
    image, labels = two_cells()
    empty = cell_table("none", image, np.zeros_like(labels), np.zeros_like(labels))
    assert len(empty) == 0 and {"ID", "cell_id", "area", "solidity", "mean_red"} <= set(empty.columns)
    as16 = cell_table("x", np.rint(image * 65535).astype(np.uint16), labels, np.zeros_like(labels))
    assert as16["mean_red"].tolist() == pytest.approx([1.0, 0.5], abs=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        cell_table("x", image, labels, np.zeros((3, 3), np.int32))


def test_cell_table_shape_features_survive_subsampling():
    labels = np.zeros((1100, 1100), np.int32)
    yy, xx = np.mgrid[:1100, :1100]
    labels[(yy - 500) ** 2 / 200**2 + (xx - 500) ** 2 / 100**2 <= 1] = 1  # ellipse, axes 400 x 200
    labels[1051, 1051:1053] = 2  # 1 x 2 px on an odd row: vanishes at step 2, measured at full resolution
    image = np.zeros(labels.shape + (4,), np.float32)
    table = cell_table("e", image, labels, np.zeros_like(labels))
    assert table.loc[0, "major_axis_length"] == pytest.approx(400, rel=0.02)
    assert table.loc[0, "minor_axis_length"] == pytest.approx(200, rel=0.02)
    assert table.loc[0, "eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), abs=0.01)
    assert table.loc[1, "area"] == 2 and table.loc[1, "solidity"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- cache


def make_dataset(root, n_images=3, size=96):
    """Synthetic images + their true label maps written as a segmentation output folder."""
    from hpasc.synthetic import generate_image

    images, masks = root / "images", root / "masks"
    ids = []
    for k in range(n_images):
        img = generate_image(k, size, (k % 3,))
        image_id = f"img{k}"
        write_image(images, image_id, img.image)
        write_png_atomic(masks / f"{image_id}.png", img.cells.astype(np.uint16))
        write_png_atomic(masks / f"{image_id}_nuclei.png", img.nuclei.astype(np.uint16))
        ids.append(image_id)
    labels = pd.DataFrame({"ID": ids, "Label": [str(k % 3) for k in range(n_images)],
                           "fold": list(range(n_images))})
    return images, masks, ids, labels


def test_cache_round_trip_and_incremental_rebuild(tmp_path, monkeypatch):
    from hpasc.io import read_image
    from hpasc.segmentation import read_masks

    images, masks, ids, labels = make_dataset(tmp_path)
    cfg = CellsConfig(size=32)
    out = tmp_path / "cache"
    built = []
    real_build = cellmod._build_part
    monkeypatch.setattr(cellmod, "_build_part", lambda job: built.append(job[2]) or real_build(job))

    cache = build_cell_cache(images, masks, ids, cfg, out, labels=labels)
    assert built == ids
    loaded = load_cell_cache(out)
    assert isinstance(loaded.crops, np.memmap) and loaded.crops.shape[1:] == (32, 32, 4)
    assert len(loaded) == len(loaded.table) == len(cache)
    # crops and table rows line up with a direct extraction, in ids order
    row = 0
    for k, image_id in enumerate(ids):
        cells, _ = read_masks(masks, image_id)
        direct = extract_crops(read_image(images, image_id), cells, 32, cfg.padding, cfg.neighbours)
        part = loaded.table.iloc[row:row + len(direct)]
        assert np.array_equal(np.asarray(loaded.crops[row:row + len(direct)]), direct)
        assert (part["ID"] == image_id).all() and part["cell_id"].tolist() == list(range(1, len(direct) + 1))
        assert (part["Label"] == str(k % 3)).all() and (part["fold"] == k).all()
        row += len(direct)
    assert not isinstance(load_cell_cache(out, mmap=False).crops, np.memmap)  # in-memory copy

    # unchanged: nothing recomputed, same crops file
    crops_files = sorted(p.name for p in out.glob("crops-*.npy"))
    built.clear()
    build_cell_cache(images, masks, ids, cfg, out, labels=labels)
    assert built == [] and sorted(p.name for p in out.glob("crops-*.npy")) == crops_files

    # new labels are picked up without recomputing crops
    relabelled = labels.assign(Label="18")
    assert (build_cell_cache(images, masks, ids, cfg, out, labels=relabelled).table["Label"] == "18").all()
    assert built == []

    # one image re-segmented (cells 1 and 2 merged) -> only that image is recomputed
    cells, nuclei = read_masks(masks, ids[1])
    cells = np.where(cells == 2, 1, np.where(cells > 2, cells - 1, cells))
    write_png_atomic(masks / f"{ids[1]}.png", cells.astype(np.uint16))
    again = build_cell_cache(images, masks, ids, cfg, out, labels=labels)
    assert built == [ids[1]]
    assert len(again) == len(cache) - 1
    assert len(list(out.glob("crops-*.npy"))) == 1 and not (out / "parts").exists()

    # another crop size is another key: everything recomputed
    built.clear()
    bigger = build_cell_cache(images, masks, ids, CellsConfig(size=40), out, labels=labels)
    assert built == ids and bigger.crops.shape[1] == 40


def test_cache_errors(tmp_path):
    with pytest.raises(CellCacheError, match="meta.json"):
        load_cell_cache(tmp_path)
    images, masks, ids, labels = make_dataset(tmp_path, n_images=1, size=64)
    with pytest.raises(CellCacheError, match="mask file missing"):
        build_cell_cache(images, masks, ids + ["nope"], CellsConfig(size=16), tmp_path / "c")
    out = tmp_path / "c2"
    build_cell_cache(images, masks, ids, CellsConfig(size=16), out)
    (out / "cells.csv").write_text("ID,cell_id\nimg0,1\n")
    with pytest.raises(CellCacheError, match="rows"):
        load_cell_cache(out)
    (out / "cells.csv").unlink()  # a lost table: the next build starts over instead of failing
    rebuilt = build_cell_cache(images, masks, ids, CellsConfig(size=16), out)
    first = build_cell_cache(images, masks, ids, CellsConfig(size=16), tmp_path / "c3")  # a clean build
    assert len(rebuilt) == len(first) and np.array_equal(rebuilt.crops, first.crops)


def test_cli_cells(tmp_path, capsys):
    from hpasc.cli import main

    images, masks, ids, labels = make_dataset(tmp_path, n_images=2, size=64)
    labels.to_csv(tmp_path / "folds.csv", index=False)
    out = tmp_path / "cache"
    assert main(["cells", "--images", str(images), "--masks", str(masks), "--labels",
                 str(tmp_path / "folds.csv"), "--out", str(out), "--size", "24"]) == 0
    assert "cells of 2 images" in capsys.readouterr().out
    cache = load_cell_cache(out)
    assert cache.crops.shape[1:] == (24, 24, 4) and cache.key["size"] == 24
    assert set(cache.table["ID"]) == set(ids) and "fold" in cache.table


def test_interrupted_build_resumes_from_parts(tmp_path, monkeypatch):
    images, masks, ids, labels = make_dataset(tmp_path, n_images=3, size=64)
    cfg, out = CellsConfig(size=16), tmp_path / "cache"
    extracted = []
    real_extract = cellmod.extract_crops
    monkeypatch.setattr(cellmod, "extract_crops", lambda *a, **k: extracted.append(1) or real_extract(*a, **k))
    real_read = cellmod.read_image

    def failing_read(folder, image_id):
        if image_id == ids[2]:
            raise OSError("disk gone")
        return real_read(folder, image_id)

    monkeypatch.setattr(cellmod, "read_image", failing_read)
    with pytest.raises(OSError, match="disk gone"):
        build_cell_cache(images, masks, ids, cfg, out)
    assert len(extracted) == 2 and not (out / "meta.json").exists()
    monkeypatch.setattr(cellmod, "read_image", real_read)
    cache = build_cell_cache(images, masks, ids, cfg, out)
    assert len(extracted) == 3  # only the image that failed was cropped again
    assert list(dict.fromkeys(cache.table["ID"])) == ids


@pytest.mark.slow
def test_parallel_build_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(cellmod, "MIN_IMAGES_PER_WORKER", 1)
    images, masks, ids, labels = make_dataset(tmp_path, n_images=3, size=64)
    serial = build_cell_cache(images, masks, ids, CellsConfig(size=16), tmp_path / "a", workers=1)
    parallel = build_cell_cache(images, masks, ids, CellsConfig(size=16), tmp_path / "b", workers=2)
    assert np.array_equal(np.asarray(serial.crops), np.asarray(parallel.crops))
    pd.testing.assert_frame_equal(serial.table, parallel.table)


def test_cli_cells_reports_errors(tmp_path, capsys):
    from hpasc.cli import main

    assert main(["cells", "--images", str(tmp_path), "--masks", str(tmp_path / "none"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "masks folder not found" in capsys.readouterr().err


def test_shards_built_on_two_machines_merge_by_file_name(tmp_path, monkeypatch):
    """Shard 0 and shard 1 cropped in separate folders from separately copied masks (other mtimes), their
    parts copied together: the merge crops nothing again and equals a one-machine build."""
    import shutil

    from hpasc.cli import main

    images, masks, ids, labels = make_dataset(tmp_path, n_images=5, size=64)
    cfg = CellsConfig(size=16)
    single = build_cell_cache(images, masks, ids, cfg, tmp_path / "single", labels=labels)
    extracted = []
    real_extract = cellmod.extract_crops
    monkeypatch.setattr(cellmod, "extract_crops", lambda *a, **k: extracted.append(1) or real_extract(*a, **k))
    machines = []
    for i in range(2):
        own_masks = tmp_path / f"m{i}" / "masks"  # only this shard's masks, copied (other mtimes)
        own_masks.mkdir(parents=True)
        for image_id in ids[i::2]:
            for path in masks.glob(f"{image_id}*.png"):
                shutil.copy(path, own_masks)
        assert build_cell_cache(images, own_masks, ids, cfg, tmp_path / f"m{i}" / "cache", shard=(i, 2)) == [3, 2][i]
        machines.append(tmp_path / f"m{i}" / "cache")
    assert len(extracted) == 5
    assert not (machines[0] / "meta.json").exists()  # a shard writes only its parts
    merged = tmp_path / "merged"
    shutil.copytree(machines[0], merged)
    for part in (machines[1] / "parts").iterdir():
        shutil.copy(part, merged / "parts")
    merged_masks = tmp_path / "merged_masks"
    shutil.copytree(masks, merged_masks)
    cache = build_cell_cache(images, merged_masks, ids, cfg, merged, labels=labels)
    assert len(extracted) == 5  # nothing cropped again
    assert np.array_equal(np.asarray(cache.crops), np.asarray(single.crops))
    pd.testing.assert_frame_equal(cache.table, single.table)
    # the CLI: a shard run says where its parts went
    labels.to_csv(tmp_path / "folds.csv", index=False)
    assert main(["cells", "--images", str(images), "--masks", str(masks), "--labels", str(tmp_path / "folds.csv"),
                 "--out", str(tmp_path / "cli"), "--size", "16", "--shard", "1/2"]) == 0
    assert len(list((tmp_path / "cli" / "parts").glob("*.npy"))) == 2
    assert main(["cells", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "x"),
                 "--shard", "2/2"]) == 2


def test_cell_channel_mean_and_the_tables_stain():
    from hpasc.cells.features import cell_channel_mean, table_stain

    image = np.zeros((4, 6, 4), np.uint16)
    cells = np.zeros((4, 6), np.int32)
    cells[:, :2], cells[:, 2:4], cells[:, 4:] = 1, 2, 3
    image[1, 0, 1], image[2, 3, 1], image[0, 5, 1] = 100, 40, 8  # each cell has 8 pixels
    image[0, 3, 0] = 999  # red: not the protein channel
    assert cell_channel_mean(image, cells).tolist() == [12.5, 5.0, 1.0]
    assert cell_channel_mean(image, cells, "red").tolist() == [0, 999 / 8, 0]
    table = pd.DataFrame({"ID": ["a", "b", "a", "a"], "mean_green": [10.0, 3.0, 2.0, 20.0]})
    # image a: dimmest 2, 90th percentile of (10, 2, 20) = 18; image b alone
    assert table_stain(table) == pytest.approx([8 / 16, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="mean_green"):
        table_stain(table.drop(columns="mean_green"))
