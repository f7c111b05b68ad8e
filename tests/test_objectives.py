"""The preference objective and weight transforms (docs/concepts/method.md sections 4 and 5), in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdpo.objectives import (
    MethodConfig,
    clip_weights,
    mask_weights,
    normalize_weights,
    preference_loss,
    safeguard_scale,
)


def _errors(seed=0, n=8, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.rand(n, generator=g, dtype=torch.float64) + 0.1).requires_grad_(requires_grad)  # noqa: E731
    return make(), make(), make().detach(), make().detach()


def test_matches_hand_written_diffusion_dpo():
    mw, ml, rw, rl = _errors()
    beta = 5000.0
    out = preference_loss(mw, ml, rw, rl, beta)
    inside = -0.5 * beta * ((mw - rw) - (ml - rl))
    torch.testing.assert_close(out.loss, -F.logsigmoid(inside).mean())
    torch.testing.assert_close(out.logits, inside)


def test_unit_weights_equal_diffusion_dpo_exactly():
    mw, ml, rw, rl = _errors(1)
    ones = torch.ones_like(mw)
    a = preference_loss(mw, ml, rw, rl, 3.0)
    b = preference_loss(mw, ml, rw, rl, 3.0, weight_w=ones, weight_l=ones)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("method", ["diffusion-dpo", "dpo-cm", "sdpo"])
def test_ln2_when_policy_equals_reference(method):
    mw, ml, _, _ = _errors(2)
    config = MethodConfig.preset(method)
    raw = torch.rand(16, dtype=torch.float64)
    weights = config.transform(raw)
    out = preference_loss(mw, ml, mw.detach(), ml.detach(), config.beta, weights[:8], weights[8:])
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert out.metrics["accuracy"].item() == 0.5  # ties count half


def test_weighted_logit_formula():
    mw, ml, rw, rl = _errors(3)
    ww, wl = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    out = preference_loss(mw, ml, rw, rl, 2.0, ww, wl)
    torch.testing.assert_close(out.logits, -(ww * (mw - rw) - wl * (ml - rl)))
    torch.testing.assert_close(out.metrics["reward_margin"], out.logits.mean() / 2.0)
    torch.testing.assert_close(out.metrics["weight_gap"], (ww - wl).mean())


def test_gradcheck():
    mw, ml, rw, rl = _errors(4, requires_grad=True)
    ww, wl = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    fn = lambda a, b: preference_loss(a, b, rw, rl, 7.0, ww, wl).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mw, ml))


def test_masking_everything_gives_zero_gradient():
    mw, ml, rw, rl = _errors(5, requires_grad=True)
    config = MethodConfig.preset("dpo-cm")
    weights = config.transform(torch.full((16,), 0.5, dtype=torch.float64))  # all below tau = 0.9
    out = preference_loss(mw, ml, rw, rl, 10.0, weights[:8], weights[8:])
    out.loss.backward()
    assert mw.grad.abs().max() == 0 and ml.grad.abs().max() == 0
    assert out.metrics["masked_fraction"].item() == 1.0


def test_weights_carry_no_gradient():
    mw, ml, rw, rl = _errors(6, requires_grad=True)
    ww = torch.rand(8, dtype=torch.float64, requires_grad=True)
    preference_loss(mw, ml, rw, rl, 1.0, ww, ww).loss.backward()
    assert ww.grad is None


def test_accuracy_counts_ties_half():
    z_pos, z_zero, z_neg = torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor([-0.1])
    mw = torch.cat([-z_pos, z_zero, -z_neg]).double()  # z = -(beta/2)(mw - ml) with rw=rl=ml=0
    zeros = torch.zeros(3, dtype=torch.float64)
    out = preference_loss(mw, zeros, zeros, zeros, 2.0)
    assert out.metrics["accuracy"].item() == pytest.approx(1.5 / 3)


def test_transforms():
    w = torch.tensor([0.1, 0.85, 0.95, 1.3], dtype=torch.float64)
    torch.testing.assert_close(clip_weights(w, 0.9, 1.1), torch.tensor([0.9, 0.9, 0.95, 1.1], dtype=torch.float64))
    torch.testing.assert_close(mask_weights(clip_weights(w, 0.9, 1.1), w, 0.9), torch.tensor([0, 0, 0.95, 1.1], dtype=torch.float64))
    torch.testing.assert_close(normalize_weights(w).mean(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(normalize_weights(torch.zeros(3)), torch.zeros(3))
    cm = MethodConfig.preset("dpo-cm").transform(w)
    torch.testing.assert_close(cm, torch.tensor([0, 0, 0.95, 1.1], dtype=torch.float64))
    assert torch.equal(MethodConfig.preset("diffusion-dpo").transform(w), torch.ones(4, dtype=torch.float64))


def test_preset_overrides_and_validation():
    config = MethodConfig.preset("sdpo", beta=50.0, normalize=True)
    assert config.beta == 50.0 and config.normalize and config.name == "sdpo"
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        MethodConfig.preset("ppo")
    with pytest.raises(ValueError, match="unknown method setting"):
        MethodConfig.preset("sdpo", temperature=1.0)
    with pytest.raises(ValueError, match="out of order"):
        MethodConfig.preset("sdpo", clip=(1.2, 0.8))
    with pytest.raises(ValueError, match="beta"):
        MethodConfig.preset("sdpo", beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        MethodConfig.preset("sdpo", beta=float("nan"))
    with pytest.raises(ValueError, match="estimator"):
        MethodConfig.preset("sdpo", estimator="magic")


@pytest.mark.parametrize("beta", [-1.0, 0.0, float("inf"), float("nan")])
def test_bad_beta_is_named(beta):
    mw, ml, rw, rl = _errors()
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        preference_loss(mw, ml, rw, rl, beta)


def test_mismatched_shapes_are_named():
    mw, ml, rw, rl = _errors()
    with pytest.raises(ValueError, match="shapes differ"):
        preference_loss(mw, ml[:4], rw, rl, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        preference_loss(mw, ml, rw, rl, 1.0, weight_w=torch.ones(3))
    with pytest.raises(ValueError, match="per-pair vectors"):
        preference_loss(mw[:, None], ml[:, None], rw[:, None], rl[:, None], 1.0)


def test_sft_term_adds_the_winner_error():
    mw, ml, rw, rl = _errors(3, requires_grad=True)
    plain = preference_loss(mw, ml, rw, rl, 50.0).loss
    with_sft = preference_loss(mw, ml, rw, rl, 50.0, sft_weight=12.5).loss
    torch.testing.assert_close(with_sft - plain, 12.5 * mw.mean())
    (grad_w,) = torch.autograd.grad(with_sft - plain, mw)
    torch.testing.assert_close(grad_w, torch.full_like(mw, 12.5 / len(mw)))
    with pytest.raises(ValueError, match="sft_weight"):
        preference_loss(mw, ml, rw, rl, 50.0, sft_weight=-1.0)


def test_safeguard_scale_formula():
    g = torch.Generator().manual_seed(0)
    rw, rl = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ww = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    wl = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    scale = safeguard_scale(rw, rl, ww, wl)
    for i in range(6):
        inner = float(wl[i] * rw[i] @ rl[i])
        expected = 1.0 if inner <= 0 else min(1.0, float(ww[i] * rw[i] @ rw[i]) / inner)
        assert math.isclose(float(scale[i]), expected, rel_tol=1e-12)
    # A loser residual parallel to and larger than the winner's: the loser term is shrunk.
    assert float(safeguard_scale(rw[:1], 3 * rw[:1])) == pytest.approx(1 / 3, rel=1e-12)
    assert float(safeguard_scale(rw[:1], -rw[:1])) == 1.0


def test_safeguard_keeps_the_winner_error_from_rising_to_first_order():
    """Output = theta for every input (one shared Jacobian, where the output-space rule is exact):
    the descent direction of the safeguarded loss never raises the winner's error, plain DPO's does."""
    g = torch.Generator().manual_seed(1)
    rises_plain = rises_guarded = 0
    for _ in range(200):
        theta = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
        target_w, target_l = torch.randn(4, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)
        target_l = target_w + 0.3 * (target_l - target_w)  # close targets: aligned gradients, the risky case
        err_w, err_l = ((theta - target_w) ** 2).mean()[None], ((theta - target_l) ** 2).mean()[None]
        ref_w, ref_l = err_w.detach() * 1.1, err_l.detach() * 0.9
        (grad_err_w,) = torch.autograd.grad(err_w.sum(), theta, retain_graph=True)
        for guarded in (False, True):
            scale = safeguard_scale((theta - target_w)[None], (theta - target_l)[None]) if guarded else None
            loss = preference_loss(err_w, err_l, ref_w, ref_l, 10.0, loser_scale=scale).loss
            (grad_loss,) = torch.autograd.grad(loss, theta, retain_graph=True)
            change = float(grad_err_w @ -grad_loss)  # d err_w along the descent direction
            if guarded:
                rises_guarded += change > 1e-12
            else:
                rises_plain += change > 1e-12
    assert rises_guarded == 0
    assert rises_plain > 20


def test_baseline_settings_are_validated():
    assert MethodConfig.preset("diffusion-dpo", sft_weight=500.0, safeguard=True).safeguard
    with pytest.raises(ValueError, match="sft_weight"):
        MethodConfig.preset("diffusion-dpo", sft_weight=float("nan"))
    with pytest.raises(ValueError, match="safeguard"):
        MethodConfig.preset("diffusion-dpo", safeguard="yes")


def test_pair_weights_give_the_hand_computed_weighted_mean():
    """pair_weighting: the loss is mean_i(p_i * -log sigmoid(z_i)); the SFT term and the logits are untouched."""
    mw, ml, rw, rl = _errors(4, requires_grad=True)
    beta, sft = 800.0, 3.0
    weight_w = torch.linspace(0.5, 1.1, 8, dtype=torch.float64)
    weight_l = torch.linspace(1.0, 0.6, 8, dtype=torch.float64)
    pairs = torch.tensor([0.2, 1.7, 0.0, 3.1, 0.9, 0.4, 1.2, 0.5], dtype=torch.float64)
    out = preference_loss(mw, ml, rw, rl, beta, weight_w, weight_l, sft_weight=sft, pair_weights=pairs)
    inside = (-0.5 * beta * (weight_w * (mw - rw) - weight_l * (ml - rl))).detach()
    by_hand = sum(float(pairs[i]) * -math.log(1 / (1 + math.exp(-float(inside[i])))) for i in range(8)) / 8
    by_hand += sft * float(mw.detach().mean())
    assert out.loss.dtype == torch.float64
    assert float(out.loss.detach()) == pytest.approx(by_hand, rel=1e-12)
    torch.testing.assert_close(out.logits.detach(), inside)
    assert float(out.metrics["pair_weight_mean"]) == pytest.approx(float(pairs.mean()), rel=1e-12)
    # A pair of weight 0 gets no gradient from the preference term (only the SFT term's, on the winner).
    out.loss.backward()
    assert float(ml.grad[2]) == 0.0 and float(ml.grad[3]) != 0.0
    assert float(mw.grad[2]) == pytest.approx(sft / 8, rel=1e-12)


def test_unit_pair_weights_change_nothing_and_a_wrong_shape_is_named():
    mw, ml, rw, rl = _errors(5)
    plain = preference_loss(mw, ml, rw, rl, 100.0)
    ones = preference_loss(mw, ml, rw, rl, 100.0, pair_weights=torch.ones(8, dtype=torch.float64))
    assert torch.equal(plain.loss, ones.loss) and "pair_weight_mean" not in plain.metrics
    with pytest.raises(ValueError, match="pair_weights"):
        preference_loss(mw, ml, rw, rl, 100.0, pair_weights=torch.ones(7, dtype=torch.float64))
