"""Generic dynamo export of modules with quantized linears, run in onnxruntime with the op library."""

import numpy as np
import onnx
import pytest
import torch

from sherry_export.export.module import pack_module, to_onnx
from sherry_export.qat import SherryLinear, TernaryLinear
from sherry_export.runtime import make_session


class Block(torch.nn.Module):
    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.silu(self.first(x)))


@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
def test_to_onnx_matches_packed_module(fmt):
    torch.manual_seed(0)
    net = Block(SherryLinear(64, 96, group_size=32), SherryLinear(96, 40, bias=False, group_size=32)).eval()
    model = to_onnx(net, (torch.randn(2, 5, 64),), format=fmt)
    nodes = [n for n in model.graph.node if n.domain == "ai.sherry"]
    assert len(nodes) == 2
    initializers = {init.name: init for init in model.graph.initializer}
    packed = [initializers[node.input[1]] for node in nodes]  # inputs: A, packed weights, scales[, bias]
    assert [init.data_type for init in packed] == [onnx.TensorProto.UINT8] * len(nodes)
    session = make_session(model)
    x = torch.randn(3, 7, 64)  # other batch and sequence sizes than at export: the dims are dynamic
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = pack_module(net, fmt)(x).numpy()
        dense = net(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(got - dense).max() < 0.05 * np.abs(dense).max()  # int8 activations vs the float model


def test_dense_ternary_cannot_be_sherry_but_packs_as_i2s():
    net = Block(TernaryLinear(32, 32, group_size=None), TernaryLinear(32, 8, group_size=None)).eval()
    with pytest.raises(ValueError, match="exactly one zero"):
        to_onnx(net, (torch.randn(1, 3, 32),), format="sherry")
    model = to_onnx(net, (torch.randn(1, 3, 32),), format="i2s")
    assert [n.op_type for n in model.graph.node if n.domain == "ai.sherry"] == ["I2SMatMul"] * 2


def test_unquantized_module_is_rejected():
    with pytest.raises(ValueError, match="no quantized linear"):
        to_onnx(torch.nn.Linear(8, 8), (torch.randn(1, 8),))
    with pytest.raises(ValueError, match="generic export supports"):
        to_onnx(Block(SherryLinear(8, 8, group_size=8), SherryLinear(8, 8, group_size=8)), (torch.randn(1, 8),),
                format="nbits2")
