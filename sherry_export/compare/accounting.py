"""What an exported decoder stores and what one decode step reads, from its initializers.

The numbers come from the ONNX file itself (loaded without its external data), not from the
format's formula, so they measure what was exported: the packed projection bytes, their scales,
the LM head, and everything else. A decode step reads every weight once, except the gathered
tables (the embedding and the rotary caches), of which it reads one row; that is the numerator of
the achieved-bandwidth figure (``docs/results.md``). The kernels repack weights into private
layouts when a session starts; the accounting counts the file's canonical layout
(``docs/formats.md``), which is what the format costs, not what a kernel chose to read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from sherry_export.export.graph import stored_bytes
from sherry_export.export.llama import LM_HEAD_NODE
from sherry_export.export.llm import MODEL_FILE
from sherry_export.export.sizes import TERNARY_OPS, initializer_parts, matmul_weights

__all__ = ["LM_HEAD_NODE", "TERNARY_OPS", "ModelAccounting", "WeightBytes", "account"]
GATHERED_TABLE_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2), "GroupQueryAttention": (7, 8)}
"""Initializers a node reads one row of per token: the embedding table (float or quantized codes and
scales), the rotary cos/sin caches."""


@dataclass
class WeightBytes:
    """Matmul weights of one kind (the projections, or the LM head): count and stored bytes."""

    weights: int = 0
    code_bytes: int = 0
    scale_bytes: int = 0

    @property
    def code_bits_per_weight(self) -> float:
        return 8 * self.code_bytes / self.weights if self.weights else math.nan

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight including the scales (fp16 in our formats, float32 in MatMulNBits)."""
        return 8 * (self.code_bytes + self.scale_bytes) / self.weights if self.weights else math.nan

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


@dataclass
class ModelAccounting:
    file_bytes: int
    """model.onnx plus its external data file."""
    projections: WeightBytes
    lm_head: WeightBytes
    embedding_bytes: int
    """The embedding table when the LM head does not share it (0 for a tied table: it is the head's)."""
    other_bytes: int
    """Norm weights, biases, rotary caches, shape constants."""
    decode_weight_bytes: int
    """Initializer bytes one decode step reads: all of them, but one row of each gathered table."""
    kv_bytes_per_position: int
    """KV cache bytes a decode step reads per token already in the context (float32 K and V, all layers)."""

    def achieved_gb_per_s(self, seconds_per_token: float) -> float:
        """Weight bytes read per decoded token over the time per token, in GB/s (1e9 bytes)."""
        return self.decode_weight_bytes / seconds_per_token / 1e9

    def step_bytes(self, context: float) -> float:
        """Bytes a decode step reads when it attends over ``context`` positions: every weight it reads
        (``decode_weight_bytes``: the LM head and one embedding row included) and the KV cache."""
        return self.decode_weight_bytes + self.kv_bytes_per_position * context


def _weight_count(node: onnx.NodeProto, dims: dict[str, list[int]]) -> int:
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if "K" in attrs and "N" in attrs:  # ai.sherry ops and MatMulNBits
        return attrs["K"] * attrs["N"]
    return math.prod(dims[node.input[1]])  # MatMul [K, N] or FusedMatMul [N, K]: the float weight


def account(model_dir: str | os.PathLike[str]) -> ModelAccounting:
    """Sizes and per-token reads of the exported decoder in ``model_dir``.

    A table the embedding and the LM head share (a tied embedding) is the head's weight, read whole every
    step; the embedding then stores nothing of its own (``sherry_export.export.sizes``).
    """
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    model = onnx.load(os.fspath(path), load_external_data=False)
    graph = model.graph
    sizes = {t.name: stored_bytes(t) for t in graph.initializer}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    projections, lm_head = WeightBytes(), WeightBytes()
    read_whole: set[str] = set()
    read_rows: set[str] = set()
    for node in graph.node:
        gathered = {node.input[i] for i in GATHERED_TABLE_INPUTS.get(node.op_type, ()) if i < len(node.input)}
        for name in node.input:
            if name in sizes:
                (read_rows if name in gathered else read_whole).add(name)
        weights = matmul_weights(node, sizes)
        if weights:
            target = lm_head if node.name == LM_HEAD_NODE else projections
            target.weights += _weight_count(node, dims)
            target.code_bytes += sizes[weights[0]]
            target.scale_bytes += sum(sizes[name] for name in weights[1:])
    parts = initializer_parts(graph)
    embedding = sum(sizes[name] for name, part in parts.items() if part == "embedding")
    other = sum(sizes[name] for name, part in parts.items() if part == "other")
    decode = sum(sizes[name] for name in read_whole) + sum(
        sizes[name] // dims[name][0] for name in read_rows - read_whole
    )
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    kv_per_position = sum(
        4 * math.prod(d.dim_value for d in i.type.tensor_type.shape.dim if d.HasField("dim_value")) for i in past
    )
    file_bytes = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(MODEL_FILE))
    return ModelAccounting(
        file_bytes=file_bytes,
        projections=projections,
        lm_head=lm_head,
        embedding_bytes=embedding,
        other_bytes=other,
        decode_weight_bytes=decode,
        kv_bytes_per_position=kv_per_position,
    )
