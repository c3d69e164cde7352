#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
