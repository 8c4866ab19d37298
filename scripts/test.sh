#!/usr/bin/env bash
# Set up the environment (once; reused afterwards) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(bash scripts/setup_env.sh | tail -n 1)
exec "$py" -m pytest -q "$@"
