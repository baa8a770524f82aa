"""Which part of an exported decoder each stored byte belongs to: the projections, the embedding, the
LM head, or the rest. ``sherry export`` prints this split and records it in ``sherry_export.json``;
``sherry compare`` builds its accounting on the same classification.
"""

from __future__ import annotations

from collections.abc import Container

import onnx

from sherry_export.export.graph import stored_bytes
from sherry_export.export.llama import EMBED_NODE, LM_HEAD_NODE
from sherry_export.formats import ALL_FORMATS

TERNARY_OPS = frozenset(f.op_type for f in ALL_FORMATS.values())
"""Our ops (the ternary formats' and the int8 head's): matmuls on a packed weight and its scales."""
PARTS = ("projections", "embedding", "lm_head", "other")


def matmul_weights(node: onnx.NodeProto, initializers: Container[str]) -> tuple[str, ...]:
    """The stored weight a matmul node multiplies by: its codes and scales (ternary ops, MatMulNBits) or its
    float weight (``MatMul``/``FusedMatMul`` on an initializer); ``()`` for any other node."""
    if node.op_type in TERNARY_OPS or node.op_type == "MatMulNBits":
        return (node.input[1], node.input[2])
    if node.op_type in ("MatMul", "FusedMatMul") and len(node.input) > 1 and node.input[1] in initializers:
        return (node.input[1],)
    return ()


def is_embedding_node(node: onnx.NodeProto) -> bool:
    return node.name == EMBED_NODE or node.name.startswith(f"{EMBED_NODE}.")


def initializer_parts(graph: onnx.GraphProto) -> dict[str, str]:
    """The part (one of ``PARTS``) of every initializer, each counted once.

    A matmul's weight (codes and scales) belongs to the LM head or the projections; the tables the
    embedding lookup reads (float, or quantized codes and scales), to the embedding; the rest (norms,
    biases, rotary caches, shape constants) to other. A tied table that the embedding and the LM head
    share counts as the LM head's: the head reads all of it every step, the lookup one row per token.
    """
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    parts: dict[str, str] = {}
    for node in graph.node:
        for name in matmul_weights(node, ranks):
            parts[name] = "lm_head" if node.name == LM_HEAD_NODE else "projections"
    for node in filter(is_embedding_node, graph.node):
        for name in node.input:
            if ranks.get(name, 0) >= 2:  # a table, not a shape constant
                parts.setdefault(name, "embedding")
    return {name: parts.get(name, "other") for name in ranks}


def size_split(model: onnx.ModelProto) -> dict[str, int]:
    """Stored bytes per part (``PARTS``); they sum to all the initializer bytes. Works on a model loaded
    with ``load_external_data=False``, without reading the weights."""
    sizes = {t.name: stored_bytes(t) for t in model.graph.initializer}
    split = dict.fromkeys(PARTS, 0)
    for name, part in initializer_parts(model.graph).items():
        split[part] += sizes[name]
    return split


SPLIT_LABELS = {"projections": "projections", "embedding": "embedding", "lm_head": "LM head", "other": "other"}


def split_rows(split: dict[str, int]) -> list[list[object]]:
    """Rows ``[part, MB, share]`` of a size split for the export summary. An embedding with no bytes of its
    own is a tied table, stored once as the LM head's."""
    total = sum(split.values()) or 1
    rows: list[list[object]] = []
    for part in PARTS:
        label = SPLIT_LABELS[part]
        if part == "embedding" and split[part] == 0:
            label += " (tied: reads the LM head's table)"
        rows.append([label, split[part] / 1e6, f"{split[part] / total:.1%}"])
    return rows
