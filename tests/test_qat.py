"""sherry_export.qat: the projection in the forward, STE + Arenas gradients, the λ schedule, quantize_."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sherry_export.models import tiny_llama
from sherry_export.qat import (
    ArenasConfig,
    ArenasSchedule,
    ProjectedLinear,
    PTQConfig,
    SherryConfig,
    SherryLinear,
    TernaryConfig,
    TernaryLinear,
    arenas_schedule,
    config_from_recipe,
    qat_linears,
    quantize_,
    recipe,
    requantize_from_config,
    ternary_layers,
)
from sherry_export.quant import absmean_ternarize, dequantize_ternary, quantizable_linears, sherry_ternarize


def linear(n: int, k: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def fixed_lambda(lam: float) -> ArenasSchedule:
    """A started schedule sitting at its peak, so λ is exactly ``lam``."""
    schedule = ArenasSchedule(ArenasConfig(lambda_max=lam, warmup_ratio=0.5))
    schedule.start(10)
    schedule.step = 5
    assert schedule.value == lam
    return schedule


@given(
    st.integers(1, 5),
    st.integers(1, 10),
    st.sampled_from([4, 8, 12, 32, None]),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_sherry_forward_is_the_projection(n, blocks, gs, seed, bias):
    """Eval forward = x·dequant(sherry_ternarize(W))ᵀ + b exactly, short last groups and per-channel included."""
    k = 4 * blocks
    gs = None if gs is None else min(gs, k)
    module = SherryLinear.from_linear(linear(n, k, seed, bias), gs).eval()
    x = torch.randn(3, k)
    expected = F.linear(x, dequantize_ternary(sherry_ternarize(module.weight, gs), gs), module.bias)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    values, scales = module.ternary()
    ref_values, ref_scales = sherry_ternarize(module.weight, gs)
    assert torch.equal(values, ref_values) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("gs", [None, 8])
def test_ternary_forward_is_absmean(gs):
    module = TernaryLinear.from_linear(linear(6, 24, 0), gs).eval()
    x = torch.randn(4, 24)
    expected = F.linear(x, dequantize_ternary(absmean_ternarize(module.weight, gs), gs), module.bias)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    assert torch.equal(module.ternary().values, absmean_ternarize(module.weight, gs).values)


@pytest.mark.parametrize("cls", [SherryLinear, TernaryLinear])
@pytest.mark.parametrize("lam", [0.0, 0.37])
def test_ste_and_arenas_gradients(cls, lam):
    """With g = ∂L/∂y fixed and Wₑ = Q(W) + λW: ∂L/∂W = (1+λ)·gᵀx, ∂L/∂x = g·Wₑ, ∂L/∂b = Σg.

    gᵀx is the gradient a dense layer with weight Wₑ gets; the STE passes it through Q unchanged (no
    mask on the pruned weights, scale constant) and the residual adds λ times it.
    """
    module = cls.from_linear(linear(8, 32, 1), 16, fixed_lambda(lam) if lam else None).train()
    x = torch.randn(5, 32, requires_grad=True)
    g = torch.randn(5, 8)
    (module(x) * g).sum().backward()

    q = dequantize_ternary(module.ternary(), 16)
    dense = nn.Linear(32, 8)
    with torch.no_grad():
        dense.weight.copy_(q + lam * module.weight if lam else q)
        dense.bias.copy_(module.bias)
    x_ref = x.detach().clone().requires_grad_()
    (dense(x_ref) * g).sum().backward()
    grad_dense = dense.weight.grad

    torch.testing.assert_close(module.weight.grad, grad_dense + lam * grad_dense, rtol=0, atol=0)
    torch.testing.assert_close(module.weight.grad, (1 + lam) * (g.T @ x.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, g @ q + lam * g @ module.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.bias.grad, g.sum(0), rtol=0, atol=0)
    # the pruned weights (Sherry's zeros) get the same gradient as every other weight: a plain STE
    assert bool((module.weight.grad != 0).all())


def test_arenas_forward_is_two_paths_and_off_in_eval():
    """Training output = x·Q(W)ᵀ + λ·x·Wᵀ + b (AngelSlim's two matmuls); eval output has no residual."""
    module = SherryLinear.from_linear(linear(8, 32, 2), 16, fixed_lambda(0.6))
    x = torch.randn(4, 32)
    q = dequantize_ternary(module.ternary(), 16)
    with torch.no_grad():
        two_paths = x @ q.T + 0.6 * (x @ module.weight.T) + module.bias
        torch.testing.assert_close(module.train()(x), two_paths, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.eval()(x), F.linear(x, q, module.bias), rtol=0, atol=0)


def expected_lambda(k: int, total: int, warmup: int, lam_max: float) -> float:
    if k <= 0 or k >= total:
        return 0.0
    if k <= warmup:
        return lam_max * k / warmup
    return lam_max * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize(
    ("total", "ratio", "lam_max"), [(100, 0.1, 1.0), (37, 0.3, 0.5), (10, 0.0, 2.0), (1, 0.0, 1.0)]
)
def test_lambda_schedule_formula(total, ratio, lam_max):
    schedule = ArenasSchedule(ArenasConfig(lam_max, ratio))
    assert schedule.value == 0.0  # not started: no residual
    schedule.start(total)
    warmup = round(ratio * total)
    assert schedule.warmup_steps == warmup
    values = [schedule.at(k) for k in range(total + 2)]
    assert values == pytest.approx([expected_lambda(k, total, warmup, lam_max) for k in range(total + 2)], abs=1e-12)
    assert values[0] == 0.0 and values[total] == 0.0 and values[total + 1] == 0.0
    if warmup:
        assert values[warmup] == pytest.approx(lam_max)
        assert values[: warmup + 1] == sorted(values[: warmup + 1])
    assert values[warmup + 1 :] == sorted(values[warmup + 1 :], reverse=True)
    schedule.step = max(warmup, 1)
    assert schedule.value == schedule.at(max(warmup, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lambda_max=-1.0), "lambda_max"),
        (dict(lambda_max=float("nan")), "lambda_max"),
        (dict(warmup_ratio=1.0), "warmup_ratio"),
        (dict(warmup_ratio=-0.1), "warmup_ratio"),
    ],
)
def test_bad_arenas_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArenasConfig(**kwargs)


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(ValueError, match="no decay"):
        ArenasSchedule(ArenasConfig(warmup_ratio=0.9)).start(2)
    with pytest.raises(ValueError, match="at least one"):
        ArenasSchedule(ArenasConfig()).start(0)


def test_quantize_swaps_only_the_projections():
    model = tiny_llama()
    before = {name: module.weight for name, module in quantizable_linears(model).items()}
    keys = list(model.state_dict())
    quantize_(model, SherryConfig(group_size=32, arenas=ArenasConfig(0.5, 0.2)))
    swapped = qat_linears(model)
    assert set(swapped) == set(before) and len(swapped) == 7 * 2
    assert all(type(m) is SherryLinear and m.group_size == 32 for m in swapped.values())
    assert all(swapped[name].weight is weight for name, weight in before.items())  # same Parameters, no copy
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert list(model.state_dict()) == keys  # checkpoints keep the plain model's names
    schedules = {id(m.arenas) for m in swapped.values()}
    assert len(schedules) == 1 and arenas_schedule(model) is next(iter(swapped.values())).arenas
    assert model.config.sherry_qat == {
        "method": "sherry",
        "group_size": 32,
        "arenas": {"lambda_max": 0.5, "warmup_ratio": 0.2},
    }
    clone = copy.deepcopy(model)  # one shared schedule survives copying
    assert len({id(m.arenas) for m in qat_linears(clone).values()}) == 1
    with pytest.raises(ValueError, match="only once"):
        quantize_(model, SherryConfig(group_size=32))


def test_quantized_model_outputs_and_export():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    quantize_(model, TernaryConfig())
    with torch.no_grad():
        quantized = model(ids).logits
    assert not torch.allclose(dense, quantized)
    layers = ternary_layers(model)
    assert set(layers) == set(quantizable_linears(tiny_llama()))
    weight = model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert torch.equal(layers["model.layers.0.mlp.down_proj"].values, absmean_ternarize(weight).values)
    assert arenas_schedule(model) is None


@pytest.mark.parametrize(
    ("config", "rule"), [(PTQConfig("sherry", 32), sherry_ternarize), (PTQConfig("absmean", None), absmean_ternarize)]
)
def test_post_training_projection_is_quantize_with_a_ptq_config(config, rule):
    """quantize_ with a PTQConfig swaps the same projections for modules computing with, and handing on,
    the projection of their own float weight (shared, not copied), and records the recipe."""
    model = tiny_llama()
    before = {name: module.weight for name, module in quantizable_linears(model).items()}
    keys = list(model.state_dict())
    quantize_(model, config)
    swapped = quantizable_linears(model)
    assert {name: type(m) for name, m in swapped.items()} == dict.fromkeys(before, ProjectedLinear)
    assert not qat_linears(model)
    assert all(swapped[name].weight is weight for name, weight in before.items())
    assert list(model.state_dict()) == keys
    assert model.config.sherry_ptq == {"projection": config.projection, "group_size": config.group_size}
    for name, module in swapped.items():
        expected, got = rule(before[name], config.group_size), module.ternary()
        assert torch.equal(got.values, expected.values) and torch.equal(got.scales, expected.scales)
    down = swapped["model.layers.1.mlp.down_proj"]
    x = torch.randn(3, down.in_features)
    weight = dequantize_ternary(rule(down.weight, config.group_size), config.group_size or down.in_features)
    torch.testing.assert_close(down(x), F.linear(x, weight), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already ternary"):
        quantize_(model, SherryConfig())
    reloaded = tiny_llama()  # a checkpoint of it: latent float weights and the record
    reloaded.config.sherry_ptq = model.config.sherry_ptq
    assert requantize_from_config(reloaded) == config
    reloaded_types = {name: type(m) for name, m in quantizable_linears(reloaded).items()}
    assert reloaded_types == dict.fromkeys(before, ProjectedLinear)


def test_bad_post_training_configs():
    with pytest.raises(ValueError, match="unknown projection 'ternary'"):
        PTQConfig("ternary")
    model = tiny_llama()
    with pytest.raises(ValueError, match="multiple of 4"):
        quantize_(model, PTQConfig("sherry", 6))
    quantize_(model, PTQConfig("absmean", 6))  # dense ternary takes any group size
    assert model.config.sherry_ptq["group_size"] == 6


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SherryConfig(group_size=256), r"model\.layers\.0\.self_attn\.q_proj: group_size 256 exceeds K=64"),
        (SherryConfig(group_size=6), "multiple of 4"),
        (TernaryConfig(group_size=0), "positive"),
        ("sherry", "SherryConfig, TernaryConfig or PTQConfig"),
    ],
)
def test_bad_quantize_requests(config, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quantize_(model, config)
    assert not qat_linears(model)  # nothing swapped when any layer is refused


def test_sherry_needs_k_divisible_by_4():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(10, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        quantize_(model, SherryConfig(group_size=None))
    with pytest.raises(ValueError, match="no q/k/v/o"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), SherryConfig())


def test_recipe_round_trip():
    for config in (SherryConfig(64, ArenasConfig(0.3, 0.05)), SherryConfig(None), TernaryConfig(16)):
        assert config_from_recipe(recipe(config)) == config
    with pytest.raises(ValueError, match="unreadable"):
        config_from_recipe({"method": "fp4"})
    model = tiny_llama()
    model.config.sherry_qat = recipe(SherryConfig(32))
    assert requantize_from_config(model) == SherryConfig(32)
    assert len(qat_linears(model)) == 14


def test_bf16_latent_weights():
    """A bf16 model projects in float32 and feeds the matmul in its own dtype."""
    module = SherryLinear.from_linear(linear(8, 32, 3).to(torch.bfloat16), 16).train()
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    y = module(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and module.weight.grad.dtype == torch.bfloat16
