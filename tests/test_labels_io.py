"""The lead's foundation modules: labels, paths and image I/O."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hpasc import paths
from hpasc.io import (
    CHANNELS,
    ImageReadError,
    channel_path,
    image_size,
    read_channel,
    read_image,
    to_uint,
    write_image,
)
from hpasc.labels import (
    CLASS_NAMES,
    NEGATIVE,
    NUM_CLASSES,
    LabelError,
    format_label,
    multihot_matrix,
    parse_label,
    to_multihot,
)

# ----------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("text, ids", [
    ("8|5|0", (0, 5, 8)),
    ("17|17", (17,)),
    ("0", (0,)),
    (" 1 | 2 ", (1, 2)),
    (18, (18,)),
    ("16|0|16|0", (0, 16)),
])
def test_parse_label(text, ids):
    assert parse_label(text) == ids


@pytest.mark.parametrize("text", ["", "19", "a", "-1", "1||2", "1.5"])
def test_parse_label_rejects(text):
    with pytest.raises(LabelError, match="label"):
        parse_label(text)


def test_format_label_and_multihot():
    assert format_label((16, 0, 16)) == "0|16"
    assert parse_label(format_label((8, 5, 0))) == (0, 5, 8)
    with pytest.raises(LabelError):
        format_label([])
    vec = to_multihot((0, 16))
    assert vec.dtype == np.float32 and vec.shape == (19,) and vec.sum() == 2 and vec[16] == 1
    mat = multihot_matrix(["8|5|0", "17|17", "18"])
    assert mat.shape == (3, 19) and mat.sum(axis=1).tolist() == [3, 1, 1] and mat[2, 18] == 1
    assert multihot_matrix([]).shape == (0, 19)


def test_class_table():
    assert NUM_CLASSES == len(CLASS_NAMES) == 19
    assert CLASS_NAMES[NEGATIVE] == "Negative" and CLASS_NAMES[11] == "Mitotic spindle"


# ------------------------------------------------------------------------------------------ paths

def test_data_root_resolution_order(tmp_path, monkeypatch):
    kaggle = tmp_path / "kaggle"
    monkeypatch.setenv("HPASC_KAGGLE_ROOT", str(kaggle))
    monkeypatch.delenv("HPASC_INPUT", raising=False)
    # nothing set, no Kaggle tree -> ./input/<competition>
    assert paths.data_root() == Path("input") / paths.COMPETITION
    assert not paths.on_kaggle()
    # a Kaggle tree appears -> it wins over ./input
    (kaggle / "input" / paths.COMPETITION).mkdir(parents=True)
    assert paths.on_kaggle()
    assert paths.data_root() == kaggle / "input" / paths.COMPETITION
    assert paths.kaggle_working() == kaggle / "working"
    # $HPASC_INPUT wins over Kaggle
    monkeypatch.setenv("HPASC_INPUT", str(tmp_path / "env"))
    assert paths.data_root() == tmp_path / "env"
    # an explicit argument wins over everything
    assert paths.data_root(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------------------------------------------- io

def _random_image(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 4), dtype=np.float32)


@pytest.mark.parametrize("bits", [8, 16])
def test_write_read_round_trip(tmp_path, bits):
    img = _random_image()
    write_image(tmp_path, "x", img, bits=bits)
    back = read_image(tmp_path, "x")
    assert back.shape == (24, 32, 4) and back.dtype == np.float32
    assert np.abs(back - img).max() <= 0.5 / (255 if bits == 8 else 65535) + 1e-7
    raw = cv2.imread(str(tmp_path / "x_green.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert image_size(tmp_path, "x") == (24, 32)


def test_16_bit_twin_of_an_8_bit_image_reads_identically(tmp_path):
    data8 = to_uint(_random_image(), 8)
    for k, color in enumerate(CHANNELS):
        cv2.imwrite(str(tmp_path / f"a_{color}.png"), data8[..., k])
        cv2.imwrite(str(tmp_path / f"b_{color}.png"), data8[..., k].astype(np.uint16) * 257)
    a, b = read_image(tmp_path, "a"), read_image(tmp_path, "b")
    assert np.array_equal(a, b)
    assert a.max() <= 1.0 and np.array_equal(np.rint(a * 255).astype(np.uint8), data8)


def test_channel_order_is_red_green_blue_yellow(tmp_path):
    for k, color in enumerate(CHANNELS):
        cv2.imwrite(str(tmp_path / f"c_{color}.png"), np.full((4, 5), 50 * (k + 1), np.uint8))
    img = read_image(tmp_path, "c")
    assert [round(float(img[0, 0, k]) * 255) for k in range(4)] == [50, 100, 150, 200]


def test_missing_channel_names_the_file(tmp_path):
    write_image(tmp_path, "m", _random_image())
    (tmp_path / "m_yellow.png").unlink()
    with pytest.raises(ImageReadError, match="m_yellow.png") as info:
        read_image(tmp_path, "m")
    assert "missing" in str(info.value)


def test_truncated_file_names_the_file(tmp_path):
    write_image(tmp_path, "t", _random_image(64, 64))
    blue = tmp_path / "t_blue.png"
    blue.write_bytes(blue.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="t_blue.png"):
        read_image(tmp_path, "t")
    (tmp_path / "junk_red.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk_red.png"):
        read_channel(tmp_path / "junk_red.png")


def test_size_mismatch_names_the_file(tmp_path):
    write_image(tmp_path, "s", _random_image(20, 20))
    cv2.imwrite(str(tmp_path / "s_blue.png"), np.zeros((20, 21), np.uint8))
    with pytest.raises(ImageReadError, match="s_blue.png") as info:
        read_image(tmp_path, "s")
    assert "21x20" in str(info.value)


def test_tif_and_jpg_sources(tmp_path):
    import tifffile

    data16 = to_uint(_random_image(16, 16), 16)
    for k, color in enumerate(CHANNELS):
        tifffile.imwrite(tmp_path / f"t_{color}.tif", data16[..., k])
    assert np.array_equal(read_image(tmp_path, "t"), data16.astype(np.float32) / np.float32(65535))
    assert channel_path(tmp_path, "t", "red").suffix == ".tif"

    flat = np.full((16, 16), 200, np.uint8)  # flat images survive JPEG almost exactly
    for color in CHANNELS:
        rgb = np.zeros((16, 16, 3), np.uint8)
        rgb[..., 1] = flat  # public HPA jpgs are colour renderings of one channel
        cv2.imwrite(str(tmp_path / f"j_{color}.jpg"), rgb)
    img = read_image(tmp_path, "j")
    assert img.shape == (16, 16, 4)
    assert np.abs(img - 200 / 255).max() < 4 / 255
    noisy = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "cut_red.jpg"), noisy)
    data = (tmp_path / "cut_red.jpg").read_bytes()
    (tmp_path / "cut_red.jpg").write_bytes(data[: len(data) // 2])  # OpenCV alone would accept it
    with pytest.raises(ImageReadError, match="cut_red.jpg"):
        read_channel(tmp_path / "cut_red.jpg")
    (tmp_path / "bad_red.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="bad_red.tif"):
        read_channel(tmp_path / "bad_red.tif")


def test_png_is_preferred_over_other_extensions(tmp_path):
    cv2.imwrite(str(tmp_path / "p_red.png"), np.full((3, 3), 10, np.uint8))
    cv2.imwrite(str(tmp_path / "p_red.jpg"), np.full((3, 3), 250, np.uint8))
    assert channel_path(tmp_path, "p", "red").name == "p_red.png"


def test_write_image_rejects_bad_shapes_and_bits(tmp_path):
    with pytest.raises(ValueError, match="H x W x 4"):
        write_image(tmp_path, "z", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="bits"):
        to_uint(np.zeros((2, 2)), bits=12)


@pytest.mark.real_data
def test_read_real_sample(real_hpa):
    image_id = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"
    img = read_image(real_hpa / "sample", image_id)
    assert img.shape == (2048, 2048, 4) and img.dtype == np.float32
    assert image_size(real_hpa / "sample", image_id) == (2048, 2048)
    vals = img[:64, :64].ravel() * 255  # 8-bit source: values are exact multiples of 1/255
    assert np.allclose(vals, np.rint(vals), atol=1e-3)
