"""sherry_export.diagnostics: the gradient effective rank and the pattern-flip rates behind --diagnostics."""

import math

import numpy as np
import pytest
import torch
from test_train import byte_streams, tiny_config

from sherry_export.diagnostics import PatternTracker, effective_rank, gradient_effective_ranks
from sherry_export.models import tiny_llama
from sherry_export.qat import ArenasConfig, SherryConfig, TernaryConfig, arenas_schedule, qat_linears, quantize_
from sherry_export.train import train


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4, 4)) == 0.0
    p = np.array([3.0, 1.0]) / 4.0  # singular values 3 and 1
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def sherry_model(lambda_max: float = 0.5):
    model = tiny_llama(0)
    quantize_(model, SherryConfig(group_size=32, arenas=ArenasConfig(lambda_max, warmup_ratio=0.25)))
    return model


def test_gradient_ranks_leave_the_model_as_they_found_it():
    model = sherry_model()
    schedule = arenas_schedule(model)
    schedule.start(8)
    schedule.step = 2  # λ = 0.5 at the end of the warm-up
    ids = torch.from_numpy(byte_streams()["heldout"][:64].astype(np.int64)).view(2, 32)
    ranks = gradient_effective_ranks(model, ids)
    assert len(ranks) == model.config.num_hidden_layers and all(0 < r <= 1 for r in ranks)
    assert not model.training and schedule.step == 2
    assert all(p.grad is None for p in model.parameters())
    without = gradient_effective_ranks(model, ids, lambda_zero=True)
    assert without != ranks  # the residual path changes the gradient
    schedule.step = 0
    assert gradient_effective_ranks(model, ids) == without


@pytest.mark.parametrize("config, span, zero_unit", [(SherryConfig(group_size=32), 4, 4), (TernaryConfig(), None, 1)])
def test_pattern_flips_count_moved_zeros(config, span, zero_unit):
    """Swap the smallest and the largest |weight| of a Sherry block (or a ternary row): the scales stay the
    same and the zero moves, so one block (Sherry) or two weights (ternary) flip, and two values change."""
    model = tiny_llama(0)
    quantize_(model, config)
    tracker = PatternTracker(model)
    assert tracker.update() is None
    assert tracker.update() == {"zero_flip_rate": 0.0, "value_flip_rate": 0.0}
    layers = qat_linears(model)
    weight = next(iter(layers.values())).weight
    with torch.no_grad():
        part = weight[0, :span]
        small, large = int(part.abs().argmin()), int(part.abs().argmax())
        part[[small, large]] = part[[large, small]].clone()
    flips = tracker.update()
    weights = sum(layer.weight.numel() for layer in layers.values())
    zero_flips = 1 if zero_unit == 4 else 2
    assert flips["zero_flip_rate"] == pytest.approx(zero_flips / (weights / zero_unit))
    assert flips["value_flip_rate"] == pytest.approx(2 / weights)


def test_training_logs_diagnostics_at_every_evaluation(tmp_path):
    model = sherry_model()
    cfg = tiny_config(tmp_path, steps=12, eval_every=6, eval_batches=1, diagnostics=True, save_every=100)
    history = train(cfg, model, byte_streams()).state.log_history
    logged = [entry for entry in history if "grad_erank" in entry]
    assert [entry["step"] for entry in logged] == [0, 6, 12]
    assert "zero_flip_rate" not in logged[0] and all(0 <= e["zero_flip_rate"] <= 1 for e in logged[1:])
    assert any(e["zero_flip_rate"] > 0 for e in logged[1:])  # lr 3e-3 moves some zeros
    # λ > 0 at step 6 (warm-up 3 steps, cosine to 0 at 12): measured both ways; λ = 0 at the end
    assert "grad_erank_lambda0" in logged[1] and "grad_erank_lambda0" not in logged[2]
    assert {f"grad_erank_layer{i}" for i in range(model.config.num_hidden_layers)} <= logged[1].keys()
