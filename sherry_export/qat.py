"""The quantize stage: ``quantize_(model, config)`` makes a model's projections ternary, for training
or after it. Sherry (3:4-sparse ternary) and BitNet b1.58 (dense ternary) linears.

``quantize_`` swaps every attention/MLP projection of a Llama-family model
(:func:`sherry_export.quant.quantizable_linears`) for a module that keeps the full-precision weight
and computes with its ternary projection Q(W); ``module.ternary()`` is what packing and export take.
Embeddings, norms and the LM head stay full precision, as in AngelSlim. One verb, three small configs:

- ``SherryConfig`` / ``TernaryConfig``: quantization-aware training. The QAT linear's forward uses Q(W)
  with a straight-through estimator, so the latent weight learns. Recorded in ``config.sherry_qat``.
- ``PTQConfig``: post-training projection of float weights (``sherry`` 3:4 or ``absmean``), no
  training. Recorded in ``config.sherry_ptq``, so ``sherry export`` and ``sherry pack`` say
  "post-training projection". The exporter projects float layers through the same modules
  (:func:`quantized_linear`).

The swapped modules subclass ``nn.Linear``, keep the parameter names ``weight``/``bias`` and share the
original parameters (no copy), so a quantized model's state dict is the plain model's: checkpoints hold
latent weights, load into an ordinary ``LlamaForCausalLM``, and the recorded recipe re-applies the
projection (:func:`requantize_from_config`).

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
from typing import Any, TypeVar

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
from sherry_export.ternary import CONFIG_KEY, PROJECTION_NAMES, PTQ_KEY, QAT_METHODS

PROJECTIONS: dict[str, Callable[..., Ternary]] = dict(
    zip(PROJECTION_NAMES, (sherry_ternarize, absmean_ternarize), strict=True)
)
"""The ternary projections by name: post-training (``PTQConfig.projection``, ``--projection``) and
inside the QAT linears (``sherry`` for Sherry, ``absmean`` for dense ternary)."""


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


L = TypeVar("L", bound="ProjectedLinear")


class ProjectedLinear(nn.Linear):
    """A linear layer that computes with the ternary projection of its float weight: y = x·Q(W)ᵀ + b.

    Post-training (:class:`PTQConfig`) it is the quantized layer itself; the QAT linears add a
    straight-through estimator and Arenas. It projects when asked (``ternary()``, ``forward``) rather
    than storing Q(W), so wrapping a float layer costs no memory: the exporter projects a float model
    layer by layer through it, as it always did.
    """

    projection: str
    """How W becomes ternary: a key of :data:`PROJECTIONS` (a class attribute of the QAT linears)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        projection: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if projection is not None:
            self.projection = projection
        if getattr(self, "projection", None) not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
        self.quantizer: Callable[..., Ternary] = PROJECTIONS[self.projection]
        """The projection, from :mod:`sherry_export.quant`."""
        self.group_size = group_size

    @classmethod
    def wrap(cls: type[L], linear: nn.Linear, group_size: int | None, **kwargs: Any) -> L:
        """A ``cls`` holding ``linear``'s own parameters (no copy), so optimizers and tied references stay valid."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            device="meta",
            **kwargs,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        return module

    def ternary(self) -> Ternary:
        """The ternary values and scales this layer packs and exports (its projection of the weight)."""
        return self.quantizer(self.weight, self.group_size)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Q(W) de-quantized, in the weight's dtype (no gradient: the QAT linears' STE supplies one)."""
        ternary = self.quantizer(weight, self.group_size, check_finite=False)
        return dequantize_ternary(ternary, self.group_size).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.project(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projection={self.projection}, group_size={self.group_size}"


class QATLinear(ProjectedLinear):
    """Common part of the ternary QAT linears: latent weight, STE projection, optional Arenas.

    ``y = x·(Q(W) + λ·W)ᵀ + b``: one matmul computes Arenas' ``x·Q(W)ᵀ + λ·x·Wᵀ``. With the STE,
    ∂L/∂W = (1 + λ)·∂L/∂Wₑ and ∂L/∂x = ∂L/∂y·(Q(W) + λ·W), where Wₑ is the effective weight and
    ∂L/∂Wₑ = ∂L/∂yᵀ·x is the gradient a dense layer would get. λ is 0 in eval mode.
    """

    method: str
    """Name recorded in ``config.sherry_qat`` (a key of :data:`CONFIGS`)."""

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
        super().__init__(in_features, out_features, bias=bias, group_size=group_size, device=device, dtype=dtype)
        self.arenas = arenas

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None, arenas: ArenasSchedule | None = None) -> QATLinear:
        """Wrap ``linear``'s own parameters (no copy), so optimizers and tied references stay valid."""
        return cls.wrap(linear, group_size, arenas=arenas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _StraightThrough.apply(self.weight, self.project)
        lam = self.arenas.value if self.training and self.arenas is not None else 0.0
        if lam:
            weight = weight + lam * self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, arenas={self.arenas is not None}"


class SherryLinear(QATLinear):
    """Sherry's 3:4-sparse ternary linear (:func:`sherry_export.quant.sherry_ternarize`), 128 per group
    by default; ``group_size=None`` is one scale per output channel."""

    method = "sherry"
    projection = "sherry"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int | None = 128, **kw: Any):
        super().__init__(in_features, out_features, bias=bias, group_size=group_size, **kw)


class TernaryLinear(QATLinear):
    """BitNet b1.58's dense ternary linear (:func:`sherry_export.quant.absmean_ternarize`): one absmean
    scale per tensor by default (``group_size=None``), or per group of ``group_size`` along K."""

    method = "ternary"
    projection = "absmean"


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


@dataclass(frozen=True)
class PTQConfig:
    """``quantize_`` recipe for post-training projection: every projection computes with, packs and
    exports the ternary projection of its float weight, with no training. ``projection``: ``sherry``
    (3:4, the only one ``--format sherry`` can hold) or ``absmean`` (BitNet's dense rule);
    ``group_size=None`` is one scale per row for ``sherry`` and per tensor for ``absmean``.

    Without quantization-aware training this destroys a pretrained LLM: it is for sizes, speed and
    baselines, and the exports of such a model say "post-training projection".
    """

    projection: str = "sherry"
    group_size: int | None = 128

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTIONS)}")


QuantizeConfig = QATConfig | PTQConfig


def _projection(config: QuantizeConfig) -> str:
    return config.projection if isinstance(config, PTQConfig) else config.module_class.projection


def _check_layer(name: str, linear: nn.Linear, config: QuantizeConfig) -> None:
    """Fail before anything is swapped when a layer cannot take the projection."""
    if hasattr(linear, "ternary"):
        raise ValueError(f"{name} is already ternary (a {type(linear).__name__}); quantize_ a model only once")
    k = linear.in_features
    sherry = _projection(config) == "sherry"
    if sherry and k % SHERRY_BLOCK:
        raise ValueError(f"{name}: Sherry needs in_features divisible by {SHERRY_BLOCK}, got {k}")
    try:
        check_group_size(config.group_size, k, multiple_of=SHERRY_BLOCK if sherry else 1)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def quantized_linear(
    linear: nn.Linear, config: QuantizeConfig, schedule: ArenasSchedule | None = None
) -> ProjectedLinear:
    """The module :func:`quantize_` puts in place of ``linear``, sharing its parameters. The exporter
    calls it on the float layers of an unquantized model, one at a time, so a post-training export is
    this same projection without changing the caller's model."""
    if isinstance(config, PTQConfig):
        return ProjectedLinear.wrap(linear, config.group_size, projection=config.projection)
    return config.module_class.from_linear(linear, config.group_size, schedule)


def quantize_(model: nn.Module, config: QuantizeConfig) -> None:
    """Swap, in place, the q/k/v/o/gate/up/down projections of ``model`` for ternary linears.

    QAT configs give QAT linears; every swapped module shares one :class:`ArenasSchedule` when
    ``config.arenas`` is set (find it with :func:`arenas_schedule`). :class:`PTQConfig` gives
    :class:`ProjectedLinear`. The recipe is recorded in ``model.config`` (``sherry_qat`` or
    ``sherry_ptq``) when the model has a config, so a saved checkpoint says how to rebuild it
    (:func:`requantize_from_config`) and a packed one how its weights were made.
    """
    if not isinstance(config, SherryConfig | TernaryConfig | PTQConfig):
        raise ValueError(f"config must be a SherryConfig, TernaryConfig or PTQConfig, got {type(config).__name__}")
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no q/k/v/o/gate/up/down projections to quantize")
    for name, linear in linears.items():
        _check_layer(name, linear, config)
    arenas = None if isinstance(config, PTQConfig) else config.arenas
    schedule = ArenasSchedule(arenas) if arenas is not None else None
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantized_linear(linear, config, schedule))
    if hasattr(model, "config"):
        if isinstance(config, PTQConfig):
            setattr(model.config, PTQ_KEY, asdict(config))
        else:
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


def ptq_from_record(record: dict[str, Any]) -> PTQConfig:
    """The :class:`PTQConfig` a ``sherry_ptq`` record (or a packed folder's ``projected_with``) names."""
    try:
        return PTQConfig(**record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"unreadable {PTQ_KEY} record {record!r}: {error}") from error


def requantize_from_config(model: nn.Module) -> QuantizeConfig | None:
    """Re-apply the recipe a loaded checkpoint's config records (QAT, or a post-training projection);
    ``None`` when it records none."""
    config = getattr(model, "config", None)
    qat, ptq = getattr(config, CONFIG_KEY, None), getattr(config, PTQ_KEY, None)
    if qat is None and ptq is None:
        return None
    recorded = config_from_recipe(qat) if qat is not None else ptq_from_record(ptq)
    quantize_(model, recorded)
    return recorded


def load_qat_model(source: str | Path) -> tuple[nn.Module, QuantizeConfig | None]:
    """Load a checkpoint saved by ``sherry train`` (or any model) with its recorded recipe re-applied."""
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
