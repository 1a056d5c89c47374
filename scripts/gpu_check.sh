#!/usr/bin/env bash
# One prepared GPU check of the model part (issue 3): the CUDA tests, then the training benchmarks
# against HF transformers with torch.compile. Prints everything; logs go to $OUT (if set) or ./out/gpu_check.
# Each step is bounded by `timeout` and never stops the script (|| true), so one failure hides nothing.
# Budget: < 9 minutes on one H100/H200 (compilation dominates; the inductor cache makes reruns faster).
#
#   bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# the first Python whose torch sees a GPU ($PY if given, then the project venv, then python3 / python)
pick_python() {
    for p in "${PY:-}" .venv/bin/python python3 python; do
        [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
        "$p" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && { echo "$p"; return; }
    done
    if [ -n "${PY:-}" ]; then echo "$PY"; elif [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}
PY=$(pick_python)
echo "python: $PY"
"$PY" -c 'import transformers' 2>/dev/null || echo "WARNING: transformers is not importable by $PY: the HF side of the bench will fail (pip install transformers)"
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

# 1. the headline: 338M GLM-4 shape, bf16, batch 16 x 1024, GLM objective, both compiled, same weights;
#    `both` also times the same glmkit model on causal batches (GLM objective >= 0.95x causal)
step bench_glm_vs_hf 200 "$PY" -m glmkit bench train --device cuda --dtype bfloat16 --preset bench-338m \
    --batch-size 16 --seq-len 1024 --steps 15 --compile --objective both || true

# 2. correctness on the GPU: every backend fwd+bwd vs the dense reference, compiled blocks, bf16 KV cache,
#    grouped MoE experts (grouped_mm on sm90) vs the loop
step tests 160 "$PY" -m pytest tests/test_gpu.py tests/test_moe.py -p no:cacheprovider || true

# 3. the attention kernels alone (DESIGN.md §4's table: fwd+bwd ms per backend vs flash causal), with
#    one Flex kernel-option candidate beside torch's defaults (Hopper's TMA loads)
step bench_attention_table 120 "$PY" -m glmkit bench train --device cuda --dtype bfloat16 --attention-table \
    --flex-options '{"USE_TMA": true}' || true

# 4. the split backend inside the glmkit model (auto picks flex below 2048 tokens, from DESIGN.md's
#    kernel table): is the split faster on this card at 1024?
step bench_backend_split 70 "$PY" -m glmkit bench train --device cuda --dtype bfloat16 --preset bench-338m \
    --batch-size 16 --seq-len 1024 --steps 10 --compile --objective glm --backend split --no-hf || true

echo; echo "=== summary (last JSON line of each bench)"
for f in "$LOG"/bench_*.log; do
    echo "$(basename "$f" .log): $(grep '^{' "$f" | tail -1)"
done
