"""Running an exported decoder in plain onnxruntime: forward passes with a KV cache, and generation.

Sherry's own runner, for what onnxruntime-genai (the engine of ``sherry generate``, see
:mod:`sherry_export.genai`) does not offer: logits of whole sequences and caches continued several
ways (scoring), onnxruntime's profiler and timings per step (``sherry compare``, ``sherry bench``),
and other backends (TVM's Relax VM subclasses :class:`OnnxCausalLM`).

The decoder graph (``sherry_export.export.llama``) takes ``input_ids``, ``attention_mask`` and the
past KV per layer, and returns logits and the present KV; prefill feeds the whole prompt with an
empty past, then each decode step feeds one token with the previous present as past.

Two ways to run it:

- :meth:`OnnxCausalLM.forward` is functional: the past goes in as arrays and a new, longer present
  comes back, so one past can be continued several ways (the scorer in ``sherry_export.compare``
  does that) and batches work. Each call copies the whole cache into the present.
- :meth:`OnnxCausalLM.generate` runs a :class:`SharedKVDecoder`: past and present are one
  preallocated buffer per layer that ``GroupQueryAttention`` writes into in place, so a decode step
  copies no cache and allocates no tensor. Its logits equal ``forward``'s bit for bit. Subclasses
  that run the graph on another backend bring their own decoder (TVM's Relax VM: ``RelaxDecoder``,
  in place as well) or generate with a :class:`ForwardDecoder` (through ``forward``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
        self._decoder: SharedKVDecoder | None = None

    def empty_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [(empty, empty) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Logits ``[batch, sequence, vocab]`` for ``input_ids`` after ``past``, and the grown cache.

        ``past`` is left as it was (the present is a new array), which is what branching callers need;
        generation uses :meth:`decoder` instead, which writes the cache in place.
        """
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

    def decoder(self, positions: int) -> Decoder:
        """What :meth:`generate` decodes with: a :class:`SharedKVDecoder` that holds at least ``positions`` positions.

        The decoder and its buffers are kept and reused by later calls that fit in them (a warm-up
        generation and the timed one share them); a longer request replaces them. Subclasses that run
        the graph elsewhere return their own (TVM's Relax VM: ``tvm_schedules.relax_onnx.RelaxDecoder``).
        """
        self.check_length(positions)
        if self._decoder is None or self._decoder.capacity < positions:
            self._decoder = None  # the old buffers go before the new ones are allocated
            self._decoder = SharedKVDecoder(self, positions)
        return self._decoder

    def check_length(self, positions: int) -> None:
        """Refuse a sequence longer than the rotary caches: onnxruntime would index past their end."""
        if self.max_positions is not None:
            check_sequence_length(positions, self.max_positions, "its max_position_embeddings")

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
        check_generation(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed)
        decoder = self.decoder(len(prompt_ids) + max_new_tokens - 1)  # the last token needs no forward pass
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        logits = decoder.prefill(prompt_ids)[0, -1]
        prefill = time.perf_counter() - start
        tokens: list[int] = []
        steps: list[float] = []
        while True:
            token = sample(logits, temperature, top_k, top_p, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) == max_new_tokens or token in stop_tokens:
                break
            step_start = time.perf_counter()
            logits = decoder.step(token)
            steps.append(time.perf_counter() - step_start)
        return GenerationResult(tokens, len(prompt_ids), prefill, sum(steps), steps)


class Decoder(Protocol):
    """Prefill a prompt, then feed one token at a time; the logits of the last position each time."""

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[1, len(prompt_ids), vocab]``."""
        ...

    def step(self, token: int) -> np.ndarray:
        """Logits ``[vocab]``, valid until the next step."""
        ...


class ForwardDecoder:
    """A :class:`Decoder` on :meth:`OnnxCausalLM.forward`, the cache handed from call to call.

    For backends whose ``forward`` keeps the cache where it is between calls (tensors of their own);
    in onnxruntime it would copy the whole cache every step, which :class:`SharedKVDecoder` avoids.
    """

    def __init__(self, lm: OnnxCausalLM) -> None:
        self.lm = lm
        self.cache: KVCache | None = None

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        logits, self.cache = self.lm.forward(np.array([prompt_ids]))
        return logits

    def step(self, token: int) -> np.ndarray:
        if self.cache is None:
            raise RuntimeError("prefill a prompt before the first decode step")
        logits, self.cache = self.lm.forward(np.array([[token]]), self.cache)
        return logits[0, -1]


class SharedKVDecoder:
    """Prefill, then decode step after step, on one preallocated KV buffer per layer that is past and present at once.

    ``GroupQueryAttention`` works in place when its past and present key (and value) are the same
    ``[1, kv_heads, capacity, head_dim]`` buffer (onnxruntime's share-buffer mode, the one
    onnxruntime-genai runs with ``past_present_share_buffer``): it writes the new positions at
    ``seqlens_k`` and attends over the first ``total_sequence_length`` positions, both of which the
    graph takes from the attention mask, so the mask is bound with the sequence's true length while
    the cache has the capacity's. Every input and output is bound once, by address, to an array
    allocated here (IOBinding); a decode step writes its token into the bound input, binds the mask
    one position longer over the same array of ones, and runs. It copies no cache and allocates no
    tensor: the logits land in a preallocated array, and positions past the sequence are never read.
    """

    def __init__(self, lm: OnnxCausalLM, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the KV buffer must hold at least one position, got {capacity}")
        self.session = lm.session
        self.capacity = capacity
        self.length = 0
        """Positions the cache holds now."""
        self.cache = np.empty((lm.num_layers, 2, 1, lm.kv_heads, capacity, lm.head_dim), np.float32)
        self.cache.fill(0.0)  # touched now, so no decode step takes the page faults of first writes
        self._mask = np.ones((1, capacity), np.int64)
        self._token = np.zeros((1, 1), np.int64)
        self._logits = np.empty((1, 1, lm.vocab_size), np.float32)
        self._binding = self.session.io_binding()
        for i in range(lm.num_layers):
            for j, kv in enumerate(("key", "value")):
                self._bind(f"past_key_values.{i}.{kv}", self.cache[i, j])
                self._bind(f"present.{i}.{kv}", self.cache[i, j], output=True)
        self._bind_step()

    def _bind(self, name: str, array: np.ndarray, output: bool = False, shape: Sequence[int] | None = None) -> None:
        """Bind ``name`` to ``array``'s memory (no copy); the array must outlive the binding."""
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, "cpu", 0, array.dtype.type, list(array.shape if shape is None else shape), array.ctypes.data)

    def _bind_step(self) -> None:
        self._bind("input_ids", self._token)
        self._bind("logits", self._logits, output=True)

    def _run(self, length: int) -> None:
        self._bind("attention_mask", self._mask, shape=(1, length))
        self.session.run_with_iobinding(self._binding)
        self.length = length

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Start a new sequence: logits ``[1, len(prompt_ids), vocab]`` of the prompt (a new array)."""
        ids = np.array([prompt_ids], np.int64)
        if ids.shape[1] < 1 or ids.shape[1] > self.capacity:
            raise ValueError(f"the prompt has {ids.shape[1]} tokens; this KV buffer holds 1 to {self.capacity}")
        logits = np.empty((1, ids.shape[1], self._logits.shape[-1]), np.float32)
        self._bind("input_ids", ids)
        self._bind("logits", logits, output=True)
        self.length = 0  # a failed prefill leaves no sequence to continue
        try:
            self._run(ids.shape[1])
        finally:
            self._bind_step()  # before ids and logits can be freed
        return logits

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the sequence so far: its logits ``[vocab]``.

        The array is the decoder's own and the next step overwrites it; copy it to keep it.
        """
        if self.length == 0:
            raise RuntimeError("prefill a prompt before the first decode step")
        if self.length >= self.capacity:
            raise ValueError(f"the KV buffer is full ({self.capacity} positions); ask for a larger one")
        self._token[0, 0] = token
        self._run(self.length + 1)
        return self._logits[0, 0]


def check_sequence_length(positions: int, limit: int, what: str) -> None:
    """Refuse a sequence of ``positions`` positions where the model holds ``limit`` (``what`` says which
    setting of the model sets it)."""
    if positions > limit:
        raise ValueError(
            f"the sequence would reach {positions} positions, but this model holds {limit} ({what}); "
            "shorten the prompt or ask for fewer new tokens"
        )


def check_generation(
    prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    """Refuse an empty prompt, no new tokens, or sampling settings :func:`check_sampling` refuses."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, seed)


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
