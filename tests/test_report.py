"""The HTML report renders from hand-made run folders; every image it references exists."""
from __future__ import annotations

import re

import numpy as np
import pytest
from builders import build_world, perfect

from hpasc.labels import CLASS_NAMES, NUM_CLASSES
from hpasc.report import build_report, composite, cooccurrence


def _images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_renders_with_every_section(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, n_images=6, n_folds=2, with_images=True)
    path = build_report([world["runs"] / "a"], tmp_path / "report", examples_per_class=1, progress=False)
    html = path.read_text()
    assert path.name == "index.html"
    refs = _images(html)
    assert set(refs) == {"ap_bars.png", "curves_a.png", "cooccurrence.png", "examples.png"}
    for ref in refs:
        png = path.parent / ref
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in CLASS_NAMES:
        assert name in html
    assert "competition AP" in html and "http" not in html  # no external resources
    assert "truth cells (images)" in html  # how many truth cells each class's cell AUC stands on


def test_report_without_images_notes_it_and_references_nothing_missing(tmp_path):
    world = build_world(tmp_path, {"a": perfect}, n_images=4, with_truth=False)
    path = build_report([world["runs"] / "a"], tmp_path / "r", progress=False)
    html = path.read_text()
    assert "No example cells" in html and "competition AP" not in html
    assert all((path.parent / ref).is_file() for ref in _images(html))
    assert "examples.png" not in _images(html)


def test_cooccurrence_counts():
    counts = cooccurrence({"a": (0, 16), "b": (0,), "c": (16, 18)})
    assert counts.shape == (NUM_CLASSES, NUM_CLASSES)
    assert counts[0, 0] == 2 and counts[16, 16] == 2 and counts[0, 16] == counts[16, 0] == 1
    assert counts[16, 18] == 1 and counts[0, 18] == 0 and counts.sum() == 2 + 2 + 1 + 2 + 2


def test_composite_maps_yellow_to_red_and_green():
    crop = np.zeros((2, 2, 4), np.uint8)
    crop[0, 0, 3] = 255
    crop[1, 1, 2] = 255
    rgb = composite(crop)
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(rgb[1, 1], [0.0, 0.0, 1.0])


def test_bad_log_names_the_file(tmp_path):
    from hpasc.report import read_log

    log = tmp_path / "log.csv"
    log.write_text("step,bce\n1,0.5\n")
    with pytest.raises(ValueError, match=r"log\.csv: no 'epoch' column"):
        read_log(log)
    log.write_text("")
    with pytest.raises(ValueError, match=r"log\.csv: unreadable training log"):
        read_log(log)


def test_example_title_names_the_cells_predictions():
    from hpasc.report import example_title

    probs = np.zeros(NUM_CLASSES)
    probs[[0, 5, 16]] = [0.31, 0.9, 0.55]
    targets = np.zeros(NUM_CLASSES)
    targets[[0, 16]] = 1
    assert example_title(probs, targets, 0) == "p=0.31 + [0,16]\npred 5:0.90 16:0.55"
    assert example_title(probs, targets, 5).startswith("p=0.90 - [0,16]")
