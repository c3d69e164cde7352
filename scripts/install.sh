#!/usr/bin/env bash
# Creates (or updates) the virtual environment with the backend's dependencies; with --test, the test
# dependencies too (torch's CPU build among them) and those of tools/evaluate.py (requirements-tools.txt).
# Re-running is cheap: nothing is installed when the requirement files of that set have not changed. The
# serving set and the test set keep stamps of their own, so switching between scripts/serve.sh and
# scripts/test.sh installs nothing.
# The Dockerfile runs the same pip commands.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
files=(requirements.txt requirements-no-deps.txt)
stamp="$venv/.installed-serve"
if [[ "${1:-}" == "--test" ]]; then
  files+=(requirements-test.txt requirements-tools.txt requirements-torch.txt)
  stamp="$venv/.installed-test"
fi

wanted="$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
  exit 0
fi

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -r requirements.txt
"${pip[@]}" install --quiet --no-deps -r requirements-no-deps.txt
if [[ "${1:-}" == "--test" ]]; then
  "${pip[@]}" install --quiet -r requirements-test.txt -r requirements-tools.txt
  # A call of its own: only torch is looked up on PyTorch's CPU index (requirements-torch.txt).
  "${pip[@]}" install --quiet -r requirements-torch.txt
fi
# Every dependency must be satisfied, except label-studio-ml's own outdated pins (see requirements-no-deps.txt).
conflicts="$("${pip[@]}" check 2>&1 | grep -v '^label-studio-ml ' | grep -v '^No broken requirements' || true)"
if [[ -n "$conflicts" ]]; then
  echo "$conflicts" >&2
  exit 1
fi
echo "$wanted" > "$stamp"
