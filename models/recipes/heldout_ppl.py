"""Held-out perplexity of trained checkpoints on the packaged corpora (docs/data.md's held-out split).

Usage: python models/recipes/heldout_ppl.py RUN_DIR [RUN_DIR ...] [--tokens 100000] [--window 256]
Non-overlapping windows of --window tokens over the first --tokens held-out tokens, tokenized with
the 8192-token BPE the scratch models train with; models run in eval mode (Arenas' λ = 0).
"""

import argparse
import math

import numpy as np
import torch
from tqdm import tqdm

from sherry_export.data import bpe_tokenizer, corpus_tokens
from sherry_export.qat import load_qat_model
from sherry_export.report import markdown_table


def perplexity(model: torch.nn.Module, tokens: np.ndarray, window: int) -> float:
    windows = torch.from_numpy(np.asarray(tokens[: len(tokens) // window * window], np.int64)).view(-1, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(windows.split(16), desc="held-out", unit="batch", leave=False):
            logits = model(batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum")
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    heldout = corpus_tokens(bpe_tokenizer())["heldout"][: args.tokens]
    rows = []
    for run in args.runs:
        model, recipe = load_qat_model(run)
        rows.append([run, recipe.__class__.__name__ if recipe else "full precision",
                     round(perplexity(model.eval(), heldout, args.window), 2)])
    print(markdown_table(["run", "recipe", f"held-out perplexity ({len(heldout)} tokens)"], rows))


if __name__ == "__main__":
    main()
