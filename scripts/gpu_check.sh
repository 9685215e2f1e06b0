#!/usr/bin/env bash
# The GPU check of issue 10, run on the device machine (no Rust there): the release
# binaries built here travel in .gpu/ (see README "Running on a GPU"). Writes its logs
# under $OUT. Steps: the card; the CPU-sized benchmark on CUDA (its models are kept for
# the smoke tests); the stage binaries on CUDA (eval on cpu/f32, cuda/f32 and cuda/bf16 must
# agree; a few SFT and PPO steps; sampling); the benchmark at GPT-2-medium and
# Qwen2.5-0.5B shapes with MFU and the bandwidth bound.
#
#   GPU_BIN=.gpu DEVICE=cuda bash scripts/gpu_check.sh
set -u
BIN=${GPU_BIN:-.gpu}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
export RUST_LOG=${RUST_LOG:-warn}

step() { echo; echo "== $* ($(date +%T))"; }

step card
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
    name=none
fi
# Dense bf16 peak and memory bandwidth from the data sheets (SXM parts).
case "$name" in
    *H200*) peak_tflops=989; peak_gbps=4800 ;;
    *H100*) peak_tflops=989; peak_gbps=3350 ;;
    *) peak_tflops=; peak_gbps= ;;
esac
echo "peak bf16 ${peak_tflops:-?} TFLOP/s, bandwidth ${peak_gbps:-?} GB/s"

# Peak device memory of a command: nvidia-smi sampled every 200 ms.
watch_memory() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/mem-$1" &
        echo $!
    fi
}
report_memory() {
    [ -n "$2" ] && kill "$2" 2>/dev/null
    [ -f "$WORK/mem-$1" ] && sort -n "$WORK/mem-$1" | tail -1 | sed "s/^/peak device memory (MiB) during $1: /"
}

step "benchmark, CPU workload on $DEVICE"
pid=$(watch_memory small)
BENCH_DEVICE=$DEVICE BENCH_DTYPE=bf16 BENCH_KEEP="$WORK/small" timeout 120 "$BIN/bench" \
    >"$OUT/bench-small.txt" 2>&1
echo "exit $?"
report_memory small "$pid"
tail -12 "$OUT/bench-small.txt"

step "stage binaries on $DEVICE"
small=$WORK/small
for dd in "cpu f32" "$DEVICE f32" "$DEVICE bf16"; do
    set -- $dd
    echo "sft eval --device $1 --dtype $2:"
    "$BIN/sft" eval --model "$small/llama-lm" --data "$small/sft.jsonl" --max-length 128 \
        --device "$1" --dtype "$2" | head -c 400
    echo
done
"$BIN/sft" train --model "$small/llama-lm" --data "$small/sft.jsonl" --output-dir "$WORK/sft" \
    --overwrite --max-steps 4 --batch-size 8 --max-length 128 --lr 1e-4 --log-every 1 \
    --device "$DEVICE" 2>&1 | tail -4
echo "exit $?"
"$BIN/ppo" train --policy "$WORK/sft/final" --reward-model "$small/llama-rm" \
    --prompts "$small/prompts.jsonl" --output-dir "$WORK/ppo" --overwrite --max-steps 3 \
    --rollout-batch-size 16 --response-length 32 --lr 1e-5 --log-every 1 \
    --device "$DEVICE" 2>&1 | tail -4
echo "exit $?"
"$BIN/sft" generate --model "$WORK/ppo/final" --prompts "$small/prompts.jsonl" \
    --output "$WORK/samples.jsonl" --max-new-tokens 16 --device "$DEVICE" 2>&1 | tail -2
echo "exit $? ($(wc -l <"$WORK/samples.jsonl") samples)"

step "benchmark, GPT-2-medium and Qwen2.5-0.5B shapes on $DEVICE"
pid=$(watch_memory large)
BENCH_DEVICE=$DEVICE BENCH_DTYPE=bf16 BENCH_SHAPES=${LARGE_SHAPES:-gpt2-medium,qwen2-0.5b} \
    BENCH_BATCH=${LARGE_BATCH:-8} BENCH_SEQ=${LARGE_SEQ:-1024} BENCH_ROLLOUT=64 BENCH_RESPONSE=128 \
    BENCH_PEAK_TFLOPS=$peak_tflops BENCH_PEAK_GBPS=$peak_gbps \
    timeout "${LARGE_TIMEOUT:-240}" "$BIN/bench" >"$OUT/bench-large.txt" 2>&1
echo "exit $?"
report_memory large "$pid"
tail -12 "$OUT/bench-large.txt"
