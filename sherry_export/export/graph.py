"""ONNX graphs built with onnx-ir, and saved with their weights in external data when large.

The LLM exporter builds its decoder graph directly, as onnxruntime-genai's model builder does,
rather than tracing PyTorch: that gives a lean graph of onnxruntime's fused ops with the packed
weights as initializers.

Initializers are onnx-ir tensors over the exporter's own arrays (no copy: a float table is the torch
model's memory) or lazy tensors made only when written. ``save_model`` writes them one by one, so a
multi-GB model is never held twice (as weights and again as protobuf), which is what kept a float32
export of a 1B model from fitting in 16 GB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from sherry_export.onnx_ops import IR_VERSION, SHERRY_DOMAIN, SHERRY_OPSET_VERSION

MS_DOMAIN = "com.microsoft"
DECODER_OPSET = 23
"""Opset 23 brings the standard RMSNormalization, so every default-domain node passes onnx.checker."""
EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Models whose initializers pass 1 GiB keep them in ``<model>.data``: protobuf caps a file at 2 GiB."""
EXTERNAL_MIN_BYTES = 1024
"""In a model with external data, initializers at least this big go to ``<model>.data``; smaller ones stay inline."""
EXTERNAL_ALIGNMENT = 4096
"""Offsets in the external-data file are multiples of this, so weights can be read in place, aligned (64 bytes
would do for that; onnx-ir aligns to whole pages, 4096 bytes, at the least)."""

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32

Shape = Sequence[int | str] | None
"""A value's shape: sizes, or names for dimensions fixed only at run time; None when unknown."""


class GraphBuilder:
    """Adds nodes, initializers, inputs and outputs to one ``ir.Graph``, and makes the ``ir.Model``.

    onnx-ir keeps the graph: it names the nodes and values left unnamed, and refuses two initializers
    of one name. This adds the exporter's shorthand: initializers from numpy arrays, integer constants,
    attributes as keyword arguments.
    """

    def __init__(self, name: str) -> None:
        opsets = {"": DECODER_OPSET, MS_DOMAIN: 1, SHERRY_DOMAIN: SHERRY_OPSET_VERSION}
        self.graph = ir.Graph([], [], nodes=[], name=name, opset_imports=opsets)
        self.metadata: dict[str, str] = {}
        """Key-value pairs for the model's ``metadata_props`` (what a runner needs to know of the graph)."""

    def initializer(self, name: str, values: np.ndarray | ir.TensorProtocol) -> ir.Value:
        """An initializer holding ``values``: an array, kept as it is (not copied when contiguous), or an
        onnx-ir tensor such as an ``ir.LazyTensor`` that makes its array only when the model is saved."""
        tensor = ir.tensor(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else values
        value = ir.val(name, const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def constant(self, name: str, values: list[int], dtype: type = np.int64) -> ir.Value:
        return self.initializer(name, np.array(values, dtype))

    def node(
        self,
        op: str,
        inputs: Sequence[ir.Value | None],
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        name: str | None = None,
        **attrs: object,
    ) -> Sequence[ir.Value]:
        """Add a node; ``None`` is an omitted input. ``outputs`` is a count (onnx-ir names them) or the outputs'
        names, ``""`` for an omitted one."""
        named = None if isinstance(outputs, int) else [ir.Value(name=n) for n in outputs]
        node = ir.node(
            op,
            inputs,
            attrs,  # type: ignore[arg-type]
            domain=domain,
            num_outputs=outputs if named is None else None,
            outputs=named,
            graph=self.graph,
            name=name,
        )
        return node.outputs

    def op(
        self, op: str, *inputs: ir.Value | None, domain: str = "", name: str | None = None, **attrs: object
    ) -> ir.Value:
        """A single-output node; returns its output."""
        return self.node(op, inputs, 1, domain=domain, name=name, **attrs)[0]

    def add_input(self, name: str, dtype: ir.DataType, shape: Shape) -> ir.Value:
        value = ir.val(name, dtype, shape)
        self.graph.inputs.append(value)
        return value

    def add_output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: Shape) -> None:
        """Make ``value`` a graph output called ``name``."""
        value.name = name
        value.dtype = dtype
        value.shape = None if shape is None else ir.Shape(shape)
        self.graph.outputs.append(value)

    def model(self) -> ir.Model:
        return ir.Model(
            self.graph, ir_version=IR_VERSION, producer_name="sherry-export", metadata_props=dict(self.metadata)
        )


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, in the file or in external data (read from the model loaded with
    ``load_external_data=False``, so sizing a multi-GB model does not load its weights)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return int(next(e.value for e in tensor.external_data if e.key == "length"))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def external_data_path(model_path: str | os.PathLike[str]) -> Path:
    """Where ``save_model`` keeps the weights of a big model: ``<model file name>.data`` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def save_model(model: ir.Model, path: str | os.PathLike[str]) -> list[Path]:
    """Save ``model``; when its initializers pass ``EXTERNAL_DATA_THRESHOLD`` they go to ``<name>.data`` beside
    it, else the file holds them. Returns the files written.

    onnx-ir writes the external data one initializer at a time (a lazy one is made, written and let go),
    and only the graph and the small initializers become protobuf.
    """
    path = Path(path)
    data = external_data_path(path)
    data.unlink(missing_ok=True)  # an older export's weights must not stay beside an inlined model
    if sum(v.const_value.nbytes for v in model.graph.initializers.values()) > EXTERNAL_DATA_THRESHOLD:
        ir.save(
            model,
            path,
            external_data=data.name,
            size_threshold_bytes=EXTERNAL_MIN_BYTES - 1,  # onnx-ir moves those strictly larger
            alignment=EXTERNAL_ALIGNMENT,
            align_threshold=0,
        )
        return [path, data]
    ir.save(model, path)
    return [path]
