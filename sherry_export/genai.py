"""Generation through onnxruntime-genai, the engine of ``sherry generate``.

An export folder is an onnxruntime-genai model as it stands: ``genai_config.json`` names the graph,
its inputs and outputs, and the ``ai.sherry`` op library the folder carries (see
:func:`sherry_export.export.llm.genai_config`), and genai decodes in one KV buffer per layer that is
past and present at once (``past_present_share_buffer``). Our own runner
(:class:`sherry_export.generate.OnnxCausalLM`) stays for what genai does not offer: logits of a
whole sequence and branching caches (scoring), onnxruntime's profiler and IOBinding timings
(``sherry compare``, ``sherry bench``), and the TVM backend.

:func:`open_generator` picks the engine: genai where it loads the folder, else our runner, with a
note that says why.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from sherry_export.errors import InputError, load_json, one_line
from sherry_export.generate import GenerationResult, OnnxCausalLM, check_generation, check_sequence_length
from sherry_export.runtime import KERNEL_ENV, LIBRARY_ENV, KernelPath, check_session_settings
from sherry_export.verify import GENAI_CONFIG_FILE, MODEL_FILE, verify_model_files

Engine = Literal["genai", "sherry"]


@contextmanager
def _kernel_env(kernel: KernelPath | None) -> Iterator[None]:
    """``SHERRY_KERNEL`` set to ``kernel`` while genai creates its session: genai's config has no session
    config entries, and the op library reads the environment variable when it has none."""
    if kernel is None:
        yield
        return
    before = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = kernel
    try:
        yield
    finally:
        if before is None:
            del os.environ[KERNEL_ENV]
        else:
            os.environ[KERNEL_ENV] = before


class GenaiCausalLM:
    """An export folder loaded by onnxruntime-genai (CPU), generating like :meth:`OnnxCausalLM.generate`.

    Greedy decoding gives the same tokens as our runner (the same graph and kernels). Sampling is
    genai's own, so a seed draws other tokens than our runner's with the same seed.
    """

    def __init__(
        self, folder: str | os.PathLike[str], threads: int = 1, kernel: KernelPath | None = None, verify: bool = True
    ) -> None:
        """Raises :class:`~sherry_export.errors.InputError` when genai cannot load the folder (not installed,
        no ``genai_config.json``, a graph or op library it refuses), with genai's reason."""
        folder = Path(folder)
        check_session_settings(threads, kernel)
        try:
            import onnxruntime_genai as og
        except ImportError as error:
            raise InputError(f"onnxruntime-genai is not installed ({one_line(error)})") from error
        if not (folder / GENAI_CONFIG_FILE).is_file():
            raise InputError(f"{folder} has no {GENAI_CONFIG_FILE}; re-export it with `sherry export`")
        if verify:
            verify_model_files(folder / MODEL_FILE)
        model = load_json(folder / GENAI_CONFIG_FILE, "re-export it with `sherry export`")["model"]
        self.vocab_size: int = int(model["vocab_size"])
        self.context_length: int = int(model["context_length"])
        """Positions genai's KV buffer may hold (``max_length`` of a generation is at most this)."""
        config = og.Config(os.fspath(folder))
        config.clear_providers()  # CPU, whatever providers the folder's config lists
        session = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        try:
            with _kernel_env(kernel):
                self.model = og.Model(config)
        except RuntimeError as error:
            raise InputError(f"onnxruntime-genai cannot load {folder}: {one_line(error)}") from error
        self._og = og

    def check_length(self, positions: int) -> None:
        """Refuse a generation whose sequence (the last token included: genai's buffer holds it) would pass
        ``context_length``."""
        check_sequence_length(positions + 1, self.context_length, f"its {GENAI_CONFIG_FILE} context_length")

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
        """Greedy (``temperature=0``) or sampled generation; ``on_token`` streams each new token. Stops
        after ``max_new_tokens``, at a token of ``stop_tokens``, or at the config's ``eos_token_id``.

        Prefill time is genai's ``append_tokens`` (one run over the prompt); each later token's time is
        one ``generate_next_token`` (one decode run, then the choice of the next token).
        """
        check_generation(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed)
        self.check_length(len(prompt_ids) + max_new_tokens - 1)
        og = self._og
        params = og.GeneratorParams(self.model)
        search: dict = {"max_length": len(prompt_ids) + max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:  # top_k 0 means no top-k here: the whole vocabulary
            search.update(temperature=temperature, top_k=top_k or self.vocab_size, top_p=top_p, random_seed=seed)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens([int(t) for t in prompt_ids])
        prefill = time.perf_counter() - start
        tokens: list[int] = []
        steps: list[float] = []
        while not generator.is_done():
            step_start = time.perf_counter()
            generator.generate_next_token()
            if tokens:  # the first token comes from the prefill's logits: no decode run
                steps.append(time.perf_counter() - step_start)
            token = int(generator.get_next_tokens()[0])
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_tokens:
                break
        return GenerationResult(tokens, len(prompt_ids), prefill, sum(steps), steps)


def open_generator(
    folder: Path, engine: Engine | None, threads: int, kernel: KernelPath | None = None, verify: bool = True
) -> tuple[GenaiCausalLM | OnnxCausalLM, Engine]:
    """The engine that generates from ``folder``, and its name.

    ``engine=None``: onnxruntime-genai where it loads the folder, else our runner, with a note on stderr
    that says why; our runner, without a note, where ``SHERRY_OPS_LIBRARY`` names another build of the
    op library (genai loads only the folder's copy, and a developer who sets it means to run that
    build). ``"genai"`` fails when genai cannot load the folder; ``"sherry"`` is our runner. The weights
    are checked once, before either engine loads them (``verify``).
    """
    if verify:
        verify_model_files(folder / MODEL_FILE)
    if engine is None and os.environ.get(LIBRARY_ENV):
        engine = "sherry"  # the build it names (make asan's, a fresh one) is what the user wants to run
    if engine != "sherry":
        try:
            return GenaiCausalLM(folder, threads=threads, kernel=kernel, verify=False), "genai"
        except InputError as error:
            if engine == "genai":
                raise InputError(f"{error}; or generate with --engine sherry") from error
            print(f"note: {error}; generating with sherry's own onnxruntime runner", file=sys.stderr)
    return OnnxCausalLM(folder / MODEL_FILE, threads=threads, kernel=kernel, verify=False), "sherry"
