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
from onnx.external_data_helper import load_external_data_for_model

from sherry_export.onnx_ops import IR_VERSION, SHERRY_DOMAIN, SHERRY_OPSET_VERSION

MS_DOMAIN = "com.microsoft"
DECODER_OPSET = 23
"""Opset 23 brings the standard RMSNormalization, so every default-domain node passes onnx.checker."""
EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Models whose initializers pass 1 GiB keep them in ``<model>.data``: protobuf caps a file at 2 GiB."""
SPILL_MIN_BYTES = 1024
"""Initializers at least this big stream to the external-data file as they are made."""
SPILL_ALIGNMENT = 64
"""Offsets in the external-data file are multiples of this, so weights can be read in place, aligned."""


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs, and makes a checked ModelProto.

    With ``external_data`` (a path), every initializer of at least ``SPILL_MIN_BYTES`` goes to that
    file the moment it is added and the graph keeps only a reference: a multi-GB model is then never
    held in memory twice (as weights and again as protobuf), so a float32 export of a 1B model fits in
    16 GB. ``save_model`` takes it from there (and inlines small models).
    """

    def __init__(self, name: str, external_data: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self.external_data = Path(external_data) if external_data is not None else None
        if self.external_data is not None:
            self.external_data.parent.mkdir(parents=True, exist_ok=True)
            self.external_data.write_bytes(b"")  # a fresh file: never append to an older export's weights
        self.metadata: dict[str, str] = {}
        """Key-value pairs for the model's ``metadata_props`` (what a runner needs to know of the graph)."""

    def _keep(self, tensor: onnx.TensorProto) -> None:
        """Add ``tensor``, moving its bytes to the external-data file when it is big enough."""
        if self.external_data is not None and len(tensor.raw_data) >= SPILL_MIN_BYTES:
            with open(self.external_data, "ab") as f:
                offset = f.tell()
                padding = -offset % SPILL_ALIGNMENT
                f.write(b"\0" * padding)
                f.write(tensor.raw_data)
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.external_data.name), ("offset", offset + padding), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)

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
        self._keep(tensor)
        return tensor.name

    def add_initializers(self, tensors: list[onnx.TensorProto]) -> None:
        for tensor in tensors:
            self._names.add(tensor.name)
            self._keep(tensor)

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
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="sherry-export")
        helper.set_model_props(model, self.metadata)
        return model


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


def external_data_path(model_path: str | os.PathLike[str]) -> Path:
    """Where ``save_model`` keeps the weights of a big model: ``<model file name>.data`` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """Save ``model``; big ones get their weights in ``<name>.data`` beside it. Returns the files written.

    A model from a ``GraphBuilder(external_data=external_data_path(path))`` already has its weights
    there: it is saved as it is when they pass ``EXTERNAL_DATA_THRESHOLD``, and inlined otherwise.
    """
    path = Path(path)
    data = external_data_path(path)
    spilled = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if spilled:
        locations = {e.value for t in spilled for e in t.external_data if e.key == "location"}
        if locations != {data.name}:
            raise ValueError(f"the model's weights are in {sorted(locations)}, but saving to {path} needs {data.name}")
        if sum(stored_bytes(t) for t in spilled) > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(model, path)
            return [path, data]
        load_external_data_for_model(model, os.fspath(path.parent))
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
