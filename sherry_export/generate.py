"""Running an exported decoder in plain onnxruntime: forward passes with a KV cache, and generation.

The decoder graph (``sherry_export.export.llama``) takes ``input_ids``, ``attention_mask`` and the
past KV per layer, and returns logits and the present KV; prefill feeds the whole prompt with an
empty past, then each decode step feeds one token with the previous present as past.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from sherry_export.errors import check_seed, check_temperature, check_top_k, check_top_p
from sherry_export.runtime import KernelPath, make_session
from sherry_export.verify import MAX_POSITIONS_KEY, verify_model_files

KVCache = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second: every generated token after the first comes from one decode step."""
        steps = len(self.step_seconds)
        return steps / sum(self.step_seconds) if steps else float("nan")


class OnnxCausalLM:
    """An exported decoder in an onnxruntime session, with the ``ai.sherry`` ops registered."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        threads: int = 1,
        kernel: KernelPath | None = None,
        profile_prefix: str | os.PathLike[str] | None = None,
        verify: bool = True,
    ) -> None:
        """``profile_prefix`` turns on onnxruntime's profiler (see :func:`sherry_export.runtime.make_session`).

        ``verify`` first checks the weight files against the checksums ``sherry export`` recorded in the
        folder's ``sherry_export.json`` (:mod:`sherry_export.verify`): damaged weights otherwise run and
        generate garbage. Folders without recorded checksums load unchecked.
        """
        if verify:
            verify_model_files(model_path)
        self.session: ort.InferenceSession = make_session(
            os.fspath(model_path), threads=threads, kernel=kernel, profile_prefix=profile_prefix
        )
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past or "input_ids" not in {i.name for i in self.session.get_inputs()}:
            raise ValueError(f"{model_path} is not a sherry-export decoder (no input_ids / past_key_values inputs)")
        self.num_layers = len(past) // 2
        _, self.kv_heads, _, self.head_dim = past[0].shape
        self.vocab_size = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
        positions = self.session.get_modelmeta().custom_metadata_map.get(MAX_POSITIONS_KEY)
        self.max_positions: int | None = int(positions) if positions is not None else None
        """Positions the rotary caches hold (the model's max_position_embeddings); None if unrecorded."""
        self._outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [(empty, empty) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Logits ``[batch, sequence, vocab]`` for ``input_ids`` after ``past``, and the grown cache."""
        input_ids = np.asarray(input_ids, np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {input_ids.shape}")
        past = past if past is not None else self.empty_cache(input_ids.shape[0])
        total = past[0][0].shape[2] + input_ids.shape[1]
        self.check_length(total)
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": np.ones((input_ids.shape[0], total), np.int64),
        }
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        logits, *present = self.session.run(self._outputs, feeds)
        return logits, list(zip(present[0::2], present[1::2], strict=True))

    def check_length(self, positions: int) -> None:
        """Refuse a sequence longer than the rotary caches: onnxruntime would index past their end."""
        if self.max_positions is not None and positions > self.max_positions:
            raise ValueError(
                f"the sequence would reach {positions} positions, but this model holds {self.max_positions} "
                "(its max_position_embeddings); shorten the prompt or ask for fewer new tokens"
            )

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_tokens: set[int] | frozenset[int] = frozenset(),
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Greedy (``temperature=0``) or sampled generation; ``on_token`` streams each new token."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p, seed)
        self.check_length(len(prompt_ids) + max_new_tokens - 1)  # the last token needs no forward pass
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        logits, cache = self.forward(np.array([prompt_ids]))
        prefill = time.perf_counter() - start
        tokens: list[int] = []
        steps: list[float] = []
        while True:
            token = sample(logits[0, -1], temperature, top_k, top_p, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) == max_new_tokens or token in stop_tokens:
                break
            step_start = time.perf_counter()
            logits, cache = self.forward(np.array([[token]]), cache)
            steps.append(time.perf_counter() - step_start)
        return GenerationResult(tokens, len(prompt_ids), prefill, sum(steps), steps)


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int) -> None:
    """Refuse sampling settings that would fail late (NaN probabilities, a negative seed) or silently mean
    something else (a negative temperature or top-k, a top-p outside (0, 1])."""
    for name, check, value in (
        ("temperature", check_temperature, temperature),
        ("top_k", check_top_k, top_k),
        ("top_p", check_top_p, top_p),
        ("seed", check_seed, seed),
    ):
        try:
            check(value)
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Pick the next token: argmax at temperature 0, else softmax sampling restricted by top-k and top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled)
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(order, p=probs))
