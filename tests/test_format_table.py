"""The op library's format table (``kFormats`` in custom_ops/src/formats.h) against the Python registry.

Adding a format means one entry in each table; this test is what keeps them one table in two languages.
The library exports ``SherryFormatTable`` for it: the C++ traits as JSON, with ``row_bytes`` and the
geometry rules (``check_geometry``) evaluated on probe shapes, so the functions are compared too, not
only the constants.
"""

from __future__ import annotations

import ctypes
import json
from functools import lru_cache
from typing import Any

import pytest

from sherry_export.formats import ALL_FORMATS, MAX_GROUP_SIZE, WeightFormat
from sherry_export.runtime import get_library_path


@lru_cache(maxsize=1)
def library_table() -> tuple[dict[str, Any], ...]:
    """The C++ table, in kFormats order (the order of the C++ ``Format`` values)."""
    query = ctypes.CDLL(get_library_path()).SherryFormatTable
    query.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    query.restype = ctypes.c_size_t
    size = query(None, 0)
    assert size > 0, "SherryFormatTable returned nothing"
    buffer = ctypes.create_string_buffer(size + 1)
    assert query(buffer, size + 1) == size
    return tuple(json.loads(buffer.value.decode()))


def library_entry(name: str) -> dict[str, Any]:
    return next(entry for entry in library_table() if entry["name"] == name)


def test_same_formats_in_the_same_order() -> None:
    """Index i of ALL_FORMATS (the ternary formats, then the head formats) is the C++ Format value i (the TVM
    build and the kernels pass formats by value)."""
    assert [entry["name"] for entry in library_table()] == list(ALL_FORMATS)


@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_traits_agree(name: str) -> None:
    fmt, entry = ALL_FORMATS[name], library_entry(name)
    for field in ("op_type", "k_multiple", "group_multiple", "lanes_per_code", "max_weight"):
        assert entry[field] == getattr(fmt, field), f"{name}: {field} differs between formats.h and formats.py"


def python_row_bytes(fmt: WeightFormat, k: int, group_size: int) -> int:
    """formats.py's row bytes, or -1 where its geometry rules refuse (K, group_size), as the library reports."""
    try:
        fmt.check_geometry(k, group_size)
    except ValueError:
        return -1
    return fmt.row_bytes(k, group_size)


@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_geometry_rules_and_row_bytes_agree(name: str) -> None:
    """Every probe is accepted by both or refused by both, and accepted ones take the same row bytes."""
    fmt, probes = ALL_FORMATS[name], library_entry(name)["row_bytes"]
    mismatches = [
        (k, gs, cpp, python_row_bytes(fmt, k, gs)) for k, gs, cpp in probes if python_row_bytes(fmt, k, gs) != cpp
    ]
    assert not mismatches, f"{name}: (K, group_size, formats.h, formats.py) differ at {mismatches[:5]}"
    accepted = [cpp for _, _, cpp in probes if cpp >= 0]
    assert accepted and len(accepted) < len(probes), f"{name}: the probes must include accepted and refused shapes"


def test_probes_reach_every_rule() -> None:
    """The probes meet each refusal on its own: K, group_size out of [1, K], each format's int32 group bound (at
    it and just past it), the multiples."""
    probes = {(k, gs) for entry in library_table() for k, gs, _ in entry["row_bytes"]}
    assert any(k <= 0 for k, _ in probes)
    assert any(gs <= 0 < k for k, gs in probes)
    assert any(0 < k < gs <= MAX_GROUP_SIZE for k, gs in probes)
    for fmt in ALL_FORMATS.values():
        assert any(gs == fmt.max_group_size <= k for k, gs in probes), fmt.name
        assert any(fmt.max_group_size < gs <= k for k, gs in probes), fmt.name
    for fmt in ALL_FORMATS.values():
        if fmt.k_multiple > 1:
            assert any(k % fmt.k_multiple and 0 < gs <= min(k, MAX_GROUP_SIZE) for k, gs in probes), fmt.name
        if fmt.group_multiple > 1:
            assert any(
                gs % fmt.group_multiple and k % fmt.k_multiple == 0 and 0 < gs <= min(k, MAX_GROUP_SIZE)
                for k, gs in probes
            ), fmt.name
