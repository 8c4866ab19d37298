#!/usr/bin/env bash
# Build the two Kaggle datasets the inference kernel attaches (run on a dev machine; needs network for
# the dependency wheels):
#   OUT/hpasc-wheels/   the hpasc wheel and wheels of its dependencies (pip install --no-index source)
#   OUT/hpasc-models/   <config>/fold<k>/{config.yaml,best.pt} of the trained runs (+ weights.yaml, and
#                       segmentation/ with the weight files the configs name: hpasc.predict.predict_kaggle
#                       finds them there by file name)
# each with a dataset-metadata.json, ready for `kaggle datasets create -p OUT/<name> --dir-mode zip`.
#
# Usage: kernels/build_datasets.sh [--out DIR] [--runs "runs/b0 runs/resnet50"] [--weights FILE]
#                                  [--owner KAGGLE_USER] [--with-torch] [--skip-wheels] [--skip-models]
#   --runs        run folders: runs/<config>/fold<k>, runs/<config> (all folds) or runs/; default runs/
#   --with-torch  also pack torch/torchvision (Kaggle images ship them; they are GBs)
# Environment: PYTHON (default: the project venv or python3), KAGGLE_PYTHON (target python version of the
# Kaggle image, default 3.11), KAGGLE_PLATFORM (default manylinux2014_x86_64).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$here/dist/kaggle"
runs=""
weights=""
owner="${KAGGLE_USERNAME:-hpasc}"
with_torch=0
do_wheels=1
do_models=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --weights) weights=$2; shift 2 ;;
    --owner) owner=$2; shift 2 ;;
    --with-torch) with_torch=1; shift ;;
    --skip-wheels) do_wheels=0; shift ;;
    --skip-models) do_models=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$HOME/.cache/hpasc/venv/bin/python" ]; then py="$HOME/.cache/hpasc/venv/bin/python"; else py=python3; fi
fi
target_py=${KAGGLE_PYTHON:-3.11}
platform=${KAGGLE_PLATFORM:-manylinux2014_x86_64}

seg_files() {  # config.yaml -> the local files its segmentation settings name, one a line
  "$py" - "$1" <<'PY'
import sys, yaml
seg = (yaml.safe_load(open(sys.argv[1])) or {}).get("segmentation") or {}
for key in ("nuclei_weights", "cell_weights", "cellpose_model"):
    if seg.get(key):
        print(seg[key])
PY
}

metadata() {  # folder, slug, title
  cat > "$1/dataset-metadata.json" <<JSON
{
  "title": "$3",
  "id": "$owner/$2",
  "licenses": [{"name": "other"}]
}
JSON
}

if [ "$do_wheels" = 1 ]; then
  wheels="$out/hpasc-wheels"
  rm -rf "$wheels" && mkdir -p "$wheels"
  # offline dev machines have no setuptools to fetch: fall back to the environment's own
  "$py" -m pip wheel --no-deps --wheel-dir "$wheels" "$here" ||
    "$py" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$wheels" "$here"
  # the runtime dependencies of pyproject.toml (torch/torchvision left to the Kaggle image by default)
  reqs="$wheels/requirements.txt"
  "$py" - "$here/pyproject.toml" "$with_torch" > "$reqs" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
heavy = ("torch", "torchvision")
for dep in deps:
    name = re.split(r"[\s<>=!~;\[(]", dep, maxsplit=1)[0].lower()
    if sys.argv[2] == "1" or name not in heavy:
        print(dep)
PY
  target=(--only-binary=:all: --python-version "$target_py" --platform "$platform"
          --platform manylinux_2_17_x86_64 --platform any)
  # resolve the whole dependency tree for the Kaggle python, then download it without the heavy part:
  # timm needs torch/torchvision, so a plain `pip download -r` would pull them and the CUDA wheels (GBs)
  report="$wheels/resolved.json"
  "$py" -m pip install --dry-run --ignore-installed --quiet --report "$report" "${target[@]}" -r "$reqs"
  pins="$wheels/pinned.txt"
  "$py" - "$report" "$with_torch" > "$pins" <<'PY'
import json, re, sys
heavy = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if sys.argv[2] == "1" or not heavy.match(name):
        print(f"{name}=={item['metadata']['version']}")
PY
  "$py" -m pip download --dest "$wheels" --no-deps "${target[@]}" -r "$pins"
  rm -f "$report"
  metadata "$wheels" hpasc-wheels "hpasc wheels"
  echo "wheels: $(ls "$wheels"/*.whl | wc -l) files in $wheels"
fi

if [ "$do_models" = 1 ]; then
  models="$out/hpasc-models"
  rm -rf "$models" && mkdir -p "$models"
  [ -n "$runs" ] || runs="$here/runs"
  n=0
  for run in $runs; do
    # a fold folder, a config folder (its fold*/) or a whole runs/ tree: every fold*/best.pt below
    for best in $(find "${run%/}" -maxdepth 3 -path '*fold*' -name best.pt | sort); do
      fold=$(dirname "$best")
      [ -f "$fold/config.yaml" ] || { echo "skip $fold: no config.yaml" >&2; continue; }
      dest="$models/$(basename "$(dirname "$fold")")/$(basename "$fold")"
      mkdir -p "$dest"
      cp "$fold/config.yaml" "$fold/best.pt" "$dest/"
      seg_files "$fold/config.yaml" >> "$models/.seg_files"
      n=$((n + 1))
    done
  done
  [ "$n" -gt 0 ] || { echo "no trained runs found (give --runs)" >&2; exit 1; }
  [ -z "$weights" ] || cp "$weights" "$models/weights.yaml"
  # the segmentation weight files the configs name, flat under segmentation/ (found there by file name)
  sort -u "$models/.seg_files" | while IFS= read -r file; do
    [ -f "$file" ] || { echo "missing segmentation file $file (named in a run's config.yaml)" >&2; exit 1; }
    dest="$models/segmentation/$(basename "$file")"
    if [ -e "$dest" ] && ! cmp -s "$file" "$dest"; then
      echo "two different segmentation files are named $(basename "$file")" >&2; exit 1
    fi
    mkdir -p "$models/segmentation" && cp "$file" "$dest"
  done
  rm -f "$models/.seg_files"
  metadata "$models" hpasc-models "hpasc models"
  echo "models: $n runs in $models"
fi
