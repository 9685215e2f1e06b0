#!/usr/bin/env bash
# Side by side with TRL (issue 10): our `make bench` workload, then TRL on the same model
# directories, data and batch shapes, in one run; prints our/TRL ratios per stage.
#   make bench-trl        (or: bench/trl_compare.sh [WORKDIR])
# TRL is a benchmark-only dependency: 1.16 (SFTTrainer, RewardTrainer, DPOTrainer,
# RLOOTrainer, GRPOTrainer) goes into .venv with the project's pins as constraints; 0.29.1,
# the last TRL with a PPO trainer
# (trl.experimental.ppo), goes with --no-deps into bench/.trl-0.29.1 and is put first on
# PYTHONPATH for the PPO run only.
#
# On a GPU machine without Rust (scripts/gpu_check.sh's setting): DEVICE=cuda
# BENCH_BIN=.gpu/bench PYTHON=python3 TRL_INSTALLED=1 bench/trl_compare.sh DIR, with TRL
# already importable; BENCH_SHAPES, BENCH_BATCH, ... size both sides alike; TRL_STAGES (a
# space-separated list) and BENCH_STAGES (comma-separated) pick the stages.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cpu}
py=${PYTHON:-.venv/bin/python}
old=bench/.trl-0.29.1
work=${1:-$(mktemp -d)}
mkdir -p "$work"

if [ -z "${TRL_INSTALLED:-}" ]; then
    scripts/bootstrap.sh
    # datasets and accelerate too: the bootstrap installs trl alone (--no-deps) for its
    # chat templates, which imports but cannot train.
    if ! $py -c 'import trl, datasets, accelerate, sys; sys.exit(trl.__version__ != "1.16.0")' 2>/dev/null; then
        echo "trl_compare: installing TRL 1.16.0 into .venv (benchmark only)" >&2
        $py -m pip install --disable-pip-version-check -q -r bench/trl/requirements.txt -c scripts/requirements.txt
    fi
    if [ ! -f "$old/trl-0.29.1.dist-info/METADATA" ]; then
        echo "trl_compare: installing TRL 0.29.1 (no deps) into $old for PPO" >&2
        $py -m pip install --disable-pip-version-check -q --no-deps --target "$old" trl==0.29.1
    fi
fi

echo "trl_compare: ours ($device), models and data kept in $work" >&2
export BENCH_KEEP=$work BENCH_DEVICE=$device
[ "$device" = cuda ] && export BENCH_DTYPE=bf16
if [ -n "${BENCH_BIN:-}" ]; then
    "$BENCH_BIN" 2>"$work/ours.log" | grep '^{"stage"' >"$work/ours.jsonl"
else
    cargo bench -q -p ppo --bench stages 2>"$work/ours.log" | grep '^{"stage"' >"$work/ours.jsonl"
fi

: >"$work/trl.jsonl"
IFS=, read -ra archs <<<"${BENCH_SHAPES:-gpt2,llama}"
for arch in "${archs[@]}"; do
    for stage in ${TRL_STAGES:-sft sft-varied sft-packed reward dpo rloo grpo ppo}; do
        echo "trl_compare: TRL $stage $arch" >&2
        path=${PYTHONPATH:-}
        [ "$stage" = ppo ] && path=$old${path:+:$path}
        PYTHONPATH=$path $py bench/trl/compare.py "$stage" --work "$work" --arch "$arch" --device "$device" \
            2>"$work/trl-$stage-$arch.log" | grep '^{"stage"' >>"$work/trl.jsonl" \
            || { echo "TRL $stage $arch failed:" >&2; tail -3 "$work/trl-$stage-$arch.log" >&2; }
    done
done
$py bench/trl/table.py "$work/ours.jsonl" "$work/trl.jsonl"
