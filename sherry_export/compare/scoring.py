"""Log-likelihoods for zero-shot scoring and perplexity, through onnxruntime or PyTorch.

Both backends offer one call, ``forward(input_ids [1, T], past) -> (logits [1, T, V], past)``, which
never changes ``past``: :class:`sherry_export.generate.OnnxCausalLM` (the exported model, what users
deploy) and :class:`TorchCausalLM` (the PyTorch model, for the float baseline and QAT checkpoints).
A multiple-choice question runs its shared context once and each continuation on top of the cached
context, which is exact for a causal model and saves most of the work (contexts are longer than
answers). Batching several continuations in one call is not possible with a cache:
onnxruntime's GroupQueryAttention takes a multi-token input after a past only at batch 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm


class CausalLM(Protocol):
    def forward(self, input_ids: np.ndarray, past: Any = None) -> tuple[np.ndarray, Any]: ...


class TorchCausalLM:
    """A Hugging Face causal LM behind the same ``forward`` as the onnxruntime decoder."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, past: Any = None) -> tuple[np.ndarray, Any]:
        # transformers appends to a cache in place; the caller's cache must stay the bare context
        out = self.model(
            input_ids=torch.as_tensor(np.asarray(input_ids, np.int64)),
            past_key_values=copy.deepcopy(past),
            use_cache=True,
        )
        return out.logits.float().numpy(), out.past_key_values


def target_logprobs(logits: np.ndarray, targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """log p(targets[t]) under each row ``logits[t]`` (``[T, V]``), as float64.

    The exponentials stay float32 (a window's logits are 100 MB); the sums over the vocabulary and
    the results are float64, so long continuation and perplexity sums stay exact.
    """
    peak = logits.max(axis=-1, keepdims=True)
    total = np.exp(logits - peak).sum(axis=-1, dtype=np.float64)
    picked = logits[np.arange(len(logits)), np.asarray(targets)] - peak[:, 0]
    return picked.astype(np.float64) - np.log(total)


def continuation_logprobs(
    lm: CausalLM, context: Sequence[int], continuations: Sequence[Sequence[int]], max_positions: int
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation; the context runs once.

    A context too long for ``max_positions`` together with the longest continuation loses tokens
    from its start, as lm-evaluation-harness truncates from the left.
    """
    if not context:
        raise ValueError("a request needs a non-empty context")
    if any(not c for c in continuations):
        raise ValueError("a continuation encodes to no tokens")
    longest = max(len(c) for c in continuations)
    if longest >= max_positions:
        raise ValueError(f"a continuation of {longest} tokens does not fit the model's {max_positions} positions")
    context = list(context)[-(max_positions - longest + 1) :]
    logits, past = lm.forward(np.array([context]))
    sums = []
    for cont in continuations:
        total = float(target_logprobs(logits[0, -1:], cont[:1])[0])
        if len(cont) > 1:
            more, _ = lm.forward(np.array([cont[:-1]]), past)
            total += float(target_logprobs(more[0], cont[1:]).sum())
        sums.append(total)
    return sums


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    first_target: int
    """Tokens ``[first_target, end)`` are scored, each given all tokens of the window before it."""


def window_plan(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Fixed-length windows over a stream that score every token after the first exactly once.

    Window i ends at ``min(window + i*stride, n)`` and is ``window`` tokens long (shorter only when the
    stream is); it scores the tokens the previous window did not reach, so each scored token past the
    first window sees at least ``window - stride`` tokens of context (at least one: a window's first
    token has no logits predicting it).
    """
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride {stride}, window {window}")
    windows: list[Window] = []
    scored_to, i = 1, 0
    while scored_to < n_tokens:
        end = min(window + i * stride, n_tokens)
        windows.append(Window(max(0, end - window), end, scored_to))
        scored_to, i = end, i + 1
    return windows


@dataclass
class Perplexity:
    tokens: int
    nll: float
    """Summed negative log-likelihood (nats) over the scored tokens."""

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


def perplexity(lm: CausalLM, tokens: np.ndarray, window: int, stride: int, desc: str = "perplexity") -> Perplexity:
    """Perplexity of ``tokens`` in sliding windows (:func:`window_plan`), one forward per window."""
    tokens = np.asarray(tokens, np.int64)
    nll, scored = 0.0, 0
    for w in tqdm(window_plan(len(tokens), window, stride), desc=desc, unit="window", leave=False):
        logits, _ = lm.forward(tokens[None, w.start : w.end])
        targets = tokens[w.first_target : w.end]
        nll -= float(target_logprobs(logits[0, w.first_target - 1 - w.start : w.end - 1 - w.start], targets).sum())
        scored += len(targets)
    return Perplexity(scored, nll)
