#!/usr/bin/env bash
# Issue 19's GPU check, run on the device machine (no Rust there; the release binaries and
# the bench executable travel in .gpu/, as for scripts/gpu_check.sh). Writes its logs under
# $OUT. With one GPU, `torchrun --nproc-per-node 1` makes a world of one that connects to
# the c10d store and sends every CUDA gradient through ProcessGroupNCCL (an all-reduce of
# one rank: NCCL's communicator, stream and kernels run; nothing crosses a link).
#   1. each training stage plain and under torchrun (ZeRO stage 0 and 1, and stage 0 with
#      --overlap-grad-reduce): same weights;
#   2. the benchmark plain and under torchrun: the NCCL path's overhead (target ≤ 3 %).
#
#   GPU_BIN=.gpu bash scripts/gpu_nccl.sh
set -u
BIN=${GPU_BIN:-.gpu}
OUT=${OUT:-/tmp/gpu-nccl}
WORK=${WORK:-/tmp/gpu-nccl-work}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu DTYPE=f32 rehearses the script on a CPU machine
DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT" "$WORK"
export RUST_LOG=${RUST_LOG:-info}
step() { echo; echo "== $* ($(date +%T))"; }
torchrun1() { "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python "$@"; }

step card
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"

step "models (the bench's small workload, kept)"
BENCH_DEVICE=$DEVICE BENCH_DTYPE=$DTYPE BENCH_KEEP="$WORK/small" BENCH_STAGES=sft \
    timeout 300 "$BIN/bench" >"$OUT/models.txt" 2>&1
echo "exit $?"
small=$WORK/small

step "stages: plain vs torchrun --nproc-per-node 1 (NCCL)"
common=(--device "$DEVICE" --dtype "$DTYPE" --max-steps 4 --log-every 1 --overwrite --lr 1e-4)
for stage in sft reward dpo ppo; do
    case $stage in
        sft) args=(train --model "$small/llama-lm" --data "$small/sft.jsonl" --batch-size 8 --max-length 128) ;;
        reward) args=(train --model "$small/llama-lm" --data "$small/pairs.jsonl" --batch-size 4) ;;
        dpo) args=(train --model "$small/llama-lm" --data "$small/pairs.jsonl" --batch-size 4) ;;
        ppo) args=(train --policy "$small/llama-lm" --reward-model "$small/llama-rm" \
            --prompts "$small/prompts.jsonl" --rollout-batch-size 16 --response-length 32) ;;
    esac
    "$BIN/$stage" "${args[@]}" "${common[@]}" --output-dir "$WORK/$stage-plain" \
        >"$OUT/$stage-plain.json" 2>"$OUT/$stage-plain.log"
    echo "$stage plain: exit $?"
    for zero in 0 1 o; do
        # "o": ZeRO-0 with the exchange overlapped with the backward (a sender thread's
        # NCCL all-reduces while the autograd engine's device thread runs).
        flags=(--zero-stage $zero)
        [ $zero = o ] && flags=(--zero-stage 0 --overlap-grad-reduce --bucket-cap-mb 1)
        torchrun1 "$BIN/$stage" "${args[@]}" "${common[@]}" "${flags[@]}" \
            --output-dir "$WORK/$stage-nccl$zero" >"$OUT/$stage-nccl$zero.json" \
            2>"$OUT/$stage-nccl$zero.log"
        echo "$stage torchrun zero $zero: exit $?; $(grep -o 'NCCL process group[^(]*' "$OUT/$stage-nccl$zero.log" | head -1) $(grep -o 'overlap-grad-reduce: [0-9]* of [0-9]* buckets went out' "$OUT/$stage-nccl$zero.log" | head -1)"
    done
done
"$PY" - "$WORK" <<'PY' 2>&1 | tee "$OUT/weights.txt"
import sys, pathlib
from safetensors.torch import load_file
work = pathlib.Path(sys.argv[1])
for stage in ["sft", "reward", "dpo", "ppo"]:
    plain = work / f"{stage}-plain" / "final" / "model.safetensors"
    for zero in (0, 1, "o"):
        other = work / f"{stage}-nccl{zero}" / "final" / "model.safetensors"
        if not (plain.exists() and other.exists()):
            print(f"{stage} zero {zero}: missing {plain if not plain.exists() else other}")
            continue
        a, b = load_file(plain), load_file(other)
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        print(f"{stage} zero {zero}: max |plain - NCCL| = {diff:.3e} over {len(a)} tensors")
PY

step "bench: plain vs torchrun --nproc-per-node 1 (NCCL), same process otherwise"
for run in plain nccl overlap; do
    launch=() stages=sft,reward,ppo train_args=
    [ $run != plain ] && launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python)
    # The overlapped exchange's own cost at world size 1 (hooks, the sender thread).
    [ $run = overlap ] && stages=sft,reward train_args="--overlap-grad-reduce"
    BENCH_TRAIN_ARGS=$train_args BENCH_DEVICE=$DEVICE BENCH_DTYPE=$DTYPE BENCH_STAGES=$stages BENCH_SHAPES=${SHAPES:-qwen2-0.5b} \
        BENCH_BATCH=${BATCH:-8} BENCH_SEQ=${SEQ:-512} BENCH_ROLLOUT=${ROLLOUT:-32} BENCH_RESPONSE=${RESPONSE:-64} \
        timeout 600 "${launch[@]}" "$BIN/bench" >"$OUT/bench-$run.txt" 2>&1
    echo "bench $run: exit $?"
done
"$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/bench-ratio.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def rows(run):
    rows = {}
    for line in (out / f"bench-{run}.txt").read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[(r["stage"], r["model"])] = r
    return rows
plain = rows("plain")
for run in ("nccl", "overlap"):
    other = rows(run)
    for key in plain:
        if key in other:
            a, b = plain[key].get("tokens_per_second"), other[key].get("tokens_per_second")
            if a and b:
                print(f"{key[0]:8} {key[1]:12} plain {a:10.0f} tok/s  {run} {b:10.0f} tok/s  ratio {b / a:.3f}")
PY
