"""The Kaggle kernel in a simulated /kaggle tree, its offline install step, metadata and dataset packing."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpasc.paths import COMPETITION, MODELS_DATASET, WHEELS_DATASET

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels" / "hpasc-inference"
BUILD = REPO / "kernels" / "build_datasets.sh"


def load_kernel_module():
    spec = importlib.util.spec_from_file_location("hpasc_kernel", KERNEL_DIR / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the kernel only runs under __main__
    return module


def test_metadata_is_a_kaggle_kernel_with_offline_sources():
    meta = json.loads((KERNEL_DIR / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "kernel.py" and (KERNEL_DIR / meta["code_file"]).is_file()
    assert meta["competition_sources"] == [COMPETITION]
    assert sorted(s.split("/")[1] for s in meta["dataset_sources"]) == sorted([MODELS_DATASET, WHEELS_DATASET])
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["language"] == "python" and meta["kernel_type"] == "script"
    assert len(meta["id"].split("/")) == 2


def test_kernel_installs_from_the_wheels_only_when_import_fails(tmp_path, monkeypatch):
    kernel = load_kernel_module()
    assert kernel.WHEELS_DATASET == WHEELS_DATASET
    calls = []
    monkeypatch.setattr(kernel.subprocess, "check_call", lambda cmd: calls.append(cmd))
    kernel.ensure_installed("json")  # importable: nothing installed
    assert calls == []
    monkeypatch.setenv("HPASC_KAGGLE_ROOT", str(tmp_path))
    with pytest.raises(ImportError):  # the fake pip installs nothing, so the import still fails
        kernel.ensure_installed("hpasc_not_installed_anywhere")
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == str(tmp_path / "input" / WHEELS_DATASET)
    assert cmd[-1] == "hpasc_not_installed_anywhere"


def test_build_datasets_packs_runs_into_the_models_layout(tmp_path, make_run):
    make_run(tmp_path / "runs", "tiny", 0, seed=1)
    make_run(tmp_path / "runs", "tiny", 1, seed=2)
    make_run(tmp_path / "runs" / "tiny", "round1", 0, seed=3)  # a pseudo-label round keeps its level
    (tmp_path / "w.yaml").write_text("runs: {tiny: 1.0}\n")
    out = tmp_path / "dist"
    subprocess.run(["bash", str(BUILD), "--skip-wheels", "--runs", str(tmp_path / "runs" / "tiny"),
                    "--weights", str(tmp_path / "w.yaml"), "--out", str(out), "--owner", "me"],
                   check=True, capture_output=True)
    models = out / MODELS_DATASET
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()) == [
        "dataset-metadata.json", "tiny/fold0/best.pt", "tiny/fold0/config.yaml", "tiny/fold1/best.pt",
        "tiny/fold1/config.yaml", "tiny/round1/fold0/best.pt", "tiny/round1/fold0/config.yaml", "weights.yaml"]
    assert json.loads((models / "dataset-metadata.json").read_text())["id"] == f"me/{MODELS_DATASET}"
    # the kernel folder, its metadata pointing at the same owner's datasets (one place: --owner)
    meta = json.loads((out / "hpasc-inference" / "kernel-metadata.json").read_text())
    assert meta["id"] == "me/hpasc-inference"
    assert meta["dataset_sources"] == [f"me/{WHEELS_DATASET}", f"me/{MODELS_DATASET}"]
    assert (out / "hpasc-inference" / "kernel.py").read_text() == (KERNEL_DIR / "kernel.py").read_text()


@pytest.mark.slow
def test_kernel_writes_a_valid_submission_in_a_simulated_kaggle_tree(synth_small, tmp_path, make_run):
    """kernel.py as a subprocess: competition data + models dataset under HPASC_KAGGLE_ROOT."""
    from hpasc.submission import validate_submission

    root = tmp_path / "kaggle"
    comp = root / "input" / COMPETITION
    shutil.copytree(synth_small / "test", comp / "test")
    shutil.copy(synth_small / "sample_submission.csv", comp / "sample_submission.csv")
    make_run(tmp_path / "runs", "tiny", 0, seed=1)
    subprocess.run(["bash", str(BUILD), "--skip-wheels", "--runs", str(tmp_path / "runs"),
                    "--out", str(root / "input")], check=True, capture_output=True)
    (root / "working").mkdir()
    env = {**os.environ, "HPASC_KAGGLE_ROOT": str(root), "HPASC_TIME_BUDGET": "600"}
    proc = subprocess.run([sys.executable, str(KERNEL_DIR / "kernel.py")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "working" / "submission.csv"
    assert validate_submission(out, comp / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False)
    assert len(sub) == 3 and (sub["PredictionString"] != "").all()


def test_segmentation_weights_are_packed_and_found_again_on_kaggle(tmp_path, make_run):
    """A config naming hpacellseg weights by their training-machine path: build_datasets.sh packs the
    file under segmentation/, and predict_kaggle's overrides point at that copy once the original is gone."""
    from hpasc.predict.kaggle import relocated_segmentation_files

    train_side = tmp_path / "weights" / "dpn_unet_nuclei_v1.pth"
    train_side.parent.mkdir()
    train_side.write_bytes(b"nuclei")
    make_run(tmp_path / "runs", "seg", 0, seed=1, **{"segmentation.backend": "hpacellseg",
                                                     "segmentation.nuclei_weights": str(train_side)})
    out = tmp_path / "dist"
    subprocess.run(["bash", str(BUILD), "--skip-wheels", "--runs", str(tmp_path / "runs"), "--out", str(out)],
                   check=True, capture_output=True)
    models = out / MODELS_DATASET
    packed = models / "segmentation" / "dpn_unet_nuclei_v1.pth"
    assert packed.read_bytes() == b"nuclei"
    runs = [models / "seg" / "fold0"]
    assert relocated_segmentation_files(runs, models) == []  # the original still exists: left alone
    train_side.unlink()
    assert relocated_segmentation_files(runs, models) == [f"nuclei_weights={packed}"]


def test_build_datasets_names_a_missing_segmentation_file(tmp_path, make_run):
    make_run(tmp_path / "runs", "seg", 0, seed=1, **{"segmentation.backend": "hpacellseg",
                                                     "segmentation.cell_weights": str(tmp_path / "gone.pth")})
    proc = subprocess.run(["bash", str(BUILD), "--skip-wheels", "--runs", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "dist")], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "gone.pth" in proc.stderr


def _torch_only_site(dest: Path) -> Path:
    """A folder of links to torch, torchvision and what they require (transitively), nothing else: what a
    Kaggle image holds before hpasc is installed, without copying GBs of CUDA wheels."""
    import importlib.metadata as md
    import re

    # torch, torchvision, their plain requirements and the CUDA runtime torch brings (via extras)
    todo = ["torch", "torchvision"] + [d.metadata["Name"] for d in md.distributions()
                                       if re.match(r"(nvidia|cuda|triton)", d.metadata["Name"] or "", re.I)]
    seen = set()
    dest.mkdir(parents=True)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (dest / top).exists() and (site / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


@pytest.mark.slow
def test_offline_kaggle_path_end_to_end(tmp_path, make_run):
    """The whole path that produces a Kaggle score: build both datasets (wheels cached outside the clone),
    a fresh venv holding only torch/torchvision, competition images of the real sizes (16-bit), and
    kernel.py installing hpasc from the wheels and predicting with no network for its process."""
    import venv

    from hpasc.io import write_image
    from hpasc.submission import validate_submission
    from hpasc.synthetic.label_table import sample_label_set
    from hpasc.synthetic.render import generate_image
    from hpasc.synthetic.world import DUMMY_PREDICTION

    root = tmp_path / "kaggle"
    comp = root / "input" / COMPETITION
    rows = []
    for k, side in enumerate((1728, 2048, 3072)):
        rng = np.random.default_rng([5, k])
        image_id = f"real{side}"
        write_image(comp / "test", image_id, generate_image(rng, side, sample_label_set(rng), 0.5).image, bits=16)
        rows.append({"ID": image_id, "ImageWidth": side, "ImageHeight": side, "PredictionString": DUMMY_PREDICTION})
    pd.DataFrame(rows).to_csv(comp / "sample_submission.csv", index=False)
    make_run(tmp_path / "runs", "tiny", 0, seed=1)
    build = subprocess.run(["bash", str(BUILD), "--runs", str(tmp_path / "runs"), "--out", str(root / "input"),
                            "--owner", "someone"], capture_output=True, text=True, check=False, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    kernel_meta = json.loads((root / "input" / "hpasc-inference" / "kernel-metadata.json").read_text())
    assert kernel_meta["id"] == "someone/hpasc-inference"
    assert all(src.startswith("someone/") for src in kernel_meta["dataset_sources"])

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "kaggle_image.pth").write_text(str(_torch_only_site(tmp_path / "image-site")) + "\n")
    python = env_dir / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, importlib.util as u; "
                            "print(u.find_spec('hpasc'), u.find_spec('timm'), u.find_spec('skimage'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["None", "None", "None"]  # only torch and torchvision are there

    (root / "working").mkdir()
    closed = "http://127.0.0.1:9"  # nothing listens: any download attempt fails at once
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HPASC_KAGGLE_ROOT": str(root),
           "HPASC_TIME_BUDGET": "900", "http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed,
           "HTTPS_PROXY": closed, "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([str(python), str(root / "input" / "hpasc-inference" / "kernel.py")], env=env,
                          cwd=root / "working", capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    out = root / "working" / "submission.csv"
    assert validate_submission(out, comp / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub["ID"]) == [r["ID"] for r in rows] and (sub["PredictionString"] != "").all()
    installed = subprocess.run([str(python), "-c", "import hpasc; print(hpasc.__file__)"], env=env,
                               capture_output=True, text=True, check=True).stdout
    assert str(site) in installed  # installed into the fresh venv from the wheels dataset
