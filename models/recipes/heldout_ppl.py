"""Held-out perplexity of trained checkpoints on the packaged corpora (docs/data.md's held-out split).

Usage: python models/recipes/heldout_ppl.py MODEL [MODEL ...] [--tokens 100000] [--window 256]
                                            [--project sherry|ternary]
MODEL is a run folder of ``sherry train``, a packed model folder, ``smollm2`` or any source
``sherry export`` takes. Each model reads the held-out text with its own tokenizer (the scratch
models' 8192-token BPE, SmolLM2's 49152-token one), so compare perplexities only between models that
share a tokenizer. Non-overlapping windows of --window tokens over the first --tokens held-out tokens;
QAT models run in eval mode (Arenas' λ = 0). ``--project`` adds, for each full-precision model,
a row for its post-training projection (Sherry, group 128; or BitNet absmean per tensor) with no training.
"""

import argparse
import copy
import math

import numpy as np
import torch
from tqdm import tqdm

from sherry_export.compare.run import qat_kind
from sherry_export.data import bpe_tokenizer, corpus_tokens
from sherry_export.models import load_tokenizer, resolve_source
from sherry_export.qat import PTQConfig, load_qat_model, quantize_
from sherry_export.report import markdown_table

PROJECTIONS = {"sherry": PTQConfig("sherry", group_size=128), "ternary": PTQConfig("absmean", group_size=None)}


def perplexity(model: torch.nn.Module, tokens: np.ndarray, window: int) -> float:
    windows = torch.from_numpy(np.asarray(tokens[: len(tokens) // window * window], np.int64)).view(-1, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(windows.split(16), desc="held-out", unit="batch", leave=False):
            logits = model(batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument(
        "--project",
        choices=sorted(PROJECTIONS),
        action="append",
        default=[],
        help="also score the post-training projection of full-precision models",
    )
    args = parser.parse_args()
    rows = []
    for source in args.models:
        tokenizer = load_tokenizer(resolve_source(source)) or bpe_tokenizer()
        heldout = corpus_tokens(tokenizer)["heldout"][: args.tokens]
        model, _ = load_qat_model(source)
        kind = qat_kind(model)
        variants = [(kind, model)]
        for name in args.project if kind == "full precision" else []:
            projected = copy.deepcopy(model)  # quantize_ swaps the linears in place
            quantize_(projected, PROJECTIONS[name])
            variants.append((f"{name} post-training projection", projected))
        for label, variant in variants:
            ppl = perplexity(variant.eval(), heldout, args.window)
            rows.append([source, label, f"{len(heldout)} × {len(tokenizer)}-token vocab", round(ppl, 2)])
    print(markdown_table(["model", "recipe", "held-out tokens", "held-out perplexity"], rows))


if __name__ == "__main__":
    main()
