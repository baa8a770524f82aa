#!/usr/bin/env bash
# Regenerate models/ from the training runs of docs/experiments.md: train what is missing, then
# `sherry pack` the chosen runs into the packed folders that ship. The chain is
#   python models/recipes/arenas_ablation.py all --out RUNS/arenas    (pretrain, sweep, arms × seeds, report)
#   sherry pack RUN -o models/NAME --format F
# The shipped Sherry model is the Sherry run (any arm, any seed) with the lowest held-out perplexity
# in RUNS/arenas/results.json; the dense-ternary model is the dense-ternary run of the same seed (the
# same data order); the full-precision model is the pretrained starting point, in float16.
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
packed=(sherry-qat-5m:sherry ternary-qat-5m:i2s)

if [[ ${1:-} == --repack ]]; then
    out=${2:?give the output folder}
    for entry in "${packed[@]}"; do
        name=${entry%%:*}
        sherry pack "$here/$name" -o "$out/$name" --format "${entry##*:}"
        for file in config.json weights.safetensors tokenizer.json tokenizer_config.json; do
            cmp "$here/$name/$file" "$out/$name/$file"
        done
    done
    echo "re-packed models are identical to the shipped ones"
    exit 0
fi

runs=${1:-runs}
out=${2:-$here}
python "$here/recipes/arenas_ablation.py" all --out "$runs/arenas"
read -r best ternary < <(python - "$runs/arenas/results.json" <<'PY'
import json
import sys
from pathlib import Path

arms = json.loads(Path(sys.argv[1]).read_text())["regimes"]["pretrained"]
best = min((run for arm, runs in arms.items() if arm.startswith("sherry") for run in runs),
           key=lambda run: run["heldout_ppl"])
seed = Path(best["folder"]).name if Path(best["folder"]).name.startswith("seed") else "seed0"
print(best["folder"], Path(arms["dense ternary"][0]["folder"]).parent / seed)
PY
)
echo "shipping $best (best Sherry run) and $ternary (dense ternary, same seed)"
sherry pack "$best" -o "$out/sherry-qat-5m" --format sherry
sherry pack "$ternary" -o "$out/ternary-qat-5m" --format i2s
# The full-precision reference ships unpacked (a plain Hugging Face folder in float16): nothing to pack.
python - "$runs/arenas/pretrain" "$out/fp-5m" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

source, target = sys.argv[1:]
AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
PY
