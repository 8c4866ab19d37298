#!/usr/bin/env bash
# Set up the environment (once; reused afterwards) and run the whole pipeline on synthetic data.
# Extra arguments go to `hpasc demo`; the default work folder is ./demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(bash scripts/setup_env.sh | tail -n 1)
exec "$(dirname "$py")/hpasc" demo --work demo "$@"
