"""Quantization-aware training: Sherry (3:4-sparse ternary) and BitNet b1.58 (dense ternary) linears.

``quantize_(model, SherryConfig(...))`` swaps every attention/MLP projection of a Llama-family model
(:func:`sherry_export.quant.quantizable_linears`) for a QAT linear that keeps the latent
full-precision weight and, in its forward, uses the projected ternary weight Q(W) with a
straight-through estimator. Embeddings, norms and the LM head stay full precision, as in AngelSlim.

The swapped modules subclass ``nn.Linear`` and keep the parameter names ``weight``/``bias``, so a
QAT model's state dict is the plain model's: checkpoints hold latent weights, load into an ordinary
``LlamaForCausalLM``, and export re-runs the projection (``module.ternary()``).

Arenas (Sherry's annealing residual synapse) adds ``λ·x·Wᵀ`` to the output during training. λ
follows one :class:`ArenasSchedule` shared by every module of the model and counted in optimizer
steps, which the trainer sets (:class:`sherry_export.train.ArenasCallback`); AngelSlim instead keeps
a counter per module that ticks on every forward call, eval and gradient accumulation included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sherry_export.errors import check_group_size
from sherry_export.quant import (
    SHERRY_BLOCK,
    Ternary,
    absmean_ternarize,
    dequantize_ternary,
    quantizable_linears,
    sherry_ternarize,
)
from sherry_export.ternary import QAT_METHODS

CONFIG_KEY = "sherry_qat"
"""Attribute of ``model.config`` (so also a key of a saved ``config.json``) recording the QAT recipe."""


@dataclass(frozen=True)
class ArenasConfig:
    """Arenas' λ schedule: linear warm-up 0 → ``lambda_max`` over ``warmup_ratio`` of the optimizer
    steps, then a cosine decay to 0 at the last step. AngelSlim's hard-coded values are 1.0 and 0.1."""

    lambda_max: float = 1.0
    warmup_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lambda_max) and self.lambda_max >= 0):
            raise ValueError(f"lambda_max must be a finite number >= 0, got {self.lambda_max}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(
                f"warmup_ratio must be in [0, 1) (the cosine decay needs steps after the warm-up), "
                f"got {self.warmup_ratio}"
            )


class ArenasSchedule:
    """The one λ state of a model, shared by all its QAT linears.

    Optimizer steps are numbered 1…T. With W = round(warmup_ratio·T) warm-up steps,
    λ(k) = λ_max·k/W for k ≤ W and λ(k) = λ_max·½(1 + cos(π·(k − W)/(T − W))) for W < k ≤ T, so the last
    step trains with λ = 0 and the final model needs no residual. Before :meth:`start` (or at step 0)
    λ is 0. The trainer sets :attr:`step` to the optimizer step about to run, so every micro-batch of a
    gradient-accumulation cycle sees the same λ, and a resumed run continues where it left off.
    """

    def __init__(self, config: ArenasConfig) -> None:
        self.config = config
        self.total_steps = 0
        self.warmup_steps = 0
        self.step = 0

    def start(self, total_steps: int) -> None:
        """Fix the length of training (T optimizer steps); the warm-up is ``round(warmup_ratio·T)`` of them."""
        if total_steps < 1:
            raise ValueError(f"Arenas needs at least one optimizer step, got total_steps={total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = round(self.config.warmup_ratio * total_steps)
        if self.warmup_steps >= total_steps:
            raise ValueError(
                f"Arenas warm-up of {self.warmup_steps} steps leaves no decay in {total_steps} steps; "
                "lower warmup_ratio or train longer"
            )

    def at(self, step: int) -> float:
        """λ during optimizer step ``step`` (1-based)."""
        if step <= 0 or step >= self.total_steps:
            return 0.0
        lam, warm = self.config.lambda_max, self.warmup_steps
        if step <= warm:
            return lam * step / warm
        return lam * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (self.total_steps - warm)))

    @property
    def value(self) -> float:
        """λ now."""
        return self.at(self.step)


class _StraightThrough(torch.autograd.Function):
    """Forward: the projected weight Q(W). Backward: the gradient passes to W unchanged (the scale and
    the sparsity mask are treated as constants), AngelSlim's STE; one node, no ``W + (Q − W).detach()``
    temporaries."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return project(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class QATLinear(nn.Linear):
    """Common part of the ternary QAT linears: latent weight, STE projection, optional Arenas.

    ``y = x·(Q(W) + λ·W)ᵀ + b``: one matmul computes Arenas' ``x·Q(W)ᵀ + λ·x·Wᵀ``. With the STE,
    ∂L/∂W = (1 + λ)·∂L/∂Wₑ and ∂L/∂x = ∂L/∂y·(Q(W) + λ·W), where Wₑ is the effective weight and
    ∂L/∂Wₑ = ∂L/∂yᵀ·x is the gradient a dense layer would get. λ is 0 in eval mode.
    """

    method: str
    """Name recorded in ``config.sherry_qat`` (a key of :data:`CONFIGS`)."""
    quantizer: Callable[..., Ternary]
    """The projection, from :mod:`sherry_export.quant`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        arenas: ArenasSchedule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group_size = group_size
        self.arenas = arenas

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None, arenas: ArenasSchedule | None = None) -> QATLinear:
        """Wrap ``linear``'s own parameters (no copy), so optimizers and tied references stay valid."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            arenas=arenas,
            device="meta",
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        return module

    def ternary(self) -> Ternary:
        """The ternary values and scales this layer exports (its projection of the latent weight)."""
        return self.quantizer(self.weight, self.group_size)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Q(W) de-quantized, in the weight's dtype (no gradient: the STE supplies it)."""
        ternary = self.quantizer(weight, self.group_size, check_finite=False)
        return dequantize_ternary(ternary, self.group_size).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _StraightThrough.apply(self.weight, self.project)
        lam = self.arenas.value if self.training and self.arenas is not None else 0.0
        if lam:
            weight = weight + lam * self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, arenas={self.arenas is not None}"


class SherryLinear(QATLinear):
    """Sherry's 3:4-sparse ternary linear (:func:`sherry_export.quant.sherry_ternarize`), 128 per group
    by default; ``group_size=None`` is one scale per output channel."""

    method = "sherry"
    quantizer = staticmethod(sherry_ternarize)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int | None = 128, **kw: Any):
        super().__init__(in_features, out_features, bias=bias, group_size=group_size, **kw)


class TernaryLinear(QATLinear):
    """BitNet b1.58's dense ternary linear (:func:`sherry_export.quant.absmean_ternarize`): one absmean
    scale per tensor by default (``group_size=None``), or per group of ``group_size`` along K."""

    method = "ternary"
    quantizer = staticmethod(absmean_ternarize)


@dataclass(frozen=True)
class SherryConfig:
    """``quantize_`` recipe for Sherry QAT. Arenas is off unless given (the paper trains with it)."""

    group_size: int | None = 128
    arenas: ArenasConfig | None = None
    module_class = SherryLinear


@dataclass(frozen=True)
class TernaryConfig:
    """``quantize_`` recipe for the dense-ternary (BitNet b1.58) baseline; per tensor by default."""

    group_size: int | None = None
    arenas: ArenasConfig | None = None
    module_class = TernaryLinear


QATConfig = SherryConfig | TernaryConfig
CONFIGS: dict[str, type[SherryConfig] | type[TernaryConfig]] = dict(
    zip(QAT_METHODS, (SherryConfig, TernaryConfig), strict=True)
)


def _check_layer(name: str, linear: nn.Linear, config: QATConfig) -> None:
    """Fail before anything is swapped when a layer cannot take the projection."""
    if isinstance(linear, QATLinear):
        raise ValueError(f"{name} is already a {type(linear).__name__}; quantize_ a model only once")
    k = linear.in_features
    sherry = isinstance(config, SherryConfig)
    if sherry and k % SHERRY_BLOCK:
        raise ValueError(f"{name}: Sherry needs in_features divisible by {SHERRY_BLOCK}, got {k}")
    try:
        check_group_size(config.group_size, k, multiple_of=SHERRY_BLOCK if sherry else 1)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def quantize_(model: nn.Module, config: QATConfig) -> None:
    """Swap, in place, the q/k/v/o/gate/up/down projections of ``model`` for QAT linears.

    Every swapped module shares one :class:`ArenasSchedule` when ``config.arenas`` is set (find it with
    :func:`arenas_schedule`). The recipe is recorded in ``model.config.sherry_qat`` when the model has a
    config, so a saved checkpoint says how to rebuild it (:func:`requantize_from_config`).
    """
    if not isinstance(config, SherryConfig | TernaryConfig):
        raise ValueError(f"config must be a SherryConfig or TernaryConfig, got {type(config).__name__}")
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no q/k/v/o/gate/up/down projections to quantize")
    for name, linear in linears.items():
        _check_layer(name, linear, config)
    schedule = ArenasSchedule(config.arenas) if config.arenas is not None else None
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, config.module_class.from_linear(linear, config.group_size, schedule))
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, recipe(config))


def recipe(config: QATConfig) -> dict[str, Any]:
    """A JSON-able record of ``config`` (what ``config.json`` stores under ``sherry_qat``)."""
    fields = asdict(config)
    return {"method": config.module_class.method, **fields}


def config_from_recipe(record: dict[str, Any]) -> QATConfig:
    """Inverse of :func:`recipe`, with a clear error for a record this version cannot read."""
    try:
        fields = dict(record)
        cls = CONFIGS[fields.pop("method")]
        arenas = fields.pop("arenas", None)
        return cls(arenas=ArenasConfig(**arenas) if arenas is not None else None, **fields)
    except (KeyError, TypeError) as error:
        raise ValueError(f"unreadable {CONFIG_KEY} record {record!r}: {error}") from error


def requantize_from_config(model: nn.Module) -> QATConfig | None:
    """Re-apply the QAT recipe a loaded checkpoint's config records; ``None`` when it has none."""
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if record is None:
        return None
    config = config_from_recipe(record)
    quantize_(model, config)
    return config


def load_qat_model(source: str | Path) -> tuple[nn.Module, QATConfig | None]:
    """Load a checkpoint saved by ``sherry train`` (or any model) with its recorded QAT recipe re-applied."""
    from sherry_export.models import load_causal_lm

    model, _ = load_causal_lm(source)
    return model, requantize_from_config(model)


def qat_linears(model: nn.Module) -> dict[str, QATLinear]:
    """The QAT linears of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QATLinear)}


def arenas_schedule(model: nn.Module) -> ArenasSchedule | None:
    """The model's shared Arenas schedule, or ``None`` when it trains without Arenas."""
    schedules = {id(m.arenas): m.arenas for m in qat_linears(model).values() if m.arenas is not None}
    if len(schedules) > 1:
        raise ValueError(f"the model's QAT linears hold {len(schedules)} Arenas schedules; expected one shared")
    return next(iter(schedules.values()), None)


def ternary_layers(model: nn.Module) -> dict[str, Ternary]:
    """The final ternary (values, scales) of every QAT linear, for packing and export."""
    return {name: module.ternary() for name, module in qat_linears(model).items()}
