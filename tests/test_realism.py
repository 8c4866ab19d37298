"""hpasc realism: field statistics of hand-made label maps, sources, comparison and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpasc.io import write_image, write_png_atomic
from hpasc.synthetic import realism
from hpasc.synthetic.layout import make_layout


def _three_squares():
    """100 x 100: cells 1 and 2 share an edge, cell 3 stands alone at the top-left corner."""
    cells = np.zeros((100, 100), np.int32)
    cells[40:60, 20:40] = 1
    cells[40:60, 40:60] = 2
    cells[0:10, 0:10] = 3
    image = np.full((100, 100, 4), 0.1, np.float32)
    image[cells > 0] = 0.5
    return image, cells


def test_field_stats_of_hand_made_squares():
    image, cells = _three_squares()
    s = realism.field_stats(image, cells, "squares")
    assert s.cells == 3 and s.side == 100
    assert s.coverage == pytest.approx((400 + 400 + 100) / 10_000)
    assert s.touching == pytest.approx(2 / 3)
    assert s.border == pytest.approx(1 / 3)
    assert s.solidity == pytest.approx(1.0)
    assert s.diameter == pytest.approx(np.sqrt(4 * 400 / np.pi) / 100)
    areas = np.array([400, 400, 100])
    assert s.size_cv == pytest.approx(areas.std() / areas.mean())
    for c in ("red", "green", "blue", "yellow"):
        assert s.background[c] == pytest.approx(0.1)
        assert s.contrast[c] == pytest.approx((0.5 - 0.1) / 0.5)
        assert sum(s.hist[c]) == pytest.approx(1.0)
    values = s.values()
    assert values["touching"] == pytest.approx(2 / 3) and values["yellow.contrast"] == pytest.approx(0.8)


def test_touching_across_a_thin_seam_only():
    cells = np.zeros((60, 60), np.int32)
    cells[10:30, 10:20] = 1
    cells[10:30, 22:32] = 2  # a 2 px seam
    cells[10:30, 45:55] = 3  # 13 px away
    assert realism.touching_cells(cells, 0).tolist() == [False, False, False, False]
    assert realism.touching_cells(cells, 2).tolist() == [False, True, True, False]


def test_concave_cell_has_lower_solidity():
    image = np.zeros((80, 80, 4), np.float32)
    ell = np.zeros((80, 80), np.int32)
    ell[10:70, 10:30] = 1
    ell[50:70, 30:70] = 1  # an L: hull area larger than the cell
    s = realism.field_stats(image, ell)
    assert 0.6 < s.solidity < 0.85


def test_big_maps_are_measured_reduced_with_the_same_ratios():
    image, cells = _three_squares()
    big = np.kron(cells, np.ones((30, 30), np.int32))  # 3000 px, reduced to 1024 for geometry
    s, b = realism.field_stats(image, cells), realism.field_stats(np.kron(image, np.ones((30, 30, 1))), big)
    assert b.side == 3000 and b.cells == 3
    for name in ("coverage", "touching", "border", "diameter"):
        assert getattr(b, name) == pytest.approx(getattr(s, name), abs=0.01)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        realism.field_stats(np.zeros((10, 12, 4), np.float32), np.zeros((10, 10), np.int32), "x")


def test_compare_says_where_the_other_median_lies():
    image, cells = _three_squares()
    ref = [realism.field_stats(image, cells, "a"), realism.field_stats(image, cells, "b")]
    sparse = cells.copy()
    sparse[sparse == 2] = 0  # one cell fewer, none touching
    other = [realism.field_stats(image, sparse, "c")]
    rows = {r.measure: r for r in realism.compare(ref, other)}
    assert rows["cells"].verdict == "lower" and rows["cells"].other == (2.0, 2.0, 2.0)
    assert rows["touching"].verdict == "lower"
    assert rows["solidity"].verdict == "within"
    assert rows["red.background"].reference == pytest.approx((0.1, 0.1, 0.1))
    text = realism.format_comparison(list(rows.values()))
    assert text.splitlines()[0].startswith("measure") and "lower" in text
    with pytest.raises(ValueError, match="at least one image"):
        realism.compare(ref, [])


def test_synthetic_layout_is_as_irregular_as_real_cells():
    """The generator's outlines and sizes sit in the range of the four real HPA samples
    (solidity 0.885-0.95, size CV 0.49-0.77; ``hpasc realism ../shared/hpa/sample WORLD``)."""
    solidity, size_cv = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        lay = make_layout(rng, 384, int(rng.integers(10, 33)))
        s = realism.field_stats(np.zeros((384, 384, 4), np.float32), lay.cells)
        solidity.append(s.solidity)
        size_cv.append(s.size_cv)
    assert 0.88 <= np.median(solidity) <= 0.95
    assert 0.45 <= np.median(size_cv) <= 0.8


def _folder_source(tmp_path, name, suffix):
    image, cells = _three_squares()
    folder = tmp_path / name
    folder.mkdir()
    write_image(folder, "img1", image)
    write_png_atomic(folder / f"img1{suffix}.png", cells.astype(np.uint16))
    return folder


def test_sources_folder_and_world(tmp_path):
    from hpasc.synthetic import synthesize

    folder = _folder_source(tmp_path, "real", "_cellmask")
    [(image_id, image, cells)] = list(realism.source_fields(folder))
    assert image_id == "img1" and image.shape == (100, 100, 4) and cells.max() == 3
    world = synthesize(tmp_path / "world", 2, 1, size=128, seed=3)
    stats = realism.measure_source(world, split="test")
    assert len(stats) == 1 and stats[0].side == 128 and stats[0].cells > 0
    empty = tmp_path / "nomasks"
    empty.mkdir()
    write_image(empty, "img1", np.zeros((8, 8, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="no label map"):
        list(realism.source_fields(empty))
    with pytest.raises(FileNotFoundError, match="folder not found"):
        realism.source_fields(tmp_path / "absent")


def test_cli_table_json_and_plot(tmp_path, capsys):
    from hpasc.cli import main

    real = _folder_source(tmp_path, "real", "_cellmask")
    ours = _folder_source(tmp_path, "ours", "")
    plot = tmp_path / "realism.png"
    assert main(["realism", str(real), str(ours), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "touching" in out and plot.stat().st_size > 1000
    assert main(["realism", str(real), str(ours), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.splitlines()[0])
    assert payload["reference_images"] == ["img1"]
    assert {m["verdict"] for m in payload["measures"]} == {"within"}
    assert main(["realism", str(real), str(tmp_path / "absent")]) == 2
    assert "folder not found" in capsys.readouterr().err
