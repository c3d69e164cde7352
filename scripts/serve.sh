#!/usr/bin/env bash
# Sets everything up on a fresh machine and starts the backend under gunicorn on port 9090 (PORT to change
# it; WORKERS and THREADS as in the README). The SegNext model files are downloaded into MODEL_DIR (default
# models/) when they are missing. For a single-process development server: .venv/bin/python _wsgi.py
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${VENV:-.venv}/bin/gunicorn" -c gunicorn.conf.py
