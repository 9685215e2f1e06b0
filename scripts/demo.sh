#!/usr/bin/env bash
# `make demo`: the InstructGPT pipeline on the bundled chickens-and-rabbits task, through
# the real binaries: data → sft train → reward train → ppo train (and GRPO and online DPO with a verifier)
# and DPO (and KTO, ORPO) on the rankings → held-out evaluation by a programmatic judge. Everything goes under runs/demo/ (TensorBoard: tensorboard --logdir runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release
D=${DEMO_DIR:-runs/demo}
SEED=${DEMO_SEED:-1}
rm -rf "$D"
mkdir -p "$D"
times="$D/times.jsonl"
. scripts/stage.sh

stage data $B/demo data --out "$D/data" --seed "$SEED"
cat "$D/data/sft.jsonl" "$D/data/pretrain.jsonl" > "$D/data/sft_and_facts.jsonl"
stage sft $B/sft train --model "$D/data/base" --data "$D/data/sft_and_facts.jsonl" --output-dir "$D/sft" \
    --lr 2e-3 --warmup-steps 20 --schedule cosine --batch-size 64 --epochs 50 --max-length 128 \
    --seed "$SEED" --log-every 200
stage reward $B/reward train --model "$D/sft/final" --data "$D/data/rankings.jsonl" \
    --eval-data "$D/data/rankings_eval.jsonl" --output-dir "$D/reward" --lr 1e-3 --batch-size 16 \
    --epochs 3 --max-length 128 --seed "$SEED" --log-every 50
stage ppo $B/ppo train --policy "$D/sft/final" --reward-model "$D/reward/final" \
    --prompts "$D/data/prompts.jsonl" --output-dir "$D/ppo" --rollout-batch-size 64 \
    --response-length 64 --ppo-epochs 2 --num-minibatches 2 --lr 1e-5 --kl-coef 0.05 \
    --max-steps 30 --seed "$SEED" --log-every 5
# GRPO from the same SFT policy with a verifier instead of the reward model: the last
# "N rabbits" of a response against the prompt row's answer (issue 16).
stage grpo $B/ppo train --policy "$D/sft/final" --prompts "$D/data/prompts.jsonl" \
    --output-dir "$D/grpo" --advantage-estimator grpo --num-generations 4 \
    --reward-rule exact-answer --answer-pattern '(?s).*\D(\d+) rabbits' \
    --kl-in-loss --kl-coef 0.05 --loss-aggregation seq-mean-token-mean \
    --rollout-batch-size 16 --response-length 64 --ppo-epochs 2 --num-minibatches 2 --lr 1e-5 \
    --max-steps 30 --seed "$SEED" --log-every 5
# Online DPO from the same SFT policy with the same verifier (TRL's OnlineDPOTrainer): two
# responses per prompt, the one judged right chosen; only the pairs the verifier tells
# apart are trained on (--filter-groups).
stage online_dpo $B/ppo train --policy "$D/sft/final" --prompts "$D/data/prompts.jsonl" \
    --output-dir "$D/online_dpo" --advantage-estimator online-dpo --num-generations 2 \
    --reward-rule exact-answer --answer-pattern '(?s).*\D(\d+) rabbits' --filter-groups \
    --kl-coef 0.1 --rollout-batch-size 32 --response-length 64 --ppo-epochs 2 \
    --num-minibatches 2 --lr 1e-5 --max-steps 30 --seed "$SEED" --log-every 5
# DPO from the same SFT policy on the reward model's rankings (all their pairs), with no
# reward model and no sampling (issue 17); the reference is the SFT policy.
stage dpo $B/dpo train --model "$D/sft/final" --data "$D/data/rankings.jsonl" \
    --eval-data "$D/data/rankings_eval.jsonl" --output-dir "$D/dpo" --beta 0.1 --lr 3e-5 \
    --batch-size 64 --epochs 1 --max-length 128 --seed "$SEED" --log-every 10
# The same with RPO's NLL term on the chosen answers (TRL's loss_type ["sigmoid", "sft"]),
# which keeps their likelihood up and tolerates a larger learning rate.
stage rpo $B/dpo train --model "$D/sft/final" --data "$D/data/rankings.jsonl" \
    --eval-data "$D/data/rankings_eval.jsonl" --output-dir "$D/rpo" --beta 0.1 --lr 1e-4 \
    --rpo-alpha 1 --batch-size 64 --epochs 1 --max-length 128 --seed "$SEED" --log-every 10
# KTO from the same SFT policy on the same rankings unpaired (each pair's better answer
# desirable, its worse one not), at plain DPO's learning rate.
stage kto $B/dpo train --model "$D/sft/final" --data "$D/data/rankings.jsonl" \
    --eval-data "$D/data/rankings_eval.jsonl" --output-dir "$D/kto" --loss-type kto --beta 0.1 \
    --lr 3e-5 --batch-size 64 --epochs 1 --max-length 128 --seed "$SEED" --log-every 10
# ORPO from the same SFT policy on the same rankings: no reference model (TRL's
# ORPOTrainer: the chosen answers' NLL plus β × the odds-ratio term), at RPO's rate.
stage orpo $B/dpo train --model "$D/sft/final" --data "$D/data/rankings.jsonl" \
    --eval-data "$D/data/rankings_eval.jsonl" --output-dir "$D/orpo" --loss-type orpo --beta 0.1 \
    --lr 1e-4 --batch-size 64 --epochs 1 --max-length 128 --seed "$SEED" --log-every 10
# Held-out accuracy, sampled at temperature 1 with three sampling seeds, for every policy.
start=$(date +%s%N)
for model in sft ppo grpo online_dpo dpo rpo kto orpo; do
    for s in 1 2 3; do
        $B/sft generate --model "$D/$model/final" --prompts "$D/data/eval_prompts.jsonl" \
            --output "$D/eval_${model}_$s.jsonl" --max-new-tokens 64 --temperature 1 --seed "$s" \
            --batch-size 48 > /dev/null 2>> "$D/eval.log"
        $B/demo judge --prompts "$D/data/eval_prompts.jsonl" --generations "$D/eval_${model}_$s.jsonl" \
            > "$D/judge_${model}_$s.json"
    done
done
$B/reward eval --model "$D/reward/final" --data "$D/data/rankings_eval.jsonl" \
    --output "$D/reward_eval_rows.jsonl" > "$D/reward_eval.json" 2>> "$D/eval.log"
echo "{\"stage\": \"eval\", \"ms\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$times"
$B/demo report --dir "$D"
