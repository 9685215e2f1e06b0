#!/usr/bin/env bash
# The TRL side-by-side on the GPU machine (run by the device tool from the repo root, with
# .gpu/bench, .whl/ (trl 1.16, datasets, dill, multiprocess wheels) and bench/.trl-0.29.1
# carried; see README "Running on a GPU"). Logs under $OUT.
set -u
OUT=${OUT:-/tmp/gpu-trl}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site RUST_LOG=warn
python3 -c 'import pyarrow, datasets, trl, transformers, torch; print("pyarrow", pyarrow.__version__, "datasets", datasets.__version__, "trl", trl.__version__, "transformers", transformers.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { # run NAME SECONDS [ENV...]: one side-by-side
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    env "$@" DEVICE=cuda BENCH_BIN=.gpu/bench PYTHON=python3 TRL_INSTALLED=1 \
        timeout "$limit" bench/trl_compare.sh "/tmp/w-$name" 2>&1 | tee "$OUT/trl-$name.txt"
    cp "/tmp/w-$name/ours.jsonl" "$OUT/ours-$name.jsonl" 2>/dev/null
    cp "/tmp/w-$name/trl.jsonl" "$OUT/trl-$name.jsonl" 2>/dev/null
}
run small 200
run large 230 BENCH_SHAPES=gpt2-medium BENCH_SEQ=1024 BENCH_ROLLOUT=64 BENCH_RESPONSE=128 \
    BENCH_PEAK_TFLOPS=989 BENCH_PEAK_GBPS=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo 4800 || echo 3350)
