"""Shared argument checks, so every entry point words the same problem the same way, and the error
type for unusable input.

This module imports nothing heavy at the top (torch only inside the tensor check): the command line
parses its flags with these checks before it loads any model.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class InputError(ValueError):
    """A file, flag or environment variable that cannot be used: the message names it and says what to do.

    Raised where third-party loaders (onnxruntime, safetensors, transformers, json) fail on the user's
    input, with their text kept, so ``sherry`` prints one line instead of a traceback. A subclass of
    ValueError, so callers that catch bad values keep working.
    """


def one_line(error: BaseException | str) -> str:
    """An error's text on one line (third-party messages wrap, and the command line prints one line)."""
    return " ".join(str(error).split())


def check_weight_matrix(weight: torch.Tensor, what: str = "weight", finite: bool = True) -> None:
    """Reject anything that is not a finite, floating-point, 2-D ``[N, K]`` tensor.

    ``finite=False`` skips the NaN/Inf scan: it waits for the values, which breaks ``torch.compile``
    graphs in the QAT forward pass (where a NaN shows in the loss anyway).
    """
    import torch

    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [N, K] (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(weight.shape)}")
    if finite and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s); fix the checkpoint before quantizing")


def check_group_size(group_size: int | None, k: int, multiple_of: int = 1) -> int:
    """Resolve ``group_size`` (``None`` means one group per row) and check it against ``K``."""
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be an int or None, got {group_size!r}")
    group_size = int(group_size)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if group_size % multiple_of:
        raise ValueError(f"group_size must be a multiple of {multiple_of}, got {group_size}")
    if group_size > k:
        raise ValueError(f"group_size {group_size} exceeds K={k}; pass group_size=K (or None) for one scale per row")
    return group_size


def num_groups(k: int, group_size: int) -> int:
    """Scale groups per row: the last one is short when ``group_size`` does not divide ``K``."""
    return -(-k // group_size)


THREADS_PER_CPU = 4
"""``--threads`` may oversubscribe the CPUs this many times over; past that onnxruntime spends minutes (and
gigabytes) creating threads that only wait for a core."""


def max_threads() -> int:
    """The most intra-op threads any entry point accepts: ``THREADS_PER_CPU`` per CPU of this machine."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    """A positive thread count no larger than :func:`max_threads`."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"must be a positive integer, got {threads!r}")
    limit = max_threads()
    if threads > limit:
        raise ValueError(
            f"{threads} is more than {THREADS_PER_CPU} threads per CPU of this machine ({os.cpu_count()} CPUs); "
            f"give at most {limit}"
        )
    return int(threads)


def check_temperature(temperature: float) -> float:
    """A finite sampling temperature ``>= 0`` (0: greedy)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"must be a finite number >= 0 (0 means greedy), got {temperature}")
    return float(temperature)


def check_top_k(top_k: int) -> int:
    """How many most likely tokens sampling keeps: ``>= 0`` (0: all)."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"must be an integer >= 0 (0 keeps every token), got {top_k}")
    return int(top_k)


def check_top_p(top_p: float) -> float:
    """The nucleus mass sampling keeps: in ``(0, 1]`` (1: all)."""
    if not 0 < top_p <= 1:  # also false for NaN
        raise ValueError(f"must lie in (0, 1] (1 keeps every token), got {top_p}")
    return float(top_p)


def check_seed(seed: int) -> int:
    """A sampling seed numpy accepts: an integer ``>= 0``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"must be an integer >= 0, got {seed}")
    return int(seed)


def load_json(path: str | os.PathLike[str], fix: str) -> Any:
    """Parse the JSON file at ``path``; a missing, unreadable or damaged file is an :class:`InputError`
    that names it and says how to ``fix`` it (json's own message names only a line and column)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path} ({error}); {fix}") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}): the file is damaged or truncated; {fix}") from None


def output_folder(path: str | os.PathLike[str], create: bool = True) -> Path:
    """Create the output folder ``path`` (and its parents) or say why it cannot be one.

    ``create=False`` only checks, so a command can refuse a bad ``-o`` before minutes of work.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise InputError(f"the output folder {path} {where}; choose a folder path")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {path}: {error.strerror}; choose another path") from None
    return path
