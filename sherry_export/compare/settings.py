"""What ``sherry compare`` can be asked to do: its settings, validated, without the machinery.

Light on purpose: the command line builds its parser from these defaults without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
"""The zero-shot tasks (``tasks.py``)."""
DEMO_LIMIT = 25
"""Documents per zero-shot task in ``sherry demo``."""
DEMO_PPL_TOKENS = 6000
"""Scored tokens per held-out corpus in ``sherry demo``."""


@dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 128
    decode_steps: int = 64
    repetitions: int = 3
    """Timed repetitions; the profiled pass comes on top."""
    profile_steps: int = 16
    bandwidth_bytes: float = 2.0**30
    """Bytes the bandwidth probe reads per pass (``sherry_export.bandwidth``): well above the caches."""
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
    tasks: tuple[str, ...] = TASKS
    limit: int | None = None
    """Documents per task (a fixed seeded subset); None for all."""
    ppl_tokens: int | None = None
    """Scored tokens per corpus; None for the whole held-out split."""
    window: int = 512
    stride: int | None = None
    """Tokens between window ends, less than the window; default half the window."""
    ppl_text: Path | None = None
    """A text file to take held-out text from instead of the packaged corpora."""

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
