#!/usr/bin/env bash
# End-to-end tests against a real Label Studio 1.23.2 (tests/e2e). Label Studio gets its own virtual
# environment, .venv-e2e/ (kept and reused while requirements-e2e.txt is unchanged and it still starts);
# the tests run in the backend's .venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test

venv="${E2E_VENV:-.venv-e2e}"
python="${PYTHON:-python3}"
stamp="$venv/.installed-requirements"
wanted="$(sha256sum requirements-e2e.txt | cut -d' ' -f1)"
bin="$venv/bin/label-studio"

runs() {
  # (`label-studio --version` sets up Django and its database: far too slow for a check.)
  [[ -x "$bin" ]] && "$venv/bin/python" -c \
    'import importlib.metadata as m, label_studio, django; assert m.version("label-studio") == "1.23.2"' 2>/dev/null
}

start=$SECONDS
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && runs; then
  echo "[e2e] reusing $venv (label-studio 1.23.2)"
else
  echo "[e2e] installing Label Studio into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-e2e.txt
  runs || { echo "[e2e] $bin does not run as label-studio 1.23.2" >&2; exit 1; }
  echo "$wanted" > "$stamp"
fi
echo "[e2e] Label Studio ready in $((SECONDS - start)) s"

LABEL_STUDIO_BIN="$(realpath "$bin")"
export LABEL_STUDIO_BIN
exec "${VENV:-.venv}/bin/python" -m pytest tests/e2e -q -s -p no:cacheprovider "$@"
