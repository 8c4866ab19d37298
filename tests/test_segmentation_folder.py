"""Folder segmentation, the mask files and the ``hpasc segment`` command."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from builders import two_cell_image

from hpasc.cli import main
from hpasc.io import ImageReadError, write_image
from hpasc.segmentation import read_masks, segment_folder
from hpasc.segmentation.folder import list_image_ids, read_id_list


@pytest.fixture()
def images(tmp_path):
    img, _ = two_cell_image(size=192, gap=70)
    folder = tmp_path / "images"
    write_image(folder, "a", img, bits=8)
    write_image(folder, "b", img[:, ::-1], bits=16)
    return folder


def test_segment_folder_writes_16_bit_pngs_and_skips_done(images, tmp_path):
    out = tmp_path / "masks"
    assert segment_folder(images, out) == ["a", "b"]
    raw = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (192, 192)
    cells, nuclei = read_masks(out, "a")
    assert cells.dtype == np.int32 and cells.max() == 2
    assert set(np.unique(nuclei)) == {0, 1, 2}
    cells_b, _ = read_masks(out, "b")
    assert (cells_b > 0).sum() == (cells > 0).sum()
    # a done image is not redone: a marker written into its mask survives a second run
    marker = np.full((192, 192), 7, np.uint16)
    cv2.imwrite(str(out / "a.png"), marker)
    assert segment_folder(images, out, ids=["a", "b"]) == ["a", "b"]
    assert (read_masks(out, "a")[0] == 7).all()


def test_failing_image_is_warned_and_skipped(images, tmp_path):
    (images / "b_green.png").unlink()
    with pytest.warns(RuntimeWarning, match="b: segmentation failed.*b_green"):
        done = segment_folder(images, tmp_path / "m", ids=["a", "b"])
    assert done == ["a"]


def test_read_masks_errors(tmp_path):
    with pytest.raises(ImageReadError, match="x.png: missing mask file"):
        read_masks(tmp_path, "x")
    cv2.imwrite(str(tmp_path / "y.png"), np.zeros((4, 4), np.uint16))
    cv2.imwrite(str(tmp_path / "y_nuclei.png"), np.zeros((5, 4), np.uint16))
    with pytest.raises(ImageReadError, match="y_nuclei.png: shape"):
        read_masks(tmp_path, "y")
    (tmp_path / "z.png").write_bytes(b"not a png")
    (tmp_path / "z_nuclei.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="z.png: unreadable"):
        read_masks(tmp_path, "z")


def test_id_lists(images, tmp_path):
    assert list_image_ids(images) == ["a", "b"]
    csv = tmp_path / "ids.csv"
    csv.write_text("ID,Label\nb,0\na,1\nb,0\n")
    assert read_id_list(csv) == ["b", "a"]
    (tmp_path / "bad.csv").write_text("Name\na\n")
    with pytest.raises(ValueError, match="bad.csv: no ID column"):
        read_id_list(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: unreadable ID list"):
        read_id_list(tmp_path / "empty.csv")
    with pytest.raises(FileNotFoundError, match="nothere"):
        list_image_ids(tmp_path / "nothere")


def test_cli_segment(images, tmp_path, capsys):
    out = tmp_path / "cli_masks"
    csv = tmp_path / "ids.csv"
    csv.write_text("ID\na\n")
    assert main(["segment", str(images), "--out", str(out), "--ids", str(csv), "--overlay"]) == 0
    assert (out / "a.png").is_file() and (out / "a_nuclei.png").is_file()
    assert not (out / "b.png").exists()
    overlay = cv2.imread(str(out / "overlay" / "a.png"))
    assert overlay.shape == (192, 192, 3)
    assert "1 of 1 images" in capsys.readouterr().out
    assert main(["segment", str(images), "--out", str(out), "--backend", "classic",
                 "--set", "segmentation.scale=0.5"]) == 0
    assert (out / "b.png").is_file()


def test_cli_segment_shards_split_the_images(images, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(["segment", str(images), "--out", str(out), "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["b.png", "b_nuclei.png"]  # sorted IDs a, b: shard 1 is b
    assert "1 of 1 images" in capsys.readouterr().out
    assert main(["segment", str(images), "--out", str(out), "--shard", "0/2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "a_nuclei.png", "b.png", "b_nuclei.png"]
    assert main(["segment", str(images), "--out", str(out), "--shard", "0/0"]) == 2
    assert "shard 0/0" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_folder_parallel_workers(images, tmp_path):
    out = tmp_path / "par"
    assert segment_folder(images, out, workers=2) == ["a", "b"]
    serial = tmp_path / "ser"
    segment_folder(images, serial, workers=1)
    for image_id in ("a", "b"):
        np.testing.assert_array_equal(read_masks(out, image_id)[0], read_masks(serial, image_id)[0])
