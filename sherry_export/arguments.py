"""argparse pieces every command shares: value types with messages that name the problem, options
declared once on a dataclass field (:func:`option`, :func:`add_options`, :func:`from_options`), and
commands whose implementation loads only when they run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


# --- options declared on dataclass fields -----------------------------------------------------------------

OPTION = "sherry_option"
"""The key of a field's metadata that holds its command-line option (what :func:`option` puts there)."""
OPTION_GROUP = "sherry_option_group"
"""The key of a field's metadata that holds the ``--help`` title of a nested dataclass's options."""

D = TypeVar("D")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field that is also a command-line option ``--field-name``: its default, type and help
    are written here once, and :func:`add_options` / :func:`from_options` read them.

    ``help`` may use argparse's ``%(default)s``. The type, action and ``nargs`` follow from the field's
    annotation (see :func:`option_kwargs`); anything given in ``argparse_kwargs`` (``type=positive_int``,
    ``choices=``, ``metavar=``, ``nargs="?"`` with ``const=``, ``flags=("-o", "--output")``) wins.
    ``group`` names the argument group the option is listed under in ``--help``.
    """
    metadata = {OPTION: {"help": help, "group": group, **argparse_kwargs}}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def option_group(cls: type, title: str) -> Any:
    """A dataclass field holding dataclass ``cls`` (made with its defaults) whose :func:`option` fields are
    listed under ``title`` in ``--help``; :func:`from_options` builds it from the same namespace."""
    return dataclasses.field(default_factory=cls, metadata={OPTION_GROUP: title})


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` declared with :func:`option`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if OPTION in f.metadata]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; a wider union with None keeps its other members as they are (no type
    follows from it); anything else → ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def option_kwargs(f: dataclasses.Field, annotation: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The flags and ``add_argument`` keywords of an :func:`option` field whose resolved type is ``annotation``.

    From the annotation: ``bool`` (default False) is a ``store_true`` flag, ``bool | None`` a
    ``--name/--no-name`` pair that leaves None when neither is given; ``tuple[X, ...]`` and ``list[X]``
    take one or more values (``nargs="+"``); ``int``, ``float`` and ``Path`` (optional or not) convert the
    text. Any other type needs an explicit ``type=``. ``flags=(name,)`` with the field's own name makes
    it a positional argument.
    """
    spec = dict(f.metadata[OPTION])
    spec.pop("group", None)
    flags = tuple(spec.pop("flags", ("--" + f.name.replace("_", "-"),)))
    kwargs: dict[str, Any] = {"default": field_default(f), **spec}
    if flags[0].startswith("-"):
        kwargs["dest"] = f.name
    elif flags != (f.name,):
        raise TypeError(f"the positional argument of field {f.name} must be named {f.name!r}, not {flags}")
    inner, optional = _unwrap_optional(annotation)
    if inner is bool and "action" not in kwargs:
        kwargs["action"] = argparse.BooleanOptionalAction if optional else "store_true"
    if typing.get_origin(inner) in (tuple, list):
        kwargs.setdefault("nargs", "+")
        inner = typing.get_args(inner)[0]
        if isinstance(kwargs["default"], tuple):
            kwargs["default"] = list(kwargs["default"])
    if "action" not in kwargs and "type" not in kwargs and inner in (int, float, Path):
        kwargs["type"] = inner
    return flags, kwargs


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> dict[str, Any]:
    """Add the :func:`option` fields of dataclass ``cls`` to ``parser`` (a parser or an argument group),
    in declaration order, those of :func:`option_group` fields included.

    A field with a ``group`` (or inside an :func:`option_group`) goes to the argument group of that title,
    made on ``parser`` the first time the title comes up. Returns the groups by title, so a command can
    list options of its own beside them.
    """
    groups: dict[str, Any] = {}

    def add(target: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if OPTION_GROUP in f.metadata:
                add(group(f.metadata[OPTION_GROUP]), hints[f.name])
            elif OPTION in f.metadata:
                title = f.metadata[OPTION].get("group")
                flags, kwargs = option_kwargs(f, hints[f.name])
                (target if title is None else group(title)).add_argument(*flags, **kwargs)

    def group(title: str) -> argparse._ArgumentGroup:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    add(parser, cls)
    return groups


def from_options(cls: type[D], namespace: argparse.Namespace, **values: Any) -> D:
    """Build ``cls`` from the parsed :func:`option` fields in ``namespace`` (lists become tuples where the
    field is a tuple) and its :func:`option_group` fields likewise, plus ``values`` for the fields the
    command line does not set."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if OPTION_GROUP in f.metadata:
            values[f.name] = from_options(hints[f.name], namespace)
        elif OPTION in f.metadata:
            value = getattr(namespace, f.name)
            if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[f.name])[0]) is tuple:
                value = tuple(value)
            values[f.name] = value
    return cls(**values)
