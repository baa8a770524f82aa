"""ONNX nodes for the ``ai.sherry`` matmul ops, one per format (``formats.FORMATS`` names each op type).

One node multiplies ``A float32 [..., K]`` by a packed weight: inputs ``A``, ``B`` (uint8
``[N, row_bytes]``), ``scales`` (float16 ``[N, G]``) and an optional ``bias`` (float32 ``[N]``),
attributes ``K``, ``N``, ``group_size``, output float32 ``[..., N]``. ``B`` and ``scales`` must be
initializers, because the kernels repack them once when the session is created. The exporter and
the benchmark build their nodes from :func:`matmul_initializers` and :func:`matmul_attributes`;
:func:`matmul_model` wraps one node in a model for tests and microbenchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sherry_export.formats import PackedWeight, get_format

SHERRY_DOMAIN = "ai.sherry"
SHERRY_OPSET_VERSION = 1
ONNX_OPSET = 18
"""The default domain's opset: the op needs none of it, but a model must import one; 18 is what the exporter emits."""
IR_VERSION = 10
"""onnxruntime 1.31 reads IR 10; onnx 1.23 would otherwise stamp a newer one."""


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The opset imports every model with these ops needs: the default domain and ``ai.sherry``."""
    return [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(SHERRY_DOMAIN, SHERRY_OPSET_VERSION)]


def matmul_initializers(packed: PackedWeight, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The initializers a node reads after ``A``, by input: ``B``, ``scales`` and, with a bias, ``bias``.

    Graphs name them ``{node name}.{input}``, so several nodes can share one graph.
    """
    initializers = {"B": np.ascontiguousarray(packed.data), "scales": np.ascontiguousarray(packed.scales)}
    if bias is not None:
        bias = np.asarray(bias, np.float32)
        if bias.shape != (packed.n,):
            raise ValueError(f"bias must have shape ({packed.n},) to match N, got {bias.shape}")
        initializers["bias"] = bias
    return initializers


def matmul_attributes(packed: PackedWeight) -> dict[str, int]:
    """The node's attributes: the weight's geometry."""
    return {"K": packed.k, "N": packed.n, "group_size": packed.group_size}


def matmul_model(
    packed: PackedWeight,
    bias: np.ndarray | None = None,
    leading_dims: Sequence[int | str] = ("M",),
) -> onnx.ModelProto:
    """A one-node model ``Y = A @ W.T (+ bias)`` with ``A`` of shape ``[*leading_dims, K]``.

    ``leading_dims`` are fixed sizes or symbolic names (any size at run time); ``()`` gives a 1-D ``A``.
    """
    name = "sherry_matmul"
    initializers = [
        numpy_helper.from_array(array, f"{name}.{role}") for role, array in matmul_initializers(packed, bias).items()
    ]
    op_type = get_format(packed.format).op_type
    inputs = ["A", *(init.name for init in initializers)]
    node = helper.make_node(op_type, inputs, ["Y"], name=name, domain=SHERRY_DOMAIN, **matmul_attributes(packed))
    leading = list(leading_dims)
    graph = helper.make_graph(
        [node],
        f"{packed.format}_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [*leading, packed.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*leading, packed.n])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=opset_imports(), ir_version=IR_VERSION)
