"""Hostile and careless input on the image surface: image files, IDs that would become paths, model and
segmentation files, through ``read_image``, ``segment``, ``predict`` and the Kaggle kernel."""
from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hpasc.io import CHANNELS, ImageReadError, read_image, write_image
from hpasc.paths import BadIDError, check_id

REPO = Path(__file__).resolve().parents[1]
ESCAPES = ["../escape/x", "/tmp/hpasc_abs_escape", "sub/dir", "..", ".hidden", "C:drive", "back\\slash"]


def _image(size=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 4), dtype=np.float32)


# --------------------------------------------------------------------------- the ID rule

@pytest.mark.parametrize("bad", ESCAPES + ["", "a" * 201, "new\nline", None, 5])
def test_check_id_refuses_anything_but_plain_names(bad):
    with pytest.raises(BadIDError, match="not a plain name"):
        check_id(bad)


@pytest.mark.parametrize("good", ["5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0", "10580_1610_C1_1", "a.b", "A9"])
def test_real_id_shapes_pass(good):
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ESCAPES)
def test_reads_and_writes_never_follow_an_id_out_of_the_folder(tmp_path, bad):
    inside = tmp_path / "images"
    inside.mkdir()
    with pytest.raises(BadIDError):
        read_image(inside, bad)
    with pytest.raises(BadIDError):
        write_image(inside, bad, _image())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["images"]


def test_segment_with_an_escaping_id_list_writes_nothing(tmp_path, capsys):
    from hpasc.cli import main

    images = tmp_path / "images"
    write_image(images, "good", _image())
    ids = tmp_path / "ids.csv"
    pd.DataFrame({"ID": ["good", "../escape/x"]}).to_csv(ids, index=False)
    out = tmp_path / "masks"
    assert main(["segment", str(images), "--out", str(out), "--ids", str(ids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 2" in err[0] and "not a plain name" in err[0]
    assert not (tmp_path / "escape").exists()
    assert not out.exists() or not any(out.iterdir())  # refused before the good image was segmented


# --------------------------------------------------------------------------- image files

def test_a_truncated_jpeg_named_png_is_refused_by_content(tmp_path):
    write_image(tmp_path, "x", _image(128))
    red = tmp_path / "x_red.png"
    ok, jpeg = cv2.imencode(".jpg", (np.random.default_rng(1).random((128, 128)) * 255).astype(np.uint8))
    red.write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    with pytest.raises(ImageReadError, match=r"x_red\.png: truncated JPEG"):
        read_image(tmp_path, "x")
    red.write_bytes(jpeg.tobytes())  # the whole JPEG under a .png name is fine
    assert read_image(tmp_path, "x").shape == (128, 128, 4)


def test_a_truncated_png_is_refused(tmp_path):
    write_image(tmp_path, "x", _image(128))
    green = tmp_path / "x_green.png"
    data = green.read_bytes()
    green.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"x_green\.png: truncated PNG"):
        read_image(tmp_path, "x")


def test_a_png_header_claiming_a_huge_image_is_refused_undecoded(tmp_path):
    write_image(tmp_path, "x", _image(32))
    blue = tmp_path / "x_blue.png"
    data = bytearray(blue.read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR width, height
    blue.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="100000x100000 px"):
        read_image(tmp_path, "x")


# --------------------------------------------------------------------------- model files

class _Planted:
    """Unpickling this creates a marker file: the proof that a loader ran code from a data file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_cellpose_size_file_cannot_run_code(tmp_path):
    from hpasc.segmentation.cellpose_backend import SizeModelError, read_size_params

    marker = tmp_path / "ran"
    evil = tmp_path / "cp_size.npy"
    np.save(evil, np.array({"A": _Planted(marker), "smean": 0, "ymean": 0, "diam_mean": 30}, dtype=object),
            allow_pickle=True)
    with pytest.raises(SizeModelError, match="refusing to load"):
        read_size_params(evil)
    assert not marker.exists()
    # a raw pickle stream behind a valid .npy header: refused by the same unpickler
    raw = tmp_path / "raw_size.npy"
    header = evil.read_bytes()[: evil.read_bytes().index(b"\n") + 1]
    raw.write_bytes(header + pickle.dumps(_Planted(marker)))
    with pytest.raises(SizeModelError):
        read_size_params(raw)
    assert not marker.exists()
    # what cellpose itself writes loads: numbers only
    good = tmp_path / "good_size.npy"
    np.save(good, {"A": np.ones(4), "smean": np.zeros(4), "ymean": np.float64(0.5), "diam_mean": 17.0})
    params = read_size_params(good)
    assert params["diam_mean"] == 17.0 and params["A"].tolist() == [1.0] * 4
    np.save(good, np.zeros(3))
    with pytest.raises(SizeModelError, match="float64 array"):
        read_size_params(good)


@pytest.mark.slow  # builds a cellpose network
def test_the_cellpose_backend_refuses_a_planted_size_file(tmp_path):
    pytest.importorskip("cellpose", reason="cellpose (optional extra) not installed")
    from cellpose.resnet_torch import CPnet

    from hpasc.config import SegmentationConfig
    from hpasc.segmentation.cellpose_backend import CellposeBackend, SizeModelError

    path = tmp_path / "cpnet"
    CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0).save_model(str(path))
    marker = tmp_path / "ran"
    np.save(tmp_path / "cpnet_size.npy", np.array({"A": _Planted(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(SizeModelError):
        CellposeBackend(SegmentationConfig(backend="cellpose", cellpose_model=str(path), device="cpu"))
    assert not marker.exists()


# --------------------------------------------------------------------------- predict and the kernel

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_run):
    return make_run(tmp_path_factory.mktemp("runs"), "tiny", 0, seed=1)


def _sample(path: Path, ids, size=256):
    pd.DataFrame({"ID": ids, "ImageWidth": size, "ImageHeight": size, "PredictionString": ""}).to_csv(
        path, index=False)
    return path


def test_predict_refuses_an_escaping_sample_id_before_any_work(synth_small, tiny_run, tmp_path, monkeypatch):
    from hpasc import predict as P
    from hpasc.submission import SubmissionError

    ids = list(pd.read_csv(synth_small / "sample_submission.csv").ID)
    sample = _sample(tmp_path / "s.csv", ids + ["../escape/x"])
    reads = []
    monkeypatch.setattr("hpasc.io.read_image", lambda *a, **k: reads.append(a) or None)
    with pytest.raises(SubmissionError, match=r"row 4: image ID '\.\./escape/x' is not a plain name"):
        P.predict([tiny_run], synth_small / "test", sample, tmp_path / "out" / "sub.csv",
                  masks_dir=tmp_path / "masks", workers=1)
    assert reads == [] and not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_predict_refuses_a_duplicate_sample_id_before_any_work(synth_small, tiny_run, tmp_path):
    from hpasc import predict as P
    from hpasc.submission import SubmissionError

    ids = list(pd.read_csv(synth_small / "sample_submission.csv").ID)
    sample = _sample(tmp_path / "s.csv", ids + [ids[0]])
    with pytest.raises(SubmissionError, match="duplicate ID"):
        P.predict([tiny_run], synth_small / "test", sample, tmp_path / "sub.csv",
                  masks_dir=tmp_path / "masks", workers=1)
    assert not (tmp_path / "masks").exists()


def test_a_setup_fault_stops_predict_instead_of_emptying_every_row(synth_small, tiny_run, tmp_path):
    from hpasc import predict as P
    from hpasc.predict import PredictError

    args = ([tiny_run], synth_small / "test", synth_small / "sample_submission.csv", tmp_path / "sub.csv")
    with pytest.raises(PredictError, match="segmentation backend 'hpacellseg' cannot start"):
        P.predict(*args, seg_overrides=["backend=hpacellseg", "nuclei_weights=/nope/n.pth",
                                        "cell_weights=/nope/c.pth"], workers=1)
    with pytest.raises(PredictError, match="images folder not found"):
        P.predict(args[0], tmp_path / "no_images", *args[2:], workers=1)
    with pytest.raises(ValueError, match="recipe.*choices"):
        P.predict(*args, inference_overrides=["recipe=cell_x_imgae"], workers=1)
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.slow
def test_the_kernel_gives_an_escaping_id_its_empty_row(synth_small, tiny_run, tmp_path):
    from hpasc.paths import COMPETITION, MODELS_DATASET
    from hpasc.submission import read_submission

    root = tmp_path / "kaggle"
    comp = root / "input" / COMPETITION
    shutil.copytree(synth_small / "test", comp / "test")
    ids = list(pd.read_csv(synth_small / "sample_submission.csv").ID)
    _sample(comp / "sample_submission.csv", ids[:1] + ["../../escape"] + ids[1:])
    shutil.copytree(tiny_run, root / "input" / MODELS_DATASET / "tiny" / "fold0")
    env = {"HPASC_KAGGLE_ROOT": str(root), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "kernels" / "hpasc-inference" / "kernel.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = read_submission(root / "working" / "submission.csv")
    assert list(sub.ID) == ids[:1] + ["../../escape"] + ids[1:]
    assert sub.PredictionString.iat[1] == "" and (sub.PredictionString.drop(index=1) != "").all()
    assert "../../escape" in proc.stderr and "not a plain name" in proc.stderr
    assert not (tmp_path / "escape").exists() and not (root / "escape").exists()


@pytest.mark.slow
def test_the_kernel_stops_early_with_one_line_on_a_bad_setup(synth_small, tmp_path):
    from hpasc.paths import COMPETITION

    root = tmp_path / "kaggle"
    comp = root / "input" / COMPETITION
    shutil.copytree(synth_small / "test", comp / "test")
    shutil.copy(synth_small / "sample_submission.csv", comp / "sample_submission.csv")
    (root / "input" / "hpasc-models").mkdir(parents=True)  # no runs in the models dataset
    env = {"HPASC_KAGGLE_ROOT": str(root), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "kernels" / "hpasc-inference" / "kernel.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no <config>/fold<k>/ run" in last and "Traceback" not in proc.stderr


def test_a_broken_channel_costs_only_its_image_with_a_warning(synth_small, tiny_run, tmp_path, caplog):
    from hpasc import predict as P

    test = tmp_path / "test"
    shutil.copytree(synth_small / "test", test)
    ids = list(pd.read_csv(synth_small / "sample_submission.csv").ID)
    red = test / f"{ids[1]}_{CHANNELS[0]}.png"
    ok, jpeg = cv2.imencode(".jpg", np.zeros((256, 256), np.uint8))
    red.write_bytes(jpeg.tobytes()[: len(jpeg) // 3])  # a cut JPEG under the PNG name
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="hpasc.predict"):
        out = P.predict([tiny_run], test, synth_small / "sample_submission.csv", tmp_path / "sub.csv",
                        masks_dir=tmp_path / "masks", workers=1, stats=stats)
    sub = pd.read_csv(out, keep_default_na=False)
    assert sub.PredictionString.iat[1] == "" and (sub.PredictionString.drop(index=1) != "").all()
    assert "truncated JPEG" in stats["failed"][ids[1]]
    assert any(ids[1] in r.getMessage() and "truncated JPEG" in r.getMessage() for r in caplog.records)
