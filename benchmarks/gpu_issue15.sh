#!/usr/bin/env bash
# The GPU checks of the speed issue, as one command (about 12 minutes on one H200):
#
#     bash benchmarks/gpu_issue15.sh [OUT_DIR]      # default: benchmarks/results/gpu-issue15 (or $OUT)
#
# Needs the project installed with a CUDA build of torch (pip install torch -e ".[dev]"). Runs the
# CUDA tests (the packed attention's varlen path among them), then benchmarks/prefill.py in bfloat16
# on `small` and the 7B shape, sdpa vs illava_packed, batch 1 and 8, 448 and 896. Every step has its
# own timeout, so one that hangs costs its slot and not the rest; each step's log says how it ended.
set -u
out=${1:-${OUT:-benchmarks/results/gpu-issue15}}
mkdir -p "$out"
{
    nvidia-smi
    python -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
    git rev-parse HEAD 2>/dev/null || true
} > "$out/env.txt" 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...: run, log stdout/stderr, record the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" > "$out/$name.txt" 2> "$out/$name.err"
    echo "exit status $?" >> "$out/$name.err"
}

step pytest 200 python -m pytest -q -rs -p no:cacheprovider tests/illava/test_cuda.py tests/illava/test_fast_paths.py
for backbone in small 7b-shape; do
    for batch in 1 8; do
        # The decoder-alone table on `small` at batch 1 only: elsewhere its ~26 lengths would not fit the
        # step's limit beside the timings the issue asks for.
        alone=$([ "$backbone-$batch" = small-1 ] && echo --llm-alone || echo --no-llm-alone)
        step "prefill_${backbone}_bf16_b${batch}" 120 python benchmarks/prefill.py --device cuda --dtype bfloat16 \
            --backbone "$backbone" --attn sdpa illava_packed --sizes 448 896 --batch "$batch" --repeats 7 --warmup 2 \
            "$alone"
    done
done
grep -h "exit status" "$out"/*.err
