"""Diffusion-KTO and MaPO losses (sdpo.kto_mapo) in float64 against hand computations, and their presets."""

import math

import pytest
import torch

from sdpo.kto_mapo import kto_loss, mapo_loss, mapo_score
from sdpo.objectives import PRESETS, MethodConfig

f64 = torch.float64


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_matches_a_hand_computation():
    model = torch.tensor([0.30, 0.50, 0.20, 0.40], dtype=f64)
    ref = torch.tensor([0.31, 0.48, 0.26, 0.40], dtype=f64)
    desirable = torch.tensor([True, False, True, False])
    beta, ld, lu = 100.0, 1.0, 2.0
    # r = ref - model = [0.01, -0.02, 0.06, 0.0]; mean 0.0125 > 0, so z_ref = 0.0125.
    r = [0.01, -0.02, 0.06, 0.0]
    z = sum(r) / 4
    signs, weights = [1, -1, 1, -1], [ld, lu, ld, lu]
    expected = sum(w * (1 - _sigmoid(s * beta * (ri - z))) for ri, s, w in zip(r, signs, weights, strict=True)) / 4
    out = kto_loss(model, ref, desirable, beta, ld, lu)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(0.0125, abs=1e-15)
    torch.testing.assert_close(out.logits, torch.tensor([s * beta * (ri - z) for ri, s in zip(r, signs, strict=True)],
                                                        dtype=f64))


def test_kto_reference_point_is_clamped_at_zero():
    model = torch.tensor([0.5, 0.6], dtype=f64)
    ref = torch.tensor([0.4, 0.5], dtype=f64)  # the policy is worse on both: mean gap -0.1 -> z_ref 0
    out = kto_loss(model, ref, torch.tensor([True, False]), 10.0)
    assert out.metrics["kl"].item() == 0.0
    expected = ((1 - _sigmoid(10 * -0.1)) + (1 - _sigmoid(-10 * -0.1))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_kto_at_the_reference_is_half_of_the_weights():
    model = torch.rand(6, dtype=f64) + 0.1
    desirable = torch.tensor([True, True, False, False, False, True])
    out = kto_loss(model, model.clone(), desirable, 1000.0, 1.0, 3.0)
    assert out.loss.item() == pytest.approx((3 * 0.5 * 1.0 + 3 * 0.5 * 3.0) / 6, abs=1e-12)


def test_kto_gradient_lowers_desirable_and_raises_undesirable_errors():
    model = torch.tensor([0.30, 0.50, 0.20, 0.40], dtype=f64, requires_grad=True)
    ref = torch.tensor([0.30, 0.52, 0.22, 0.41], dtype=f64)
    desirable = torch.tensor([True, False, True, False])
    kto_loss(model, ref, desirable, 50.0).loss.backward()
    grad = model.grad
    assert (grad[desirable] > 0).all()  # descending lowers a desirable sample's error
    assert (grad[~desirable] < 0).all()  # and raises an undesirable one's
    # z_ref is detached: the gradient is exactly the per-sample one, (lambda/B) v (1 - v) beta * sign.
    r = ref - model.detach()
    z = r.mean().clamp_min(0)
    sign = torch.where(desirable, 1.0, -1.0).to(f64)
    v = torch.sigmoid(sign * 50.0 * (r - z))
    torch.testing.assert_close(grad, v * (1 - v) * 50.0 * sign / 4)


def test_kto_rejects_bad_input():
    x = torch.ones(3, dtype=f64)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(x, x, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(x, x[:2], torch.ones(3, dtype=torch.bool), 1.0)


def test_mapo_score_is_the_bounded_link():
    err = torch.tensor([0.0, 1e-12, 0.1, 1.0, 4.0], dtype=f64)
    expected = [1.0, 1.0, 0.05 / math.expm1(0.05), 0.5 / math.expm1(0.5), 2.0 / math.expm1(2.0)]
    torch.testing.assert_close(mapo_score(err, 0.5), torch.tensor(expected, dtype=f64))


def test_mapo_matches_a_hand_computation():
    ew = torch.tensor([0.10, 0.30], dtype=f64)
    el = torch.tensor([0.20, 0.25], dtype=f64)
    beta, a, scale = 0.1, 0.5, 1000.0

    def score(e):
        return a * e / math.expm1(a * e)

    margins = [scale * (score(win) - score(lose)) for win, lose in zip([0.10, 0.30], [0.20, 0.25], strict=True)]
    margin_term = -sum(math.log(_sigmoid(m)) for m in margins) / 2
    expected = (0.10 + 0.30) / 2 + beta * margin_term
    out = mapo_loss(ew, el, beta, a, scale)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["accuracy"].item() == 0.5  # the first pair is ranked right, the second wrong
    torch.testing.assert_close(out.logits, torch.tensor(margins, dtype=f64))


def test_mapo_gradient_lowers_the_winner_and_raises_the_loser():
    ew = torch.tensor([0.20, 0.40], dtype=f64, requires_grad=True)
    el = torch.tensor([0.21, 0.35], dtype=f64, requires_grad=True)
    mapo_loss(ew, el, 1.0).loss.backward()
    assert (ew.grad > 0).all() and (el.grad < 0).all()
    # d/d el of -log sigmoid(m)/B: -(1 - sigmoid(m)) * T * (-s'(el)) / B, with s'(e) from the closed form.
    a, scale = 0.5, 1000.0
    for i in range(2):
        x = a * el[i].item()
        ds = a * (math.expm1(x) - x * math.exp(x)) / math.expm1(x) ** 2
        m = scale * (a * ew[i].item() / math.expm1(a * ew[i].item()) - x / math.expm1(x))
        assert el.grad[i].item() == pytest.approx((1 - _sigmoid(m)) * scale * ds / 2, rel=1e-9)


def test_presets_carry_the_papers_defaults():
    kto, mapo = PRESETS["kto"], PRESETS["mapo"]
    assert (kto.beta, kto.kto_desirable_weight, kto.kto_undesirable_weight) == (1000.0, 1.0, 1.0)
    assert (mapo.beta, mapo.mapo_snr, mapo.mapo_margin_scale) == (0.1, 0.5, None)
    assert not kto.use_weights and not mapo.use_weights
    assert kto.unpaired and kto.needs_reference and not mapo.needs_reference and not mapo.unpaired
    assert MethodConfig.preset("kto", kto_undesirable_weight=1.5).kto_undesirable_weight == 1.5


@pytest.mark.parametrize("settings, match", [
    ({"use_weights": True}, "own loss"), ({"sft_weight": 1.0}, "own loss"), ({"safeguard": True}, "own loss"),
    ({"kto_desirable_weight": -1.0}, "kto_desirable_weight"), ({"mapo_snr": 0.0}, "mapo_snr"),
    ({"mapo_margin_scale": float("inf")}, "mapo_margin_scale"),
])
def test_invalid_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig.preset("kto", **settings)


def test_mapo_refuses_the_relative_estimator():
    with pytest.raises(ValueError, match="relative"):
        MethodConfig.preset("mapo", estimator="relative")
