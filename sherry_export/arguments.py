"""argparse pieces every command shares: value types with messages that name the problem, and
commands whose implementation loads only when they run."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import TypeVar

from sherry_export import errors

T = TypeVar("T")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def checked(parse: Callable[[str], T], check: Callable[[T], T]) -> Callable[[str], T]:
    """An argparse ``type``: ``parse`` the text, then ``check`` the value (a shared check of
    :mod:`sherry_export.errors`), so a flag is refused with the same words the library uses."""

    def convert(text: str) -> T:
        try:
            return check(parse(text))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


thread_count = checked(int, errors.check_threads)
"""``--threads``: positive, and at most a few per CPU (100,000 threads took minutes and gigabytes to start)."""


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def group_size_arg(text: str) -> int | None:
    """``--group-size`` accepts a positive multiple of 4, or ``channel`` for one scale per row."""
    if text == "channel":
        return None
    value = positive_int(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (a Sherry block) or 'channel', got {text}")
    return value


class GroupSizeAction(argparse.Action):
    """Stores the group size and remembers that the user gave one (to detect a clash with the checkpoint)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.group_size_given = True


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--group-size`` and ``--qat``: what a source checkpoint is, shared by the commands that export one."""
    from sherry_export.ternary import QAT_METHODS

    parser.add_argument(
        "--group-size",
        type=group_size_arg,
        default=128,
        action=GroupSizeAction,
        help="weights per scale group along K, a multiple of 4, or 'channel'. Post-training projection: the "
        "group to project with (default: 128). Latent weights (--qat): the group they were trained with; when "
        "neither this flag nor the checkpoint says, 128 for sherry (per tensor for ternary) is assumed, with a "
        "note on stderr. A group size the checkpoint records (sherry train, packed, quantization_config) wins, "
        "and a value that contradicts it is an error",
    )
    parser.add_argument(
        "--qat",
        choices=QAT_METHODS,
        help="SOURCE holds the latent float weights of a quantization-aware run with this rule (an AngelSlim "
        "Sherry checkpoint: --qat sherry): every format, fp32 included, carries their ternary projection. "
        "Checkpoints from `sherry train`, packed ones, and configs with quantization_config.quant_method say "
        "so themselves",
    )
    parser.set_defaults(group_size_given=False)


def lazy_command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command handler that imports ``module`` only when the command runs, so building the parser
    (and ``--help``) never loads PyTorch or onnxruntime."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run
