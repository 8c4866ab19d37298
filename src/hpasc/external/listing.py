"""The organisers' listing of public HPA images (``kaggle_2021.tsv``) -> the images to fetch, with labels
in the competition's 19 classes.

The listing is comma-separated despite its name (a tab-separated copy is read too). Columns:
``Image`` (URL prefix of the four channel files, e.g. ``https://images.proteinatlas.org/10005/921_B9_1``),
``Label`` (comma-separated HPA location names), and optionally ``Cellline``, ``in_trainset`` (the image is
already one of the competition's training images), ``Label_idx`` (used only when ``Label`` is absent) and
``Antibody``. An image's ID is the last two parts of its URL path (``10005_921_B9_1``); its antibody the
``Antibody`` column, else the first of those two parts (HPA folders images by antibody).
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from ..fsutil import read_csv
from ..labels import CLASS_NAMES, NEGATIVE, LabelError, format_label, parse_label
from ..paths import is_plain_id


class ListingError(ValueError):
    """A listing that cannot be used (missing file or column, unknown filter value). Names the file."""


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().lower()


# HPA location name -> competition class: the 19 class names themselves, plus the finer locations the
# organisers merged into them. Anything else (Midbody, Kinetochore, Rods & Rings...) has no class.
_MERGED = {
    "Focal adhesion sites": 9,
    "Centriolar satellite": 12,
    "Cell Junctions": 13,
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    "Cytoplasmic bodies": 17,
    "No staining": NEGATIVE,
}
LOCATION_CLASSES: dict[str, int] = {
    **{_norm(name): k for k, name in enumerate(CLASS_NAMES) if k != NEGATIVE},
    **{_norm(name): k for name, k in _MERGED.items()},
}

REQUIRED = ("Image",)
SOURCE = "hpa_public"


def location_classes(names: str) -> tuple[tuple[int, ...], list[str]]:
    """``"Cytosol,Focal adhesion sites,Midbody"`` -> ((9, 16), ["Midbody"]): the classes and the names
    without one. Negative is dropped when the image also has a real location."""
    classes, unknown = set(), []
    for name in str(names).split(","):
        if not name.strip():
            continue
        k = LOCATION_CLASSES.get(_norm(name))
        if k is None:
            unknown.append(name.strip())
        else:
            classes.add(k)
    if len(classes) > 1:
        classes.discard(NEGATIVE)
    return tuple(sorted(classes)), unknown


def image_id_from_url(url: str) -> str | None:
    """``https://host/10005/921_B9_1`` -> ``10005_921_B9_1``; None when the URL is not http(s) or its
    last two path parts are not plain names (``hpasc.paths.check_id``)."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    path = [p for p in parts.path.split("/") if p]
    if len(path) < 2:
        return None
    if not (is_plain_id(path[-2]) and is_plain_id(path[-1])):
        return None
    image_id = f"{path[-2]}_{path[-1]}"
    return image_id if is_plain_id(image_id) else None


def _truthy(value) -> bool:
    return _norm(value) in ("true", "1", "yes", "t")


@dataclass
class Selection:
    """The images chosen from a listing and what happened to the other rows."""

    images: pd.DataFrame  # ID, url, Label, Cellline, antibody, in listing order
    counts: dict[str, int] = field(default_factory=dict)
    unknown_locations: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{v} {k}" for k, v in self.counts.items()]
        text = "listing: " + ", ".join(parts)
        if self.unknown_locations:
            top = ", ".join(f"{n} ({c})" for n, c in self.unknown_locations.most_common(5))
            text += f"; locations without a competition class: {top}"
        return text


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ListingError(f"{path}: listing not found")
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    sep = "\t" if "\t" in header and "," not in header else ","
    return read_csv(path, "listing", ListingError, sep=sep, dtype=str, keep_default_na=False)


def read_listing(path: os.PathLike | str, include_trainset: bool = False, cell_lines: list[str] | None = None,
                 classes: list[int] | None = None, max_images: int | None = None) -> Selection:
    """Read and filter a listing: rows with a bad URL are skipped with a warning naming the row;
    duplicates (same ID) keep their first row; ``in_trainset`` rows are skipped unless
    ``include_trainset``; images left without a competition class are dropped; ``cell_lines`` and
    ``classes`` (keep an image holding any of them) filter further; ``max_images`` keeps the first N."""
    path = Path(path)
    df = _read_table(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if "Label" not in df.columns and "Label_idx" not in df.columns:
        missing.append("Label")
    if missing:
        raise ListingError(f"{path}: missing column(s) {', '.join(missing)}; a listing needs Image and Label "
                           f"(columns found: {', '.join(map(str, df.columns))})")
    wanted_classes = None if classes is None else {int(k) for k in classes}
    for k in sorted(wanted_classes or ()):
        if not 0 <= k < len(CLASS_NAMES):
            raise ListingError(f"class filter {k}: not a class id (0..{len(CLASS_NAMES) - 1})")
    wanted_lines = {_norm(c) for c in cell_lines} if cell_lines else None
    counts = Counter(rows=0)  # rows first in the summary
    unknown: Counter = Counter()
    rows, seen = [], set()
    bad_rows = []
    for r, rec in enumerate(df.to_dict("records"), start=2):  # row 1 is the header
        counts["rows"] += 1
        image_id = image_id_from_url(rec["Image"])
        if image_id is None:
            bad_rows.append(r)
            counts["bad URL"] += 1
            continue
        if image_id in seen:
            counts["duplicates"] += 1
            continue
        seen.add(image_id)
        if "in_trainset" in rec and _truthy(rec["in_trainset"]) and not include_trainset:
            counts["in the competition train set"] += 1
            continue
        if "Label" in rec:
            ids, names = location_classes(rec["Label"])
            unknown.update(names)
        else:
            try:
                ids = parse_label(rec["Label_idx"]) if str(rec["Label_idx"]).strip() else ()
            except LabelError:
                ids = ()
        if not ids:
            counts["without a competition class"] += 1
            continue
        cell_line = str(rec.get("Cellline", "")).strip()
        if wanted_lines is not None and _norm(cell_line) not in wanted_lines:
            counts["other cell lines"] += 1
            continue
        if wanted_classes is not None and not set(ids) & wanted_classes:
            counts["other classes"] += 1
            continue
        antibody = str(rec.get("Antibody", "")).strip() or image_id.split("_", 1)[0]
        rows.append({"ID": image_id, "url": str(rec["Image"]).strip(), "Label": format_label(ids),
                     "Cellline": cell_line, "antibody": antibody})
    for r in bad_rows[:5]:
        warnings.warn(f"{path}: row {r}: Image {df['Image'].iat[r - 2]!r} is not an http(s) URL ending in "
                      "<folder>/<name>; skipped", RuntimeWarning, stacklevel=2)
    if max_images is not None:
        if len(rows) > max_images:
            counts["over --max-images"] += len(rows) - max_images
        rows = rows[:max_images]
    counts["selected"] = len(rows)
    images = pd.DataFrame(rows, columns=["ID", "url", "Label", "Cellline", "antibody"])
    return Selection(images=images, counts=dict(counts), unknown_locations=unknown)
