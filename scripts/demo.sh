#!/usr/bin/env bash
# Set up (if needed) and run the main job: Antidote on the bundled COCO captions, offline profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
.venv/bin/python -m jobs antidote --input data/captions/coco2017_mini.jsonl --output "${OUT:-out/antidote}" \
  --profile offline --limit "${LIMIT:-8}" "$@"
