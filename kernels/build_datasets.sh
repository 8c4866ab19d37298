#!/usr/bin/env bash
# Build the two Kaggle datasets the inference kernel attaches (run on a dev machine; needs network for
# the dependency wheels):
#   OUT/hpasc-wheels/   the hpasc wheel and wheels of its dependencies (pip install --no-index source)
#   OUT/hpasc-models/   <config>/fold<k>/{config.yaml,best.pt} of the trained runs (+ weights.yaml, and
#                       segmentation/ with the weight files the configs name: hpasc.predict.predict_kaggle
#                       finds them there by file name)
# each with a dataset-metadata.json, ready for `kaggle datasets create -p OUT/<name> --dir-mode zip`,
# and OUT/hpasc-inference/ (kernel.py + kernel-metadata.json) for `kaggle kernels push -p`. The Kaggle
# owner of all three comes from one place: --owner, else $KAGGLE_USERNAME, else the committed
# kernels/hpasc-inference/kernel-metadata.json.
#
# Usage: kernels/build_datasets.sh [--out DIR] [--runs "runs/b0 runs/resnet50"] [--weights FILE]
#                                  [--owner KAGGLE_USER] [--with-torch] [--skip-wheels] [--skip-models]
#   --runs        run folders: runs/<config>/fold<k>, runs/<config> (all folds) or runs/; default runs/
#   --with-torch  also pack torch/torchvision (Kaggle images ship them; they are GBs)
#   --cache DIR   downloaded wheels are kept there between builds (default $HPASC_WHEEL_CACHE or
#                 ~/.cache/hpasc/wheels); a build whose pins are all cached needs no network
# Environment: PYTHON (default: the project venv or python3), KAGGLE_PYTHON (target python version of the
# Kaggle image, default 3.11), KAGGLE_PLATFORM (default manylinux2014_x86_64).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$here/dist/kaggle"
runs=""
weights=""
owner="${KAGGLE_USERNAME:-}"
with_torch=0
do_wheels=1
do_models=1
cache="${HPASC_WHEEL_CACHE:-$HOME/.cache/hpasc/wheels}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --weights) weights=$2; shift 2 ;;
    --owner) owner=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --with-torch) with_torch=1; shift ;;
    --skip-wheels) do_wheels=0; shift ;;
    --skip-models) do_models=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$HOME/.cache/hpasc/venv/bin/python" ]; then py="$HOME/.cache/hpasc/venv/bin/python"; else py=python3; fi
fi
kernel_src="$here/kernels/hpasc-inference"
if [ -z "$owner" ]; then
  owner=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"].split("/")[0])' \
          "$kernel_src/kernel-metadata.json")
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
  # pin what was tested: the versions installed here of hpasc's runtime dependencies and of everything
  # they require, torch's own light requirements included (setuptools, sympy, ...: the Kaggle image's
  # torch must find them satisfied). torch/torchvision and the CUDA wheels are left to the Kaggle image
  # (--with-torch packs them too). No resolver run, so a complete cache needs no network.
  pins="$wheels/pinned.txt"
  "$py" - "$here/pyproject.toml" "$with_torch" > "$pins" <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

heavy = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
todo = [Requirement(dep) for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]]
seen, pins = set(), []
while todo:
    req = todo.pop()
    name = norm(req.name)
    if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        sys.exit(f"error: {name} (required by hpasc's dependencies) is not installed here: run "
                 "scripts/setup_env.sh first, the wheels pin the tested environment")
    todo += [Requirement(r) for r in dist.requires or []]
    if sys.argv[2] == "1" or not heavy.match(name):
        pins.append(f"{name}=={dist.version.split('+')[0]}")
print("\n".join(sorted(pins)))
PY
  target=(--only-binary=:all: --python-version "$target_py" --platform "$platform"
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any)
  mkdir -p "$cache"
  # from the cache alone when it holds every pin; else fill the cache from the index first
  from_cache=(--quiet --dest "$wheels" --no-index --find-links "$cache" --no-deps "${target[@]}" -r "$pins")
  if ! "$py" -m pip download "${from_cache[@]}" 2>/dev/null; then
    "$py" -m pip download --quiet --dest "$cache" --no-deps "${target[@]}" -r "$pins"
    "$py" -m pip download "${from_cache[@]}"
  fi
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
    for best in $(find "${run%/}" -maxdepth 4 -path '*fold*' -name best.pt | sort); do
      fold=$(dirname "$best")
      [ -f "$fold/config.yaml" ] || { echo "skip $fold: no config.yaml" >&2; continue; }
      parent=$(dirname "$fold")
      case "$(basename "$parent")" in  # <config>/round<r>/fold<k> keeps its round level
        round*) dest="$models/$(basename "$(dirname "$parent")")/$(basename "$parent")/$(basename "$fold")" ;;
        *) dest="$models/$(basename "$parent")/$(basename "$fold")" ;;
      esac
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

# the kernel, its metadata pointing at this owner's datasets
kernel="$out/hpasc-inference"
mkdir -p "$kernel"
cp "$kernel_src/kernel.py" "$kernel/"
"$py" - "$kernel_src/kernel-metadata.json" "$kernel/kernel-metadata.json" "$owner" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
owner = sys.argv[3]
meta["id"] = f"{owner}/{meta['id'].split('/', 1)[1]}"
meta["dataset_sources"] = [f"{owner}/{src.split('/', 1)[1]}" for src in meta["dataset_sources"]]
json.dump(meta, open(sys.argv[2], "w"), indent=2)
PY
echo "kernel: $kernel (owner $owner)"
