"""What ``sherry compare`` can be asked to do: its settings, validated, without the machinery.

Light on purpose: the command line builds its options from these fields
(:func:`~sherry_export.arguments.option`) without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sherry_export.arguments import option, option_group, positive_int, thread_count
from sherry_export.formats import EXPORT_FORMATS, FP32, LM_HEADS
from sherry_export.ternary import PROJECTION_NAMES, QAT_METHODS

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
"""The zero-shot tasks (``tasks.py``)."""
DEMO_LIMIT = 25
"""Documents per zero-shot task in ``sherry demo``."""
DEMO_PPL_TOKENS = 6000
"""Scored tokens per held-out corpus in ``sherry demo``."""


@dataclass(frozen=True)
class SpeedSettings:
    """How decode is timed; the fields with an option are ``sherry compare``'s speed flags."""

    prompt_tokens: int = option(128, type=positive_int, help="prefill length (default: %(default)s)")
    decode_steps: int = option(64, type=positive_int, help="decode steps timed (default: %(default)s)")
    repetitions: int = option(
        3, type=positive_int, help="timed repetitions; the profiled pass comes on top (default: %(default)s)"
    )
    profile_steps: int = option(16, type=positive_int, help="decode steps profiled (default: %(default)s)")
    bandwidth_bytes: float = option(
        2.0**30, help="bytes the bandwidth probe reads per pass, well above the caches (default: %(default).3g)"
    )
    """Bytes the bandwidth probe reads per pass (``sherry_export.bandwidth``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "decode_steps", "repetitions", "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.bandwidth_bytes < 1e6:
            raise ValueError(f"bandwidth_bytes must be at least 1e6, got {self.bandwidth_bytes:g}")

    def decode_context(self, steps: int) -> float:
        """Positions the middle one of ``steps`` decode steps after the prompt attends over (its own
        included): step s attends over ``prompt_tokens + s``, so this is their mean and median."""
        return self.prompt_tokens + (steps + 1) / 2


@dataclass(frozen=True)
class AccuracySettings:
    """What is scored; the fields are ``sherry compare``'s accuracy flags."""

    tasks: tuple[str, ...] = option(TASKS, nargs="*", choices=TASKS, help="zero-shot tasks (default: all)")
    limit: int | None = option(None, type=positive_int, help="documents per task, a fixed seeded subset (default: all)")
    ppl_tokens: int | None = option(
        None, type=positive_int, help="scored tokens per held-out corpus (default: the whole held-out split)"
    )
    window: int = option(512, type=positive_int, help="perplexity window in tokens (default: %(default)s)")
    stride: int | None = option(
        None, type=positive_int, help="tokens between window ends, less than the window (default: window / 2)"
    )
    ppl_text: Path | None = option(None, help="held-out text file instead of the packaged corpora")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        for name in ("limit", "ppl_tokens", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}")
        if self.stride is not None and self.stride >= self.window:
            raise ValueError(f"stride ({self.stride}) must be less than the window ({self.window})")
        if self.ppl_text is not None and not self.ppl_text.is_file():
            raise FileNotFoundError(f"--ppl-text {self.ppl_text} is not a file")


@dataclass(frozen=True)
class CompareConfig:
    """Everything ``sherry compare`` can set; bad values are rejected before any export starts.

    The fields with an option are ``sherry compare``'s flags of the same name; ``--group-size`` and ``--qat``
    are the checkpoint flags every exporting command shares (``add_checkpoint_args``).
    """

    model: str = option(
        flags=("model",), help="'smollm2', a .gguf file, a Hugging Face folder, or shape:NAME (--speed-only)"
    )
    output: Path = option(flags=("-o", "--output"), required=True, help="results folder (exports go to models/)")
    formats: tuple[str, ...] = option(EXPORT_FORMATS, choices=EXPORT_FORMATS, help="formats (default: all)")
    threads: tuple[int, ...] = option((1, 2), type=thread_count, help="thread counts (default: %(default)s)")
    lm_head: str = option(FP32, choices=LM_HEADS, help="LM head of every format (default: %(default)s)")
    group_size: int | None = 128
    group_size_explicit: bool = False
    qat: str | None = None
    """The QAT method whose latent weights MODEL holds (``--qat``), for checkpoints that do not say so."""
    projection: str = option("sherry", choices=PROJECTION_NAMES, help="post-training projection (default: %(default)s)")
    run_speed: bool = True
    run_accuracy: bool = True
    reuse_exports: bool = option(False, help="keep exports in OUTPUT/models made with the same options")
    speed: SpeedSettings = option_group(SpeedSettings, "speed")
    accuracy: AccuracySettings = option_group(AccuracySettings, "accuracy")
    torch_baseline: bool = option(False, group="accuracy", help="also score the PyTorch model")
    compare_with: tuple[Path, ...] = option(
        (),
        group="accuracy",
        metavar="PATH",
        help="other checkpoints (dense-ternary, full precision) to score in PyTorch next to MODEL",
    )

    def __post_init__(self) -> None:
        from sherry_export.models import SHAPE_PREFIX, resolve_source

        if not self.formats:
            raise ValueError("give at least one format")
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats repeat: {' '.join(self.formats)}")
        if not self.threads or any(t < 1 for t in self.threads) or len(set(self.threads)) != len(self.threads):
            raise ValueError(f"threads must be distinct positive counts, got {list(self.threads)}")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"unknown LM head {self.lm_head!r}; choose one of {', '.join(LM_HEADS)}")
        if self.qat is not None and self.qat not in QAT_METHODS:
            raise ValueError(f"unknown QAT method {self.qat!r}; choose one of {', '.join(QAT_METHODS)}")
        if not (self.run_speed or self.run_accuracy):
            raise ValueError("--speed-only and --accuracy-only exclude each other")
        resolve_source(self.model)  # a missing model is an error now, not after minutes of work
        if self.run_accuracy and self.model.startswith(SHAPE_PREFIX):
            raise ValueError(f"{self.model} has random weights and no tokenizer: pass --speed-only")
        if (self.torch_baseline or self.compare_with) and not self.run_accuracy:
            raise ValueError("--torch-baseline and --compare-with need the accuracy part (drop --speed-only)")
        for path in self.compare_with:
            resolve_source(path)
