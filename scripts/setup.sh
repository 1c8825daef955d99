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
# The report tests open run reports in Debian's chromium (Playwright drives it; Playwright's
# own browser download is never used).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the report tests need Debian's chromium: sudo apt-get install chromium"
  fi
fi
echo "mmsynth installed in .venv"
