"""A small ONNX graph builder: nodes and initializers by name, value infos, saving with external data.

The LLM exporter builds its decoder graph directly, as onnxruntime-genai's model builder does,
rather than tracing PyTorch: that gives a lean graph of onnxruntime's fused ops with the packed
weights as initializers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sherry_export.onnx_ops import IR_VERSION, SHERRY_DOMAIN, SHERRY_OPSET_VERSION

MS_DOMAIN = "com.microsoft"
DECODER_OPSET = 23
"""Opset 23 brings the standard RMSNormalization, so every default-domain node passes onnx.checker."""
EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Models whose initializers pass 1 GiB keep them in ``<model>.data``: protobuf caps a file at 2 GiB."""


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs, and makes a checked ModelProto."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()

    def unique(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``…: node and tensor names must not collide."""
        candidate, i = name, 1
        while candidate in self._names:
            i += 1
            candidate = f"{name}_{i}"
        self._names.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), self.unique(name))
        self.initializers.append(tensor)
        return tensor.name

    def add_initializers(self, tensors: list[onnx.TensorProto]) -> None:
        for tensor in tensors:
            self._names.add(tensor.name)
        self.initializers.extend(tensors)

    def constant(self, name: str, values: list[int], dtype: type = np.int64) -> str:
        return self.initializer(name, np.array(values, dtype))

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        domain: str = "",
        name: str = "",
        **attrs: object,
    ) -> list[str]:
        """Add a node; ``outputs`` is a count (names made from the node name) or explicit names."""
        node_name = self.unique(name or op)
        if isinstance(outputs, int):
            outputs = [self.unique(f"{node_name}/out{i}") for i in range(outputs)]
        else:
            self._names.update(outputs)
        self.nodes.append(helper.make_node(op, inputs, outputs, name=node_name, domain=domain, **attrs))
        return outputs

    def op(self, op: str, *inputs: str, domain: str = "", name: str = "", **attrs: object) -> str:
        """A single-output node; returns its output name."""
        return self.node(op, list(inputs), 1, domain=domain, name=name, **attrs)[0]

    def add_input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self._names.add(name)
        return name

    def add_output(self, name: str, elem_type: int, shape: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers)
        opsets = [
            helper.make_opsetid("", DECODER_OPSET),
            helper.make_opsetid(MS_DOMAIN, 1),
            helper.make_opsetid(SHERRY_DOMAIN, SHERRY_OPSET_VERSION),
        ]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="sherry-export")


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, in the file or in external data (read from the model loaded with
    ``load_external_data=False``, so sizing a multi-GB model does not load its weights)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return int(next(e.value for e in tensor.external_data if e.key == "length"))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """Save ``model``; big ones get their weights in ``<name>.data`` beside it. Returns the files written."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing external-data file
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        return [path, data]
    onnx.save_model(model, path)
    return [path]


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
