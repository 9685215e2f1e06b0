#!/usr/bin/env bash
# The GPU check of issue 20 (decode speed), run on the device machine from the repo root
# with the binaries built here in .gpu/ (see README "Running on a GPU machine without
# Rust"): .gpu/bench (ppo/benches/stages.rs), .gpu/bench-before (the same benchmark built
# from 5aee9a5, the commit before the static cache and CUDA graphs: `git worktree add`, then
# `cargo bench -p ppo --bench stages --no-run` there) and .gpu/cuda_graphs (the test
# common/tests/cuda_graphs.rs: `cargo test --release -p common --test cuda_graphs
# --no-run`). Logs under $OUT. Steps, most important first:
#   1. the card; 2. graphs vs eager, token for token; 3. ours: PPO iterations and decode
#   tokens/s at GPT-2-medium and Qwen2.5-0.5B shapes, batch 64 and 256, eager vs graphs;
#   4. the same before this change; 5. transformers' generate (what TRL rolls out with);
#   6. issue 15: peak GPU memory of `ppo train` with LoRA on a Llama-3-8B shape and with
#      full fine-tuning on a Llama-3.2-3B shape; 7. (MEMORY18=1) the LoRA run of 6 on 4-bit
#      bases (QLoRA), and issue 18: SFT of the Llama-3-8B shape with
#      --gradient-checkpointing, PPO and GRPO at 1B; SDPO beside GRPO at 0.5B (its two LM
#      heads in chunks); SFT with 8-bit AdamW.
#
#   GPU_BIN=.gpu OUT=/tmp/out bash scripts/gpu_decode.sh
#
# A dry run of the whole flow on a CPU, to check the script before spending device time:
#   DEVICE=cpu SHAPES=gpt2,llama BENCH_MEASURED=1 GPU_BIN=.gpu bash scripts/gpu_decode.sh
set -u
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-gpt2-medium,qwen2-0.5b}
DTYPE=bf16
[ "$DEVICE" = cpu ] && DTYPE=f32
BIN=${GPU_BIN:-.gpu}
OUT=${OUT:-/tmp/gpu-decode}
WORK=${WORK:-/tmp/gpu-decode-work}
mkdir -p "$OUT" "$WORK"
export RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "== $* ($(date +%T))"; }

step card
name=none
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
fi
case "$name" in
    *H200*) gbps=4800 ;;
    *H100*) gbps=3350 ;;
    *) gbps= ;;
esac
echo "bandwidth ${gbps:-?} GB/s (data sheet)"

step "graphs vs eager (common/tests/cuda_graphs.rs)"
timeout 90 "$BIN/cuda_graphs" --nocapture >"$OUT/cuda-graphs-test.txt" 2>&1
rc=$?
echo "exit $rc"
tail -8 "$OUT/cuda-graphs-test.txt"
# Measuring is pointless if graphs and eager disagree: stop, so a fixed build can rerun.
[ "$rc" = 0 ] || exit 1

knobs=(BENCH_DEVICE=$DEVICE BENCH_DTYPE=$DTYPE BENCH_SHAPES=$SHAPES
    BENCH_ROLLOUT=64 BENCH_RESPONSE=128 BENCH_SEQ=256 BENCH_PEAK_GBPS=$gbps)

step "ours: PPO and GRPO (64 rollout rows) and generation (64, 256), eager vs graphs"
env "${knobs[@]}" BENCH_STAGES=ppo,grpo,generate BENCH_GEN_BATCHES=64,256 BENCH_KEEP="$WORK/new" \
    timeout 240 "$BIN/bench" >"$OUT/bench-new.txt" 2>&1
echo "exit $?"
grep '^|' "$OUT/bench-new.txt"

step "before: the same benchmark built from the previous commit (rollout 64)"
env "${knobs[@]}" BENCH_KEEP="$WORK/old" timeout 150 "$BIN/bench-before" \
    >"$OUT/bench-before.txt" 2>&1
echo "exit $?"
grep '^|' "$OUT/bench-before.txt"

step "transformers generate on the same model directories"
"${PYTHON:-python3}" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
for arch in ${SHAPES//,/ }; do
    timeout 90 "${PYTHON:-python3}" bench/hf_generate.py "$WORK/new/$arch-lm" --name "$arch" \
        --batch 64 --batch 256 --response 128 --device "$DEVICE" 2>"$OUT/hf-$arch.log" \
        | tee -a "$OUT/hf-generate.jsonl"
    echo "exit $?"
done

[ "$DEVICE" = cuda ] || exit 0  # the memory check needs the GPU

# Peak device memory of a benchmark run: nvidia-smi sampled every 200 ms.
memory_run() { # memory_run NAME ENV...
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/mem-$name" &
    local pid=$!
    env "$@" BENCH_KEEP="$WORK/$name" timeout 170 "$BIN/bench" >"$OUT/bench-$name.txt" 2>&1
    echo "exit $?"
    kill "$pid"
    sort -n "$WORK/mem-$name" | tail -1 | sed "s/^/peak device memory (MiB), $name: /"
    grep '^|' "$OUT/bench-$name.txt"
    rm -rf "${WORK:?}/$name"
}
step "issue 15: ppo train memory, LoRA (r 16) on Llama-3-8B vs full fine-tuning on Llama-3.2-3B"
memory=(BENCH_DEVICE=cuda BENCH_DTYPE=bf16 BENCH_STAGES=ppo BENCH_DECODE=graphs BENCH_ROLLOUT=16
    BENCH_RESPONSE=64 BENCH_SEQ=256 BENCH_MEASURED=3 BENCH_RM_FROM_LM=1)
memory_run lora-8b "${memory[@]}" BENCH_SHAPES=llama3-8b BENCH_PPO_ARGS="--lora-r 16 --lora-alpha 32"
memory_run full-3b "${memory[@]}" BENCH_SHAPES=llama3.2-3b

# Optional (MEMORY18=1; sized for what is left of a session's device time): issue 18's
# largest shapes on one H200 — full fine-tuning SFT of the Llama-3-8B shape with activation
# recomputation, and PPO/GRPO of the Llama-3.2-1B shape with it (the LM head is applied in
# chunks of positions in every run).
[ "${MEMORY18:-0}" = 1 ] || exit 0
step "QLoRA: the lora-8b run above with its bases held in 4 bits (NF4, nested scales)"
memory_run qlora-8b "${memory[@]}" BENCH_SHAPES=llama3-8b \
    BENCH_PPO_ARGS="--lora-r 16 --lora-alpha 32 --load-in-4bit --use-bnb-nested-quant"
step "issue 18: SFT Llama-3-8B full fine-tuning with --gradient-checkpointing; PPO and GRPO at 1B"
memory_run sft-8b-recompute BENCH_DEVICE=cuda BENCH_DTYPE=bf16 BENCH_STAGES=sft BENCH_SHAPES=llama3-8b \
    BENCH_BATCH=4 BENCH_SEQ=1024 BENCH_MEASURED=2 BENCH_TRAIN_ARGS=--gradient-checkpointing
memory_run rl-1b-recompute "${memory[@]}" BENCH_STAGES=ppo,grpo BENCH_SHAPES=llama3.2-1b \
    BENCH_TRAIN_ARGS=--gradient-checkpointing
step "SDPO beside GRPO at 0.5B (a 152k vocabulary: the teacher's and the student's LM heads in chunks)"
memory_run sdpo-0.5b "${memory[@]}" BENCH_STAGES=grpo,sdpo BENCH_SHAPES=qwen2-0.5b
step "the SFT run above with 8-bit AdamW moments (--optim adamw_8bit)"
memory_run sft-8b-adam8 BENCH_DEVICE=cuda BENCH_DTYPE=bf16 BENCH_STAGES=sft BENCH_SHAPES=llama3-8b \
    BENCH_BATCH=4 BENCH_SEQ=1024 BENCH_MEASURED=2 BENCH_TRAIN_ARGS="--gradient-checkpointing --optim adamw_8bit"
