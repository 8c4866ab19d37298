"""``hpasc external``: the listing parser, the HPA location mapping and the downloader, against a real
HTTP server on 127.0.0.1 (tests/http_fixture.py) that plays the faults of a real one."""
from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from http_fixture import FixtureServer

from hpasc.cli import main as cli_main
from hpasc.external import (
    ExternalError,
    FetchOptions,
    ListingError,
    fetch_external,
    gunzip_bounded,
    image_id_from_url,
    is_complete,
    location_classes,
    read_listing,
)
from hpasc.io import CHANNELS, read_image

FAST = FetchOptions(connections=4, retries=3, timeout=1.0, backoff=0.01)
TINT = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}  # BGR weights


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def plane(seed: int, shape=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 255, shape).astype(np.float32), (0, 0), 3)
    return np.clip((base - base.min()) / (np.ptp(base) + 1e-6) * 250, 0, 255).astype(np.uint8)


def jpeg(gray: np.ndarray, color: str) -> bytes:
    """An HPA-style coloured JPEG of one channel."""
    bgr = np.stack([gray * w for w in TINT[color]], axis=-1).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def decoded_jpeg(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).max(axis=2)


def tif_gz(gray16: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, gray16)
    return gzip.compress(buf.getvalue(), mtime=0)


class World:
    """Fixture images on a server and a listing pointing at them."""

    def __init__(self, server: FixtureServer, tmp: Path):
        self.server, self.tmp = server, tmp
        self.expected: dict[str, dict[str, np.ndarray]] = {}
        self.rows: list[dict] = []

    def image(self, folder: str, name: str, label: str, cell_line: str = "U-2 OS", seed: int = 0,
              tif: tuple[str, ...] = (), jpg_missing: tuple[str, ...] = (), in_trainset: bool = False,
              serve: bool = True) -> str:
        prefix = f"/{folder}/{name}"
        image_id = f"{folder}_{name}"
        self.expected[image_id] = {}
        for k, color in enumerate(CHANNELS):
            gray = plane(seed * 10 + k)
            if serve and color not in jpg_missing:
                data = jpeg(gray, color)
                self.server.add(f"{prefix}_{color}.jpg", data)
                self.expected[image_id][color] = decoded_jpeg(data)
            if serve and color in tif:
                g16 = gray.astype(np.uint16) * 257 + 100
                self.server.add(f"{prefix}_{color}.tif.gz", tif_gz(g16))
                if color in jpg_missing:
                    self.expected[image_id][color] = ((g16.astype(np.uint32) + 128) // 257).astype(np.uint8)
        self.rows.append({"Image": self.server.url + prefix, "Label": label, "Cellline": cell_line,
                          "in_trainset": str(in_trainset)})
        return image_id

    def listing(self, name: str = "kaggle_2021.tsv", sep: str = ",") -> Path:
        path = self.tmp / name
        pd.DataFrame(self.rows).to_csv(path, index=False, sep=sep)
        return path

    def check_files(self, out: Path, image_id: str) -> None:
        for color in CHANNELS:
            got = cv2.imread(str(out / "train" / f"{image_id}_{color}.png"), cv2.IMREAD_UNCHANGED)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, self.expected[image_id][color], err_msg=f"{image_id} {color}")


# --------------------------------------------------------------------------- listing and labels


def test_location_names_map_to_the_competition_classes():
    assert location_classes("Cytosol,Focal adhesion sites,Midbody") == ((9, 16), ["Midbody"])
    assert location_classes("No staining") == ((18,), [])
    assert location_classes("No staining,Cytosol") == ((16,), [])  # Negative only when alone
    assert location_classes("Vesicles,Lysosomes,Peroxisomes,Endosomes,Lipid droplets,Cytoplasmic bodies") == ((17,), [])
    assert location_classes(" centriolar  satellite , CELL JUNCTIONS") == ((12, 13), [])
    assert location_classes("Nucleoli fibrillar center,Nucleoli") == ((2, 3), [])
    assert location_classes("Kinetochore,Rods & Rings") == ((), ["Kinetochore", "Rods & Rings"])
    assert location_classes("Negative") == ((), ["Negative"])  # the class is "No staining" in HPA


def test_image_ids_come_from_the_url_and_must_be_plain():
    assert image_id_from_url("https://images.proteinatlas.org/10005/921_B9_1") == "10005_921_B9_1"
    assert image_id_from_url("http://h:8/a/b/c/47549/1142_B1_2") == "47549_1142_B1_2"
    for bad in ("ftp://h/a/b", "/10005/921_B9_1", "https://h/only", "https://h/../..", "https://h/a/.hidden",
                "https:///a/b", "not a url"):
        assert image_id_from_url(bad) is None, bad


def test_listing_counts_every_row_it_does_not_keep(tmp_path):
    rows = [
        ("https://x/1/a_1", "Cytosol,Midbody", "U-2 OS", "False"),  # kept as 16, Midbody counted
        ("https://x/1/a_1", "Nucleoli", "U-2 OS", "False"),  # duplicate image
        ("https://x/2/b_1", "Nucleoplasm", "HeLa", "True"),  # a competition training image
        ("https://x/3/c_1", "Kinetochore", "HeLa", "False"),  # no competition class
        ("ftp://x/4/d_1", "Cytosol", "HeLa", "False"),  # bad URL
        ("https://x/5/e_1", "Mitotic spindle,Cytosol", "HeLa", "False"),
        ("https://x/6/f_1", "Aggresome", "A-431", "False"),
    ]
    path = tmp_path / "l.tsv"
    pd.DataFrame(rows, columns=["Image", "Label", "Cellline", "in_trainset"]).to_csv(path, index=False)
    with pytest.warns(RuntimeWarning, match="row 6"):
        sel = read_listing(path)
    assert list(sel.images["ID"]) == ["1_a_1", "5_e_1", "6_f_1"]
    assert list(sel.images["Label"]) == ["16", "11|16", "15"]
    assert list(sel.images["antibody"]) == ["1", "5", "6"]
    assert sel.counts == {"rows": 7, "duplicates": 1, "in the competition train set": 1,
                          "without a competition class": 1, "bad URL": 1, "selected": 3}
    assert sel.unknown_locations == {"Midbody": 1, "Kinetochore": 1}
    with pytest.warns(RuntimeWarning):
        assert list(read_listing(path, include_trainset=True).images["ID"]) == ["1_a_1", "2_b_1", "5_e_1", "6_f_1"]
        assert list(read_listing(path, cell_lines=["hela"]).images["ID"]) == ["5_e_1"]
        assert list(read_listing(path, classes=[11, 15]).images["ID"]) == ["5_e_1", "6_f_1"]
        assert list(read_listing(path, max_images=2).images["ID"]) == ["1_a_1", "5_e_1"]
    # the same listing tab-separated, and with an Antibody column
    tab = tmp_path / "t.tsv"
    pd.DataFrame(rows[:1], columns=["Image", "Label", "Cellline", "in_trainset"]).assign(
        Antibody="HPA000001").to_csv(tab, index=False, sep="\t")
    assert read_listing(tab).images.loc[0, "antibody"] == "HPA000001"


def test_listing_without_a_required_column_says_which(tmp_path):
    path = tmp_path / "l.csv"
    pd.DataFrame({"Image": ["https://x/1/a"], "Cellline": ["HeLa"]}).to_csv(path, index=False)
    with pytest.raises(ListingError, match=r"l.csv: missing column\(s\) Label"):
        read_listing(path)
    pd.DataFrame({"url": ["https://x/1/a"], "Label": ["Cytosol"]}).to_csv(path, index=False)
    with pytest.raises(ListingError, match=r"missing column\(s\) Image"):
        read_listing(path)
    with pytest.raises(ListingError, match="not found"):
        read_listing(tmp_path / "absent.tsv")


def test_gunzip_is_bounded_and_complete():
    data = os.urandom(1000)
    assert gunzip_bounded(gzip.compress(data)) == data
    bomb = gzip.compress(bytes(5 << 20))
    with pytest.raises(ValueError, match="more than 1 MB"):
        gunzip_bounded(bomb, limit=1 << 20)
    with pytest.raises(ValueError, match="truncated gzip"):
        gunzip_bounded(gzip.compress(data)[:-20])


# --------------------------------------------------------------------------- downloads


@pytest.fixture
def server():
    with FixtureServer(stall_seconds=3.0) as srv:
        yield srv


def test_faults_are_retried_fallen_back_or_reported(server, tmp_path):
    w = World(server, tmp_path)
    ok = w.image("101", "1_A1_1", "Cytosol", seed=1)
    tif = w.image("102", "1_A2_1", "Nucleoli", seed=2, tif=("red",), jpg_missing=("red",))  # 404 -> .tif.gz
    flaky = w.image("103", "1_A3_1", "Mitochondria", seed=3)
    server.fault("/103/1_A3_1_green.jpg", "500", "500")
    cut = w.image("104", "1_A4_1", "Aggresome", seed=4)
    server.fault("/104/1_A4_1_blue.jpg", "truncate")
    slow = w.image("105", "1_A5_1", "Golgi apparatus", seed=5)
    server.fault("/105/1_A5_1_yellow.jpg", "stall")
    gone = w.image("106", "1_A6_1", "Cytosol", seed=6, serve=False)
    bad_jpg = w.image("107", "1_A7_1", "Actin filaments", seed=7, tif=("green",))
    server.fault("/107/1_A7_1_green.jpg", "garbage", "garbage")  # never decodes -> the TIFF
    w.expected[bad_jpg]["green"] = ((plane(71).astype(np.uint32) * 257 + 100 + 128) // 257).astype(np.uint8)
    out = tmp_path / "out"
    report = fetch_external(w.listing(), out, FAST, progress=False)

    assert report.counts["downloaded"] == 6 and report.counts["failed"] == 1
    for image_id in (ok, tif, flaky, cut, slow, bad_jpg):
        w.check_files(out, image_id)
    assert server.requests("/103/1_A3_1_green.jpg") == [500, 500, 200]
    assert server.requests("/104/1_A4_1_blue.jpg") == ["truncate", 200]
    assert server.requests("/105/1_A5_1_yellow.jpg") == ["stall", 200]
    assert server.requests("/102/1_A2_1_red.jpg") == [404]  # a 404 is not retried
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["ID"]) == [gone]
    assert failures.loc[0, "reason"] == "jpg: HTTP 404; tif.gz: HTTP 404"
    assert failures.loc[0, "url"].endswith("/106/1_A6_1")
    train = pd.read_csv(out / "train.csv", dtype=str)
    assert list(train.columns) == ["ID", "Label", "source", "Cellline", "antibody", "url"]
    assert list(train["ID"]) == [ok, tif, flaky, cut, slow, bad_jpg]  # listing order, failures left out
    assert list(train["Label"]) == ["16", "2", "14", "15", "7", "9"]
    assert set(train["source"]) == {"hpa_public"} and train.loc[0, "antibody"] == "101"
    # the layout every other command reads
    assert read_image(out / "train", ok).shape == (40, 48, 4)

    # a re-run fetches nothing and touches nothing
    n_requests = len(server.log)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    again = fetch_external(w.listing(), out, FAST, progress=False)
    assert again.counts["already complete"] == 6 and again.counts["failed"] == 1
    assert len(server.log) - n_requests == 2  # only the failed image is asked again: its red jpg and tif.gz
    assert {p: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == mtimes


def test_a_half_written_or_cut_file_is_not_trusted(server, tmp_path):
    w = World(server, tmp_path)
    image_id = w.image("201", "2_B1_1", "Cytosol", seed=8)
    out = tmp_path / "out"
    fetch_external(w.listing(), out, FAST, progress=False)
    red = out / "train" / f"{image_id}_red.png"
    good = red.read_bytes()
    red.write_bytes(good[: len(good) // 2])  # what a crash without atomic writes would leave
    assert not is_complete(out / "train", image_id)
    report = fetch_external(w.listing(), out, FAST, progress=False)
    assert report.counts["downloaded"] == 1 and red.read_bytes() == good


def test_channels_of_different_sizes_fail_the_image(server, tmp_path):
    w = World(server, tmp_path)
    image_id = w.image("301", "3_C1_1", "Cytosol", seed=9)
    server.add("/301/3_C1_1_blue.jpg", jpeg(plane(1, shape=(20, 20)), "blue"))
    report = fetch_external(w.listing(), tmp_path / "out", FAST, progress=False)
    assert report.counts["failed"] == 1
    assert "channels differ in size" in report.failures.loc[0, "reason"]
    assert not any((tmp_path / "out" / "train").glob(f"{image_id}_*.png"))


def test_resize_and_one_size_per_folder(server, tmp_path):
    w = World(server, tmp_path)
    image_id = w.image("401", "4_D1_1", "Cytosol", seed=10)
    out = tmp_path / "out"
    fetch_external(w.listing(), out, FetchOptions(timeout=1.0, backoff=0.01, size=96), progress=False)
    assert read_image(out / "train", image_id).shape == (80, 96, 4)  # longer side 96, aspect kept
    with pytest.raises(ExternalError, match="--size 96, not 64"):
        fetch_external(w.listing(), out, FetchOptions(timeout=1.0, size=64), progress=False)


def test_shards_split_the_listing_and_combine_in_one_folder(server, tmp_path):
    w = World(server, tmp_path)
    ids = [w.image("501", f"5_E{k}_1", "Cytosol", seed=20 + k) for k in range(5)]
    listing, out = w.listing(), tmp_path / "out"
    first = fetch_external(listing, out, FAST, shard="0/2", progress=False)
    assert first.counts["in shard"] == 3
    assert list(pd.read_csv(out / "train.csv")["ID"]) == [ids[0], ids[2], ids[4]]
    second = fetch_external(listing, out, FAST, shard="1/2", progress=False)
    assert second.counts["in shard"] == 2 and second.counts["downloaded"] == 2
    assert list(pd.read_csv(out / "train.csv")["ID"]) == ids
    assert (out / "failures.shard0of2.csv").is_file() and (out / "failures.shard1of2.csv").is_file()
    # a copy of one shard's folder re-indexed offline lists what it holds
    offline = fetch_external(listing, out, FAST, offline=True, progress=False)
    assert offline.counts["already complete"] == 5
    with pytest.raises(ExternalError, match="shard"):
        fetch_external(listing, out, FAST, shard="2/2", progress=False)


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_killed_download_resumes_to_identical_files(server, tmp_path):
    w = World(server, tmp_path)
    ids = [w.image("601", f"6_F{k}_1", "Nucleoplasm", seed=40 + k, tif=("yellow",),
                   jpg_missing=("yellow",) if k == 2 else ()) for k in range(6)]
    server.hold("/601/6_F3_1_blue.jpg")  # image 3 hangs mid-way (red and green already fetched)
    listing = w.listing()
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "hpasc", "external", str(listing), "--out", str(tmp_path / "killed"),
           "--connections", "2", "--timeout", "60", "--backoff", "0.01"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        others = [i for k, i in enumerate(ids) if k != 3]
        assert _wait_for(lambda: all(is_complete(tmp_path / "killed" / "train", i) for i in others), 60)
        assert server.requests("/601/6_F3_1_blue.jpg") == ["hold"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed" / "train.csv").exists()  # killed before the index
    assert not is_complete(tmp_path / "killed" / "train", ids[3])
    server.release()
    n_before = len(server.log)
    resumed = fetch_external(listing, tmp_path / "killed", FAST, progress=False)
    assert resumed.counts == {"to fetch": 6, "already complete": 5, "downloaded": 1, "failed": 0}
    assert len(server.log) - n_before == 4  # only image 3's channels
    clean = fetch_external(listing, tmp_path / "clean", FAST, progress=False)
    assert clean.counts["downloaded"] == 6
    for image_id in ids:
        for color in CHANNELS:
            name = f"{image_id}_{color}.png"
            assert (tmp_path / "killed" / "train" / name).read_bytes() == (tmp_path / "clean" / "train" / name).read_bytes()
    assert (tmp_path / "killed" / "train.csv").read_bytes() == (tmp_path / "clean" / "train.csv").read_bytes()


def test_cli_summary_exit_codes_and_one_line_errors(server, tmp_path, capsys):
    w = World(server, tmp_path)
    w.image("701", "7_G1_1", "Cytosol", seed=50)
    w.image("702", "7_G2_1", "Cytosol", seed=51, serve=False)
    listing = w.listing()
    code = cli_main(["external", str(listing), "--out", str(tmp_path / "o"), "--timeout", "1", "--backoff", "0.01"])
    out = capsys.readouterr()
    assert code == 1  # one image failed: the summary says so and the exit code too
    assert "1 downloaded, 1 failed" in out.out and "7_G2_1" in out.out
    bad = tmp_path / "bad.csv"
    bad.write_text("Image,Cellline\nhttps://x/1/a,HeLa\n")
    assert cli_main(["external", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.csv: missing column(s) Label" in err[0]
    assert cli_main(["external", str(listing), "--out", str(tmp_path / "o3"), "--classes", "x"]) == 2
    assert "--classes 'x'" in capsys.readouterr().err
