#!/usr/bin/env bash
# Create .venv and install mmsynth with everything the offline profile and the tests need.
# Needs only Python 3.11 and pip. Every pip call uses constraints.txt (pins + guards); the
# packages in requirements-nodeps.txt are installed with --no-deps (see that file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
.venv/bin/pip install -q --disable-pip-version-check --no-deps -c constraints.txt -r requirements-nodeps.txt
echo "mmsynth installed in .venv"
