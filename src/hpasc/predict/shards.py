"""Writing the validated submission and its cell probabilities; shards and their merge."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import sharding
from ..fsutil import atomic_path, write_text_atomic
from ..runs import (  # the out-of-fold format; .cells.csv adds border and rel_area
    PROB_COLUMNS,
    read_oof,
)
from ..submission import (
    SubmissionError,
    read_submission,
    validate_submission,
    write_submission,
)
from .ensemble import PredictError

log = logging.getLogger(__name__)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"1/4"`` -> (1, 4) (``hpasc.sharding``), bad values as ``PredictError``."""
    return sharding.parse_shard(text, PredictError)


def cells_path(out: str | os.PathLike) -> Path:
    """``submissions/x.csv`` -> ``submissions/x.cells.csv`` (the raw cell probabilities)."""
    out = Path(out)
    return out.with_name(out.stem + ".cells.csv")


def shard_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shard.json")


def write_validated(rows: dict[str, str], sample_csv: Path, out: Path) -> None:
    """Write the submission atomically and validate it; rows the validator rejects are emptied (with a
    warning) and the file rewritten, so the result is always a valid file."""
    write_submission(rows, sample_csv, out)
    problems = validate_submission(out, sample_csv)
    if not problems:
        return
    for problem in problems:
        log.warning("%s: %s", out, problem)
    fatal = [p for p in problems if p.row == 0 or p.image_id not in rows]
    if fatal:  # a file-level problem (header, IDs) is a bug, not a bad row
        raise PredictError(f"{out}: the written submission is invalid: {fatal[0]}")
    bad = {p.image_id for p in problems}
    for image_id in bad:
        rows[image_id] = ""
    write_submission(rows, sample_csv, out)
    problems = validate_submission(out, sample_csv)
    if problems:
        raise PredictError(f"{out}: the written submission is invalid: {problems[0]}")


def _write_cells(frames: list[pd.DataFrame], path: Path) -> None:
    columns = ["ID", "cell_id", *PROB_COLUMNS, "border", "rel_area"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    with atomic_path(path) as tmp:
        df[columns].to_csv(tmp, index=False, float_format="%.6g")


def _finish(rows: dict[str, str], sample_csv: Path, out: Path, frames: list[pd.DataFrame],
            shard: tuple[int, int] | None, mine: list[str]) -> None:
    write_validated(rows, sample_csv, out)
    _write_cells(frames, cells_path(out))
    if shard:
        write_text_atomic(shard_path(out), json.dumps({"shard": list(shard), "ids": mine}))


def _read_part(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PredictError(f"{path}: submission part not found")
    try:
        return read_submission(path, kind="submission part")
    except SubmissionError as exc:  # unreadable, another header or a bad size
        raise PredictError(str(exc)) from None


def _owned_ids(part: Path, df: pd.DataFrame, shards: dict[int, Path], n_seen: set[int]) -> set[str]:
    """The IDs a part predicted: from its ``.shard.json``, else its non-empty rows."""
    meta = shard_path(part)
    if not meta.is_file():
        return set(df.loc[df["PredictionString"] != "", "ID"])
    info = json.loads(meta.read_text())
    i, n = info["shard"]
    if i in shards:
        raise PredictError(f"{part}: shard {i}/{n} was already given as {shards[i]}")
    shards[i] = part
    n_seen.add(n)
    return set(info["ids"])


def merge(out: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> Path:
    """Shard outputs -> one submission, identical to a single run over all images.

    All parts must list the same images (they are full-length files). Each image's row is taken from the
    part that predicted it (its ``.shard.json``; without one, the part whose row is non-empty). With
    shard files every shard 0..n-1 must be present exactly once.
    """
    out = Path(out)
    paths = [Path(p) for p in parts]
    if not paths:
        raise PredictError("merge: no parts given")
    frames = [_read_part(p) for p in paths]
    base = frames[0]
    for p, df in zip(paths[1:], frames[1:]):
        if not df[["ID", "ImageWidth", "ImageHeight"]].equals(base[["ID", "ImageWidth", "ImageHeight"]]):
            raise PredictError(f"{p}: lists other images or sizes than {paths[0]}")
    rows = {i: "" for i in base["ID"]}
    owner: dict[str, Path] = {}
    shards: dict[int, Path] = {}
    n_seen: set[int] = set()
    for p, df in zip(paths, frames):
        owned = _owned_ids(p, df, shards, n_seen)
        for image_id, text in zip(df["ID"], df["PredictionString"]):
            if image_id not in owned:
                continue
            if image_id in owner:
                raise PredictError(f"{p}: image {image_id} was already predicted by {owner[image_id]}")
            owner[image_id] = p
            rows[image_id] = text
    if shards:
        if len(n_seen) != 1:
            raise PredictError(f"merge: parts come from different shardings (n = {sorted(n_seen)})")
        (n,) = n_seen
        missing = sorted(set(range(n)) - set(shards))
        if missing or len(shards) != len(paths):
            raise PredictError(f"merge: shard(s) {missing} of {n} missing" if missing else
                               "merge: mixing parts with and without .shard.json")
    write_validated(rows, paths[0], out)
    cell_files = [cells_path(p) for p in paths]
    if all(f.is_file() for f in cell_files):
        _merge_cells(cell_files, list(base["ID"]), cells_path(out))
    return out


def _merge_cells(files: Sequence[Path], ids: list[str], out: Path) -> None:
    """The parts' ``.cells.csv`` -> one file ordered as a single run writes it (image order, cell id)."""
    # a header-only part (a shard whose images all failed) has object columns; concatenating it
    # would make the numbers objects and write them as reprs (1 -> 1.0), unlike a single run
    frames = [df for df in (pd.read_csv(f, dtype={"ID": str}) for f in files) if len(df)]
    if not frames:
        _write_cells([], out)
        return
    order = {image_id: k for k, image_id in enumerate(ids)}
    cells = pd.concat(frames, ignore_index=True)
    cells = cells.iloc[np.lexsort((cells["cell_id"].to_numpy(), cells["ID"].map(order).to_numpy()))]
    _write_cells([cells], out)


def load_cell_probs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The raw ensemble probabilities saved beside a submission (or the ``.cells.csv`` itself) ->
    {image ID: (n_cells, 19) float32, rows by ascending cell id}."""
    path = Path(path)
    if not path.name.endswith(".cells.csv"):
        path = cells_path(path)
    if not path.is_file():
        raise PredictError(f"{path}: cell probabilities not found (written by hpasc predict)")
    df = read_oof(path, PredictError).sort_values(["ID", "cell_id"], kind="stable")
    probs = df[list(PROB_COLUMNS)].to_numpy(np.float32)
    out = {}
    for image_id, rows in df.groupby("ID", sort=False).indices.items():
        out[image_id] = probs[rows]
    return out
