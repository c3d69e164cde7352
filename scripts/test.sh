#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the test suite. Extra arguments go to pytest: test paths
# (`scripts/test.sh tests/test_geometry.py`) replace the default `tests`, options (`-k click`) are added.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
paths=()
for arg in "$@"; do
  [[ "$arg" != -* && -e "${arg%%::*}" ]] && paths+=("$arg")
done
if [[ ${#paths[@]} -eq 0 ]]; then
  set -- tests "$@"
fi
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
