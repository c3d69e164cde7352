#!/usr/bin/env bash
# Sets everything up on a fresh machine and starts the backend on port 9090 (PORT to change it).
# The SegNext model files are downloaded into MODEL_DIR (default models/) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${VENV:-.venv}/bin/python" _wsgi.py --host "${HOST:-0.0.0.0}" --port "${PORT:-9090}"
