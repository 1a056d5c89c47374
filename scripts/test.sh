#!/usr/bin/env bash
# Set up (with the dev extras) and run the linters and the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check glmkit tests scripts
.venv/bin/python -m pytest "$@"
