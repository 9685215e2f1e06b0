#!/usr/bin/env bash
# `make demo-adapters`: full fine-tuning vs LoRA (alone, with trained embedding and head
# copies, and on a 4-bit base) vs prompt tuning vs prefix tuning for the SFT step of the
# demo task, from the same base. The demo's from-scratch model is first pretrained on the
# arithmetic-facts corpus alone (standing in for a pretrained LM: it knows arithmetic,
# not the task); then each method learns the task from the demonstrations (plus the facts,
# as in `make demo`) for the same number of steps. Measured: trainable parameters,
# checkpoint size, peak RSS, time, held-out accuracy (48 problems × 3 sampling seeds, the
# programmatic judge). Everything under runs/demo-adapters/.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release
D=${DEMO_DIR:-runs/demo-adapters}
SEED=${DEMO_SEED:-1}
STEPS=${DEMO_ADAPTER_STEPS:-600}
rm -rf "$D"
mkdir -p "$D"
run() { # run NAME CMD...: time and peak RSS (KB) into NAME.time, summary into NAME.json
    local name=$1; shift
    echo "== $name" >&2
    /usr/bin/time -f '{"seconds": %e, "peak_rss_kb": %M}' -o "$D/$name.time" "$@" \
        > "$D/$name.json" 2> "$D/$name.log" || { echo "demo-adapters: $name failed, see $D/$name.log" >&2; tail -3 "$D/$name.log" >&2; exit 1; }
}
$B/demo data --out "$D/data" --seed "$SEED" > /dev/null
cat "$D/data/sft.jsonl" "$D/data/pretrain.jsonl" > "$D/data/sft_and_facts.jsonl"
run pretrain $B/sft train --model "$D/data/base" --data "$D/data/pretrain.jsonl" --output-dir "$D/pretrain" \
    --lr 2e-3 --warmup-steps 20 --schedule cosine --batch-size 64 --max-steps 300 --max-length 128 \
    --seed "$SEED" --log-every 100
common=(--model "$D/pretrain/final" --data "$D/data/sft_and_facts.jsonl" --schedule cosine
        --warmup-steps 20 --batch-size 64 --max-steps "$STEPS" --max-length 128 --seed "$SEED" --log-every 200)
run full $B/sft train "${common[@]}" --output-dir "$D/full" --lr 2e-3
run lora $B/sft train "${common[@]}" --output-dir "$D/lora" --lr 5e-3 \
    --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear
# LoRA with trained copies of the embedding and the head (modules_to_save): the words of
# the answers ("rabbits", "chickens") are tokens the facts-only base never produced; and
# the same on the base held in 4 bits (QLoRA).
run lora-save $B/sft train "${common[@]}" --output-dir "$D/lora-save" --lr 5e-3 \
    --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear --lora-modules-to-save embed_tokens,lm_head
run qlora-save $B/sft train "${common[@]}" --output-dir "$D/qlora-save" --lr 5e-3 \
    --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear --lora-modules-to-save embed_tokens,lm_head \
    --load-in-4bit --use-bnb-nested-quant
run prompt $B/sft train "${common[@]}" --output-dir "$D/prompt" --lr 3e-2 \
    --prompt-tuning-tokens 16 --prompt-tuning-init text \
    --prompt-tuning-init-text "Heads 11, legs 30. 11*2=22, 30-22=8, 8/2=4 rabbits, 11-4=7 chickens."
# Prefix tuning (P-tuning v2's deep prompts): 16 virtual tokens' keys and values in every
# layer, N(0, 1) as PEFT starts them.
run prefix $B/sft train "${common[@]}" --output-dir "$D/prefix" --lr 1e-2 --prefix-tuning-tokens 16
for method in pretrain full lora lora-save qlora-save prompt prefix; do
    for s in 1 2 3; do
        $B/sft generate --model "$D/$method/final" --prompts "$D/data/eval_prompts.jsonl" \
            --output "$D/eval_${method}_$s.jsonl" --max-new-tokens 64 --temperature 1 --seed "$s" \
            --batch-size 48 > /dev/null 2>> "$D/eval.log"
        $B/demo judge --prompts "$D/data/eval_prompts.jsonl" --generations "$D/eval_${method}_$s.jsonl" \
            > "$D/judge_${method}_$s.json"
    done
done
$B/demo adapters-report --dir "$D"
