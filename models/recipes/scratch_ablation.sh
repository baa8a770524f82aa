#!/usr/bin/env bash
# The from-scratch ablation of docs/experiments.md: one Llama (d320, 6 layers, 8192-token BPE,
# ~10M parameters) trained four ways on the same data, seed and token budget:
#   fp (no quantization), ternary (BitNet absmean), sherry without Arenas, sherry with Arenas.
# Usage: models/recipes/scratch_ablation.sh [STEPS] [OUT]   (runs two variants at a time, 1 thread each)
set -euo pipefail
steps=${1:-600}
out=${2:-runs/ablation}
common=(--init scratch --hidden 320 --layers 6 --heads 5 --vocab 8192 --steps "$steps" --batch 8 --seq-len 256
        --lr 1e-3 --lr-schedule cosine --lr-warmup-ratio 0.05 --seed 0 --bf16 --threads 1
        --eval-every 250 --eval-batches 20 --save-every 500 --save-limit 1)
sherry data --tokenize bpe
run() { local name=$1; shift; sherry train "${common[@]}" "$@" --output "$out/$name" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
run fp --quant none & run ternary --quant ternary & wait
run sherry --quant sherry --no-arenas & run sherry-arenas --quant sherry --arenas & wait
