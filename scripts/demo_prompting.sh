#!/usr/bin/env bash
# `make demo-prompting`: the lecture's chain-of-thought table, reproduced small, on the
# chickens-and-rabbits problems. From one pretrained base (the demo's from-scratch model
# after the arithmetic-facts corpus, as in `make demo-adapters`), SFT on the same training
# problems with four kinds of demonstrations — the answer only (standard), the chain of
# thought, the equation only, the reasoning after the answer — each for the same number of
# steps, mixed with the arithmetic facts; then `sft eval --tasks` with the bundled task files on the 48 held-out problems:
# greedy, one sample at temperature 0.7 and the majority of 8 (self-consistency) under
# three sampling seeds, and the prefix/cloze multiple-choice pair. The base itself is
# prompted with 4 shots of each kind (in-context learning) for comparison. Everything
# under runs/demo-prompting/ (tensorboard --logdir runs/demo-prompting); the table is
# report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release
D=${DEMO_DIR:-runs/demo-prompting}
SEED=${DEMO_SEED:-1}
STEPS=${DEMO_PROMPTING_STEPS:-700}
rm -rf "$D"
mkdir -p "$D"
. scripts/stage.sh

stage data $B/demo data --out "$D/data" --seed "$SEED"
stage prompting-data $B/demo prompting-data --out "$D/data" --seed "$SEED"
# The task files with this seed's held-out problems (for seed 1, tasks/cage/ itself).
mkdir -p "$D/tasks"
cp tasks/cage/*.yaml "$D/tasks/"
$B/demo tasks-data --out "$D/tasks" --seed "$SEED"
T="$D/tasks"
stage pretrain $B/sft train --model "$D/data/base" --data "$D/data/pretrain.jsonl" \
    --output-dir "$D/pretrain" --lr 2e-3 --warmup-steps 20 --schedule cosine --batch-size 64 \
    --max-steps 300 --max-length 128 --seed "$SEED" --log-every 100
styles=(standard cot equation answer_first)
# Each SFT mixes the demonstrations with the arithmetic facts (a FLAN-style mixture, each
# file's loss logged as train/loss/<file>), so the base's arithmetic is not forgotten.
for style in "${styles[@]}"; do
    stage "sft_$style" $B/sft train --model "$D/pretrain/final" --data "$D/data/sft_$style.jsonl" \
        --data "$D/data/pretrain.jsonl" --output-dir "$D/sft_$style" --lr 3e-3 --warmup-steps 20 \
        --schedule cosine --batch-size 48 --max-steps "$STEPS" --max-length 128 --seed "$SEED" \
        --log-every 100
done
# In-context learning: the base prompted with 4 exemplars of each kind.
stage eval_base $B/sft eval --model "$D/pretrain/final" \
    --tasks "$T/cage_standard.yaml,$T/cage_cot.yaml,$T/cage_equation_only.yaml,$T/cage_answer_first.yaml,$T/cage_mc_prefix.yaml,$T/cage_mc_cloze.yaml" \
    --output "$D/samples_base.jsonl" --batch-size 48
for style in "${styles[@]}"; do
    stage "eval_${style}" $B/sft eval --model "$D/sft_$style/final" \
        --tasks "$T/cage_zero_shot.yaml,$T/cage_mc_prefix.yaml,$T/cage_mc_cloze.yaml" \
        --output "$D/samples_$style.jsonl" --batch-size 48
    for s in 1 2 3; do
        stage "sc_${style}_$s" $B/sft eval --model "$D/sft_$style/final" \
            --tasks "$T/cage_self_consistency.yaml" --num-fewshot 0 --seed "$s" \
            --output "$D/samples_sc_${style}_$s.jsonl" --batch-size 48
    done
done
$B/demo prompting-report --dir "$D"
