#!/usr/bin/env bash
# One prepared GPU check of the model part (issue 3): the CUDA tests, then the training benchmarks
# against HF transformers with torch.compile. Prints everything; logs go to $OUT (if set) or ./out/gpu_check.
# Each step is bounded by `timeout` and never stops the script (|| true), so one failure hides nothing.
# Budget: < 8 minutes on one H100/H200 (compilation dominates; the inductor cache makes reruns faster).
#
#   bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
LOG=${OUT:-out/gpu_check}
mkdir -p "$LOG"

step() {   # step NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*"
    local t0=$SECONDS
    timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'" || true

# 1. correctness on the GPU: every backend fwd+bwd vs the dense reference, compiled blocks, bf16 KV cache
step tests 180 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider || true

# 2. the headline: 338M GLM-4 shape, bf16, batch 16 x 1024, GLM objective, both compiled, same weights;
#    `both` also times the same glmkit model on causal batches (GLM objective >= 0.95x causal)
step bench_glm_vs_hf 240 "$PY" -m glmkit.bench.train --device cuda --dtype bfloat16 --preset bench-338m \
    --batch-size 16 --seq-len 1024 --steps 20 --compile --objective both || true

# 3. the other training backend inside the glmkit model alone (auto picks split when its self-check
#    passes): is flex faster on this card?
step bench_backend_flex 80 "$PY" -m glmkit.bench.train --device cuda --dtype bfloat16 --preset bench-338m \
    --batch-size 16 --seq-len 1024 --steps 10 --compile --objective glm --backend flex --no-hf || true

echo; echo "=== summary (last JSON line of each bench)"
for f in "$LOG"/bench_*.log; do
    echo "$(basename "$f" .log): $(grep '^{' "$f" | tail -1)"
done
