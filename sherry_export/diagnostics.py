"""Training diagnostics behind ``sherry train --diagnostics``: the two symptoms Arenas is meant to cure.

The Sherry paper argues that projecting a pretrained model onto the 3:4 ternary grid (a) collapses the
rank of the gradient that flows back through the network, so few directions of the activations get
a learning signal, and (b) traps weights: their 3:4 pattern stops changing because the straight-through
gradient rarely moves a weight past its block's smallest one. Arenas' residual λ·x·Wᵀ restores a dense
path for the gradient while λ > 0. These metrics let anyone check both on their own model:

* **gradient effective rank**: for every decoder layer, the effective rank (Roy & Vetterli: the
  exponential of the entropy of the normalised singular values) of ∂L/∂X, the loss gradient with
  respect to the layer's input hidden states over a fixed held-out batch, divided by the hidden size
  (1 = every direction gets signal). Measured with the weights as they are (no update), once with the
  training λ and, when λ > 0, once more with λ = 0.
* **pattern flips**: the fraction of 3:4 blocks whose zero position changed since the previous
  measurement (Sherry layers) or of weights whose zero/non-zero state changed (dense ternary), and the
  fraction of weights whose ternary value changed at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from sherry_export.qat import QATLinear, arenas_schedule, qat_linears
from sherry_export.ternary import SHERRY_BLOCK


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of a 2-D matrix: exp(entropy of σ / Σσ); 0 for a zero matrix."""
    sigma = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers; diagnostics need a Llama-family decoder")
    return layers


@contextmanager
def _captured_layer_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects each decoder layer's input hidden states (in layer order) while the context is open."""
    inputs: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def gradient_effective_ranks(model: torch.nn.Module, input_ids: torch.Tensor, lambda_zero: bool = False) -> list[float]:
    """Normalised effective rank of ∂L/∂X at every decoder layer's input, for one batch of token ids.

    The model runs in training mode, so QAT linears add their Arenas residual at the schedule's current
    λ, or at λ = 0 with ``lambda_zero``. The gradient goes to the hidden states only
    (``torch.autograd.grad``), so parameters' ``.grad`` and the optimizer are untouched; the model's
    mode and the schedule's step are restored afterwards.
    """
    schedule = arenas_schedule(model)
    was_training, saved_step = model.training, schedule.step if schedule is not None else 0
    model.train()
    try:
        if schedule is not None and lambda_zero:
            schedule.step = 0  # the schedule's λ is 0 before the first step
        with torch.enable_grad(), _captured_layer_inputs(model) as inputs:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            grads = torch.autograd.grad(loss, inputs)
    finally:
        model.train(was_training)
        if schedule is not None:
            schedule.step = saved_step
    hidden = grads[0].shape[-1]
    return [effective_rank(g.reshape(-1, hidden)) / min(hidden, g.numel() // hidden) for g in grads]


def zero_state(layer: QATLinear, values: torch.Tensor) -> torch.Tensor:
    """What a 'pattern flip' compares: a Sherry block's zero position, else each weight's zero mask."""
    if layer.method == "sherry":
        n, k = values.shape
        return (values.view(n, k // SHERRY_BLOCK, SHERRY_BLOCK) == 0).to(torch.int8).argmax(dim=-1).to(torch.int8)
    return (values == 0).to(torch.int8)


class PatternTracker:
    """Remembers every QAT linear's ternary values and zero pattern, and reports how many changed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = qat_linears(model)
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            current = {}
            for name, layer in self.layers.items():
                values = layer.ternary().values
                current[name] = (values, zero_state(layer, values))
            return current

    def update(self) -> dict[str, float] | None:
        """Flip rates since the previous call (``None`` on the first call, which only takes the snapshot)."""
        current = self.snapshot()
        previous, self.previous = self.previous, current
        if not previous:
            return None
        value_flips = value_count = zero_flips = zero_count = 0
        for name, (values, zeros) in current.items():
            old_values, old_zeros = previous[name]
            value_flips += int((values != old_values).sum())
            value_count += values.numel()
            zero_flips += int((zeros != old_zeros).sum())
            zero_count += zeros.numel()
        return {"zero_flip_rate": zero_flips / zero_count, "value_flip_rate": value_flips / value_count}


class DiagnosticsCallback(TrainerCallback):
    """Logs the gradient effective rank and the pattern-flip rates after every evaluation (and at step 0).

    Entries go to ``state.log_history`` (so ``log_history.json`` of the run keeps them) with the step,
    the mean over layers and one value per layer.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
        self.model, self.input_ids = model, input_ids
        self.patterns = PatternTracker(model)

    def measure(self, step: int) -> dict[str, float]:
        entry: dict[str, float] = {"step": step}
        flips = self.patterns.update()
        if flips is not None:
            entry.update(flips)
        schedule = arenas_schedule(self.model)
        variants = [False] if schedule is None or schedule.value == 0.0 else [False, True]
        for lambda_zero in variants:
            ranks = gradient_effective_ranks(self.model, self.input_ids, lambda_zero)
            key = "grad_erank_lambda0" if lambda_zero else "grad_erank"
            entry[key] = sum(ranks) / len(ranks)
            entry.update({f"{key}_layer{i}": rank for i, rank in enumerate(ranks)})
        return entry

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            entry = self.measure(0)
            state.log_history.append(entry)
            print(f"diagnostics {_summary(entry)}")
        else:
            self.patterns.update()  # resumed: flips count from here

    def on_evaluate(self, args, state, control, **kwargs):
        entry = self.measure(state.global_step)
        state.log_history.append(entry)
        print(f"diagnostics {_summary(entry)}")


def _summary(entry: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in entry.items() if "_layer" not in key)
