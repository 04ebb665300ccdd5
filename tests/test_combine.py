"""Combining loss terms: alpha schedules (docs/algorithms/pretraining-distillation.md#invariants, items 4 and 6)
and GradMag balancing (docs/algorithms/alm.md#invariants, item 15)."""

from __future__ import annotations

import pytest
import torch

from tokenbridge.losses.combine import combine, gradmag_weights
from tokenbridge.params import DistillParams
from tokenbridge.training.schedules import alpha_at, term_weights

BASE = dict(teacher_mode="offline", steps=101, batch_size=1, learning_rate=1e-3, checkpoint_every=10)


def _params(**overrides) -> DistillParams:
    return DistillParams(**{**BASE, **overrides})


def test_constant_alpha_mixes_next_token_and_distillation_linearly():
    weights = term_weights(_params(alpha=0.3), step=7)
    assert weights == pytest.approx({"alm": 0.3, "sft": 0.7})


def test_alpha_zero_is_the_plain_next_token_loss_and_one_is_pure_distillation():
    assert term_weights(_params(alpha=0.0), 0) == {"sft": 1.0}
    assert term_weights(_params(alpha=1.0), 0) == {"alm": 1.0}
    assert term_weights(_params(loss="sft"), 0) == {"sft": 1.0}
    sft, alm = torch.tensor(2.5, requires_grad=True), torch.tensor(9.0)
    total, _ = combine({"sft": sft, "alm": alm}, term_weights(_params(alpha=0.0), 0), "fixed", [])
    assert total is not None and total.item() == 2.5  # bit-exact: the distillation term is not even added


def test_linear_schedules_reach_their_endpoints():
    increase, decrease = (_params(alpha=0.8, alpha_schedule="linear_increase"),
                          _params(alpha=0.8, alpha_schedule="linear_decrease"))
    assert (alpha_at(0, increase) == 0 and alpha_at(100, increase) == pytest.approx(0.8)
            and alpha_at(50, increase) == pytest.approx(0.4))
    assert alpha_at(0, decrease) == pytest.approx(0.8) and alpha_at(100, decrease) == 0


def test_wsd_alpha_ramps_up_holds_and_decays_to_zero_at_the_last_step():
    params = _params(alpha=0.9, alpha_schedule="wsd", alpha_warmup=0.1, alpha_decay=0.2)
    values = [alpha_at(step, params) for step in range(101)]
    assert values[0] == 0 and values[5] == pytest.approx(0.45)
    assert all(v == pytest.approx(0.9) for v in values[10:81])
    assert values[-1] == 0 and all(a >= b for a, b in zip(values[81:], values[82:]))


def test_loss_weights_scale_each_combined_distillation_loss():
    weights = term_weights(_params(loss=["alm", "uld"], loss_weights={"uld": 0.5}, alpha=0.4), 0)
    assert weights == pytest.approx({"alm": 0.4, "uld": 0.2, "sft": 0.6})


def _two_terms(scale: float = 1.0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    hidden = torch.randn(4, 5)
    out = layer(hidden)
    first = (out ** 2).mean()
    second = scale * (out - 3.0).abs().mean()
    return layer, {"a": first, "b": second}


def test_gradmag_gives_every_term_the_same_last_layer_gradient_norm():
    layer, terms = _two_terms()
    params = [layer.weight, layer.bias]
    weights = gradmag_weights(list(terms.values()), params)
    assert sum(weights) == pytest.approx(1.0)
    norms = []
    for weight, loss in zip(weights, terms.values()):
        grads = torch.autograd.grad(weight * loss, params, retain_graph=True)
        norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_gradmag_update_does_not_change_when_one_loss_is_scaled_by_a_constant():
    """The weights sum to one, so a scaled term changes the gradient's length, never its direction; an Adam
    step, which normalises the length away, is then the same."""
    grads, steps = [], []
    for scale in (1.0, 37.0):
        layer, terms = _two_terms(scale)
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        total, _ = combine(terms, {"a": 1.0, "b": 1.0}, "gradmag", [layer.weight, layer.bias])
        total.backward()
        grads.append(layer.weight.grad.flatten().clone())
        optimizer.step()
        steps.append(layer.weight.detach().clone())
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(steps[0], steps[1])


def test_fixed_combination_depends_on_the_scale_that_gradmag_cancels():
    grads = []
    for scale in (1.0, 37.0):
        layer, terms = _two_terms(scale)
        total, _ = combine(terms, {"a": 1.0, "b": 1.0}, "fixed", [layer.weight])
        total.backward()
        grads.append(layer.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
