#!/usr/bin/env bash
# Regenerate models/ from the training runs (docs/experiments.md): train, then `sherry pack` each run
# into the packed folder that ships. The runs are not in the repository (about an hour each on one
# thread); the command chain is
#   sherry train ... --output runs/X            (the recipes below, or models/recipes/scratch_ablation.sh)
#   sherry pack runs/X -o models/NAME --format F
# `sherry pack` keeps the recipe a run recorded (config.json's sherry_qat -> sherry_packed.trained_with),
# so the exports read "quantization-aware (packed checkpoint)". Packing a shipped folder again in its
# own format gives it back byte for byte (tests/test_pack.py), so
#   models/recipes/pack_shipped.sh --repack OUT
# re-packs the shipped folders themselves into OUT, a quick check that this version still writes them.
#
# Usage: models/recipes/pack_shipped.sh [RUNS] [OUT]      (default: runs, models; trains what is missing)
#        models/recipes/pack_shipped.sh --repack OUT
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} == --repack ]]; then
    out=${2:?give the output folder}
    sherry pack "$here/sherry-arenas-scratch-10m" -o "$out/sherry-arenas-scratch-10m" --format sherry
    sherry pack "$here/ternary-scratch-10m" -o "$out/ternary-scratch-10m" --format i2s
    for name in sherry-arenas-scratch-10m ternary-scratch-10m; do
        for file in config.json weights.safetensors tokenizer.json tokenizer_config.json; do
            cmp "$here/$name/$file" "$out/$name/$file"
        done
    done
    echo "re-packed models are identical to the shipped ones"
    exit 0
fi

runs=${1:-runs}
out=${2:-$here}
# The commands of the models' README files (the ablation runs add scratch_ablation.sh's eval/save flags)
common=(--init scratch --hidden 320 --layers 6 --heads 5 --vocab 8192 --steps 1000 --batch 8 --seq-len 256
        --lr 1e-3 --lr-schedule cosine --lr-warmup-ratio 0.05 --seed 0 --bf16 --threads 1)
ablation=(--eval-every 250 --eval-batches 20 --save-every 500 --save-limit 1)
train() { local run=$1; shift; [[ -f $run/config.json ]] || sherry train "${common[@]}" "$@" --output "$run"; }

sherry data --tokenize bpe
train "$runs/arenas-sweep/lmax0.1" --quant sherry --arenas --lambda-max 0.1   # Sherry + Arenas, group 128
train "$runs/ablation-1000/ternary" --quant ternary "${ablation[@]}"           # BitNet b1.58 absmean, per tensor
train "$runs/ablation-1000/fp" --quant none "${ablation[@]}"                   # full precision

sherry pack "$runs/arenas-sweep/lmax0.1" -o "$out/sherry-arenas-scratch-10m" --format sherry
sherry pack "$runs/ablation-1000/ternary" -o "$out/ternary-scratch-10m" --format i2s
# The full-precision reference ships unpacked (a plain Hugging Face folder in float16): nothing to pack.
python - "$runs/ablation-1000/fp" "$out/fp-scratch-10m" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

source, target = sys.argv[1:]
AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
PY
