"""The Diffusion-KTO and MaPO losses on per-sample diffusion errors (docs/concepts/kto-mapo.md). Imports only torch.

Diffusion-KTO (Li et al. 2024, arXiv 2404.04465) learns from per-sample labels, desirable or
undesirable, with no pairing. Its implicit reward of one sample is the policy-vs-reference gap of the
diffusion loss, r = err_ref - err_theta (a log-likelihood ratio up to a timestep weight), and its
value is Kahneman-Tversky's:

    z_ref = max(0, mean_batch(r)), detached       (the reference point: the batch's KL estimate)
    v     = sigmoid(+beta * (r - z_ref))           desirable
            sigmoid(-beta * (r - z_ref))           undesirable
    loss  = mean(lambda_y * (1 - v)),  lambda_y = lambda_D or lambda_U

MaPO (Hong et al. 2024, arXiv 2406.06424) is reference-free, on pairs. With p = exp(-a * err) the
likelihood proxy of a sample, its score is the bounded link s(err) = a err / (exp(a err) - 1) in (0, 1]
(decreasing in err), and

    m     = T * (s(err_w) - s(err_l))              (T: the number of training timesteps)
    loss  = mean(err_w) - beta * mean(log sigmoid(m))

the winners' denoising loss (the SFT term) plus the margin term, as the official code computes it
(a = 0.5, beta = 0.1, T = 1000 there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.objectives import PreferenceOutput


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'' if allow_zero else 'positive '}finite number"
                         f"{' >= 0' if allow_zero else ''}, got {value!r}")


def _check_vectors(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"expected per-sample vectors of one shape (B,), got {shapes}")


def kto_loss(
    model_err: Tensor,
    ref_err: Tensor,
    desirable: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: Tensor | float | None = None,
) -> PreferenceOutput:
    """The Diffusion-KTO loss of the module docstring on B labelled samples.

    Args:
        model_err: the policy's per-sample mean squared errors, shape (B,).
        ref_err: the frozen reference's errors on the same noisy inputs (no gradient needed).
        desirable: (B,) bool, True for a desirable sample, False for an undesirable one.
        beta: positive temperature on the per-sample gap (no 1/2: the official code's convention).
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        reference_point: z_ref to use instead of the batch estimate (e.g. one averaged over processes).
    """
    _check_positive("beta", beta)
    _check_positive("desirable_weight", desirable_weight, allow_zero=True)
    _check_positive("undesirable_weight", undesirable_weight, allow_zero=True)
    _check_vectors(model_err=model_err, ref_err=ref_err, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    reward = ref_err.detach() - model_err
    if reference_point is None:
        z_ref = reward.detach().mean().clamp_min(0.0)
    else:
        z_ref = torch.as_tensor(reference_point, dtype=reward.dtype, device=reward.device).detach()
    sign = torch.where(desirable, 1.0, -1.0).to(reward.dtype)
    logits = sign * beta * (reward - z_ref)
    weight = torch.where(desirable, float(desirable_weight), float(undesirable_weight)).to(reward.dtype)
    loss = (weight * (1.0 - torch.sigmoid(logits))).mean()
    with torch.no_grad():
        good, bad = desirable, ~desirable
        metrics = {
            "loss": loss.detach(),
            "accuracy": ((logits > 0).to(logits.dtype) + 0.5 * (logits == 0).to(logits.dtype)).mean(),
            "kl": z_ref.detach(),
            "reward_desirable": reward[good].mean() if bool(good.any()) else reward.new_tensor(math.nan),
            "reward_undesirable": reward[bad].mean() if bool(bad.any()) else reward.new_tensor(math.nan),
            "desirable_fraction": good.to(reward.dtype).mean(),
        }
    return PreferenceOutput(loss=loss, logits=logits, metrics=metrics)


def mapo_score(err: Tensor, snr: float) -> Tensor:
    """s(err) = a err / (exp(a err) - 1), with its limit 1 at err = 0 (``a`` is ``snr``)."""
    scaled = snr * err
    tiny = scaled.abs() < 1e-8
    safe = torch.where(tiny, torch.ones_like(scaled), scaled)
    return torch.where(tiny, 1.0 - 0.5 * scaled, safe / torch.expm1(safe))


def mapo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    beta: float,
    snr: float = 0.5,
    margin_scale: float = 1000.0,
) -> PreferenceOutput:
    """The MaPO loss of the module docstring on B pairs; no reference errors.

    Args:
        model_err_w: the policy's per-sample mean squared errors on the winners, shape (B,).
        model_err_l: the same on the losers.
        beta: weight of the margin term (the paper's beta, 0.1).
        snr: ``a`` in the likelihood proxy exp(-a err) (the official code's ``snr_value``, 0.5).
        margin_scale: T, the factor on the score difference (the number of training timesteps).
    """
    _check_positive("beta", beta)
    _check_positive("snr", snr)
    _check_positive("margin_scale", margin_scale)
    _check_vectors(model_err_w=model_err_w, model_err_l=model_err_l)
    logits = margin_scale * (mapo_score(model_err_w, snr) - mapo_score(model_err_l, snr))
    margin_term = -F.logsigmoid(logits).mean()
    sft_term = model_err_w.mean()
    loss = sft_term + beta * margin_term
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "accuracy": ((logits > 0).to(logits.dtype) + 0.5 * (logits == 0).to(logits.dtype)).mean(),
            "reward_margin": logits.detach().mean(),
            "sft_loss": sft_term.detach(),
            "margin_loss": margin_term.detach(),
        }
    return PreferenceOutput(loss=loss, logits=logits, metrics=metrics)
