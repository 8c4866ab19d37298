#!/usr/bin/env bash
# Build the two Kaggle datasets the inference kernel attaches (run on a dev machine; needs network for
# the dependency wheels):
#   OUT/hpasc-wheels/   the hpasc wheel and wheels of its dependencies (pip install --no-index source)
#   OUT/hpasc-models/   <config>/fold<k>/{config.yaml,best.pt} of the trained runs (+ weights.yaml)
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
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$HOME/.cache/hpasc/venv/bin/python" ]; then py="$HOME/.cache/hpasc/venv/bin/python"; else py=python3; fi
fi
target_py=${KAGGLE_PYTHON:-3.11}
platform=${KAGGLE_PLATFORM:-manylinux2014_x86_64}

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
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
heavy = ("torch", "torchvision")
for dep in deps:
    name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
    if sys.argv[2] == "1" or name not in heavy:
        print(dep)
PY
  "$py" -m pip download --dest "$wheels" --only-binary=:all: --python-version "$target_py" \
    --platform "$platform" --platform manylinux_2_17_x86_64 --platform any -r "$reqs"
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
      n=$((n + 1))
    done
  done
  [ "$n" -gt 0 ] || { echo "no trained runs found (give --runs)" >&2; exit 1; }
  [ -z "$weights" ] || cp "$weights" "$models/weights.yaml"
  metadata "$models" hpasc-models "hpasc models"
  echo "models: $n runs in $models"
fi
