"""Accuracy of one model (an exported format, or a PyTorch model): held-out perplexity and zero-shot tasks.

Perplexity is on the held-out split of each packaged corpus (``sherry data``, ``docs/data.md``), or on
the last 5 % of a text file's tokens, in sliding windows of a fixed length. Every model sees the same
token streams and the same task documents, so differences between rows are paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sherry_export.compare.scoring import CausalLM, Perplexity, perplexity
from sherry_export.compare.settings import AccuracySettings
from sherry_export.compare.tasks import Question, TaskResult, evaluate_task, load_task, subset
from sherry_export.data import READERS, cache_dir, read_split, text_file_tokens, tokenize


@dataclass
class Evaluation:
    """One row of the accuracy table."""

    label: str
    backend: str
    """"onnxruntime" or "pytorch"."""
    perplexity: dict[str, Perplexity] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def mean_acc(self) -> float | None:
        """The mean ``acc`` over the tasks, as the Sherry paper's "Avg" column."""
        return float(np.mean([r.acc for r in self.tasks.values()])) if self.tasks else None


@dataclass
class EvalData:
    """What every model is scored on: token streams per corpus and the selected task questions."""

    streams: dict[str, np.ndarray]
    questions: dict[str, list[Question]]
    window: int
    stride: int
    max_positions: int


def heldout_streams(tokenizer, settings: AccuracySettings, root: Path | None = None) -> dict[str, np.ndarray]:
    """Held-out token streams, one per corpus (or the text file), capped at ``ppl_tokens`` + 1 tokens."""
    if settings.ppl_text is not None:
        streams = {settings.ppl_text.name: text_file_tokens(settings.ppl_text, tokenizer)["heldout"]}
    else:
        clean = (root or cache_dir()) / "corpora" / "clean"
        streams = {
            corpus: tokenize(read_split(clean, "heldout", corpus), tokenizer, desc=f"tokenizing {corpus}")
            for corpus in READERS
        }
    cap = None if settings.ppl_tokens is None else settings.ppl_tokens + 1
    return {name: np.asarray(ids[:cap], np.int64) for name, ids in streams.items()}


def prepare(tokenizer, settings: AccuracySettings, max_positions: int) -> EvalData:
    """Tokenize the perplexity text and load the task subsets, once for all models."""
    window = min(settings.window, max_positions)
    stride = min(settings.stride or window // 2, window - 1)  # the window may have shrunk to the model's
    questions = {}
    for task in settings.tasks:
        docs = load_task(task)
        questions[task] = [docs[i] for i in subset(len(docs), settings.limit)]
    return EvalData(heldout_streams(tokenizer, settings), questions, window, stride, max_positions)


def evaluate(lm: CausalLM, tokenizer, data: EvalData, label: str, backend: str) -> Evaluation:
    """Perplexity on every stream and accuracy on every task, for one model."""
    result = Evaluation(label, backend)
    for name, tokens in data.streams.items():
        result.perplexity[name] = perplexity(lm, tokens, data.window, data.stride, desc=f"{label} ppl {name}")
    for task, questions in data.questions.items():
        result.tasks[task] = evaluate_task(lm, tokenizer, task, questions, data.max_positions, label)
    return result
