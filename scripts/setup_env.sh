#!/usr/bin/env bash
# Create (once) and update the project's virtual environment outside the clone, so CI and later runs
# reuse it. Prints the path of the environment's python on its last line.
#   HPASC_VENV  where the environment lives (default: ~/.cache/hpasc/venv)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HPASC_VENV:-$HOME/.cache/hpasc/venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
# torch first, pinned: these wheels lie on local disk here; an unpinned torch downloads several GB.
stamp="$venv/.hpasc-stamp"
want=$(cat "$here/pyproject.toml" "$here/scripts/setup_env.sh" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$venv/bin/pip" install -q -e "$here[dev,cellpose]" >&2
  echo "$want" > "$stamp"
elif ! "$venv/bin/python" -c "import hpasc, sys; sys.exit(0 if hpasc.__file__.startswith('$here') else 1)" 2>/dev/null; then
  # same dependencies, other checkout (a fresh CI clone): point the editable install here
  "$venv/bin/pip" install -q --no-deps -e "$here" >&2
fi
echo "$venv/bin/python"
