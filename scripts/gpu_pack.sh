#!/usr/bin/env bash
# Builds, here, what the GPU scripts run on the device machine (which has no Rust) and packs
# it into .gpu/bin.tar.xz: the stage binaries, the benchmark (ppo/benches/stages.rs) and the
# CUDA-graph test (common/tests/cuda_graphs.rs), stripped and compressed (the device tool
# carries 64 MiB at most; stripped they were 60 MB, packed 14 MB, on 2026-11-30). On the device machine:
#   mkdir -p /tmp/g && tar -xJf .gpu/bin.tar.xz -C /tmp/g && GPU_BIN=/tmp/g bash scripts/gpu_nccl.sh
# (the binaries' rpath includes the device machine's torch, /opt/torch/.venv/...).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
executable() { # the test or bench executable cargo built, from its JSON messages
    "$PY" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
cargo build --release --bins
bench=$(cargo bench -p ppo --bench stages --no-run --message-format=json | executable stages)
graphs=$(cargo test --release -p common --test cuda_graphs --no-run --message-format=json | executable cuda_graphs)
stage=$(mktemp -d)
for b in sft reward dpo ppo; do strip -o "$stage/$b" "target/release/$b"; done
strip -o "$stage/bench" "$bench"
strip -o "$stage/cuda_graphs" "$graphs"
mkdir -p .gpu
tar -cJf .gpu/bin.tar.xz -C "$stage" .
rm -rf "$stage"
ls -l .gpu/bin.tar.xz
