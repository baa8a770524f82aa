"""Options declared once on dataclass fields: the parser they make and the dataclass built back from it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from sherry_export.arguments import add_options, from_options, option, option_fields, option_group, positive_int
from sherry_export.compare.settings import AccuracySettings, CompareConfig, SpeedSettings
from sherry_export.train_config import TrainConfig


@dataclass(frozen=True)
class Inner:
    depth: int = option(3, type=positive_int, help="how deep (default: %(default)s)")
    note: str = "not an option"


@dataclass(frozen=True)
class Example:
    source: str = option(flags=("source",), help="what to read")
    output: Path = option(flags=("-o", "--output"), required=True, help="where to write")
    count: int = option(2, help="how many")
    ratio: float | None = option(None, group="tuning", help="a share")
    fast: bool = option(False, group="tuning", help="go fast")
    arenas: bool | None = option(None, help="on, off, or the method's default")
    names: tuple[str, ...] = option(("a", "b"), choices=("a", "b", "c"), help="names")
    sizes: tuple[int, ...] = option((1, 2), help="sizes")
    resume: str | None = option(None, nargs="?", const="last", help="a checkpoint, or alone: the latest")
    inner: Inner = option_group(Inner, "inner")
    hidden: int = 7


def parser_for(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_options(parser, cls)
    return parser


def test_defaults_come_from_the_fields():
    args = parser_for(Example).parse_args(["src", "-o", "out"])
    built = from_options(Example, args)
    assert built == Example(source="src", output=Path("out"))
    assert isinstance(built.output, Path) and built.names == ("a", "b") and built.inner == Inner()


def test_values_are_converted_by_the_annotation():
    argv = ["s", "--output", "o", "--count", "5", "--ratio", "0.5", "--fast", "--no-arenas"]
    argv += ["--names", "c", "a", "--sizes", "4", "8", "--resume", "--depth", "9"]
    built = from_options(Example, parser_for(Example).parse_args(argv))
    assert (built.count, built.ratio, built.fast, built.arenas) == (5, 0.5, True, False)
    assert built.names == ("c", "a") and built.sizes == (4, 8)  # lists back to the tuples the fields hold
    assert built.resume == "last" and built.inner == Inner(depth=9)
    assert from_options(Example, parser_for(Example).parse_args(["s", "-o", "o", "--arenas"])).arenas is True


def test_values_given_directly_win_and_other_fields_keep_their_defaults():
    args = parser_for(Example).parse_args(["s", "-o", "o", "--count", "5"])
    built = from_options(Example, args, count=1, hidden=3)
    assert built.count == 1 and built.hidden == 3 and built.inner.note == "not an option"


@pytest.mark.parametrize(
    "argv",
    [["s"], ["s", "-o", "o", "--names", "z"], ["s", "-o", "o", "--depth", "0"], ["s", "-o", "o", "--count", "x"]],
)
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser_for(Example).parse_args(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_groups_and_help():
    parser = parser_for(Example)
    titles = [group.title for group in parser._action_groups]
    assert titles[-2:] == ["tuning", "inner"]
    text = parser.format_help()
    assert "how deep (default: 3)" in text and "--hidden" not in text and "--note" not in text


def test_a_positional_must_carry_the_field_name():
    @dataclass
    class Wrong:
        source: str = option(flags=("src",), help="x")

    with pytest.raises(TypeError, match="must be named 'source'"):
        parser_for(Wrong)


@pytest.mark.parametrize(
    ("command", "argv", "classes"),
    [
        (TrainConfig, [], [TrainConfig]),
        (CompareConfig, ["smollm2", "-o", "out"], [CompareConfig, SpeedSettings, AccuracySettings]),
    ],
)
def test_every_option_default_is_the_field_default(command, argv, classes):
    """What a command runs with when no flag is given is what its dataclasses say, field by field."""
    args = parser_for(command).parse_args(argv)
    for cls in classes:
        for f in option_fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue  # required
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = getattr(args, f.name)
            assert (tuple(value) if isinstance(value, list) else value) == default, f.name
