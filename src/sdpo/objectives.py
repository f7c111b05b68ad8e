"""The preference objective and the importance-weight transforms (docs/concepts/method.md section 4).

For a pair (winner w, loser l) sharing one timestep and one noise tensor,

    Delta^y = err_theta^y - err_ref^y
    z       = -(beta / 2) * (W^w * Delta^w - W^l * Delta^l)
    loss    = -log sigmoid(z), averaged over pairs.

Diffusion-DPO, DPO-C&M and SDPO are presets of this one objective that differ only in how the
pair-member weights W are built from the raw importance weights w. This module imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.importance import ESTIMATORS, Estimator

MethodName = Literal["diffusion-dpo", "dpo-cm", "sdpo", "kto", "mapo"]
"""The method presets (``MethodConfig.name``): the weighted-DPO family, Diffusion-KTO and MaPO."""
METHODS: tuple[MethodName, ...] = get_args(MethodName)
OWN_LOSS_METHODS: tuple[MethodName, ...] = ("kto", "mapo")
"""Methods with their own loss (``sdpo.kto_mapo``): importance weights are logged, never applied."""


# --------------------------------------------------------------------- weight transforms
def clip_weights(weights: Tensor, low: float, high: float) -> Tensor:
    """W = clamp(w, low, high)."""
    if not low <= high:
        raise ValueError(f"clip bounds out of order: low={low} > high={high}")
    return weights.clamp(low, high)


def mask_weights(weights: Tensor, raw_weights: Tensor, threshold: float) -> Tensor:
    """W = W * 1[w >= threshold]; the test is on the raw weight, before any clipping."""
    return weights * (raw_weights >= threshold).to(weights.dtype)


def normalize_weights(weights: Tensor) -> Tensor:
    """W = W / mean(W) over the batch (self-normalised importance sampling); all-zero stays zero."""
    mean = weights.mean()
    return weights / mean if bool(mean > 0) else weights


# --------------------------------------------------------------------- method configuration
@dataclass
class MethodConfig:
    """How the pair-member weights W are built, and the objective's temperature."""

    name: MethodName = "sdpo"
    """Preset this configuration started from: "diffusion-dpo", "dpo-cm", "sdpo", "kto" (Diffusion-KTO,
    per-sample labels) or "mapo" (MaPO, pairs, no reference)."""

    beta: float = 1000.0
    """Temperature of the objective, in the -(beta/2) convention of the official Diffusion-DPO code
    (diffusers' SD1.5 example omits the 1/2: its beta_dpo = b is beta = 2b here). Errors are
    per-element means, so beta scales with 1 / (typical error gap). For "kto": the temperature on one
    sample's gap, sigmoid(beta * (r - z_ref)) with no 1/2 (the paper's code, default 1000); a pair whose
    members move by +-d gets logit beta*d under both. For "mapo": the weight of the margin term against
    the winners' SFT term (the paper's beta, 0.1), not a temperature."""

    estimator: Estimator = "expected"
    """Importance-weight estimator: "expected" (closed form, w <= 1), "sampled" (one draw of x_s,
    unbiased) or "relative" (p_theta / p_ref at x_s ~ q, exactly 1 at the start of training)."""

    clip: tuple[float, float] | None = None
    """(low, high) bounds W is clamped to, or None for no clipping."""

    mask_threshold: float | None = None
    """Pair members whose raw w falls below this get W = 0 (pruned timesteps), or None."""

    normalize: bool = False
    """Divide W by its batch mean (self-normalised importance sampling)."""

    num_inference_steps: int = 50
    """K, the sampler length that defines the reverse step t -> s = t - T/K the weight measures.
    Use the number of steps the model is sampled with: with K = T every weight is ~1."""

    use_weights: bool = True
    """False for plain Diffusion-DPO: W = 1 (weights are still computed and logged)."""

    sft_weight: float = 0.0
    """Coefficient of an added supervised term on the winners, ``sft_weight * mean(err_theta^w)``
    (DPO regularised with SFT, as in Reg-DPO). The DPO term's own pull on a winner's error is
    (beta/2) * sigmoid(-z) * W^w, beta/4 at the start, so sft_weight = beta/4 makes them equal there."""

    safeguard: bool = False
    """Diffusion-SDPO's winner-preserving update (Fu et al. 2025, arXiv 2511.03317; not this project's
    ``sdpo``): each pair's loser term is scaled by ``safeguard_scale`` so that, to first order, the step
    does not raise the winner's error."""

    kto_desirable_weight: float = 1.0
    """lambda_D of Diffusion-KTO: the weight of a desirable sample's loss (the paper's default 1)."""

    kto_undesirable_weight: float = 1.0
    """lambda_U of Diffusion-KTO: the weight of an undesirable sample's loss (the paper's default 1). KTO
    advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the labels are unbalanced."""

    mapo_snr: float = 0.5
    """MaPO's ``a`` in the likelihood proxy exp(-a * err) behind its score a err / (exp(a err) - 1) (the
    official code's snr_value, 0.5)."""

    mapo_margin_scale: float | None = None
    """MaPO's factor T on the score difference inside log sigmoid, or None for the model's number of
    training timesteps (the official code's choice, 1000 for SD)."""

    @property
    def needs_reference(self) -> bool:
        """False for a reference-free method (MaPO): the step runs no reference forward."""
        return self.name != "mapo"

    @property
    def unpaired(self) -> bool:
        """True for a method that trains on labelled samples, not pairs (Diffusion-KTO)."""
        return self.name == "kto"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {self.beta!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.clip is not None:
            low, high = (float(v) for v in self.clip)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"clip bounds must be finite, got {self.clip}")
            if low > high:
                raise ValueError(f"clip bounds out of order: low={low} > high={high}")
            if low < 0:
                raise ValueError(f"clip low bound must be >= 0, got {low}")
            self.clip = (low, high)
        if self.mask_threshold is not None and not (
            math.isfinite(self.mask_threshold) and self.mask_threshold >= 0
        ):
            raise ValueError(f"mask_threshold must be a finite number >= 0, got {self.mask_threshold}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps}")
        if not (isinstance(self.sft_weight, (int, float)) and math.isfinite(self.sft_weight)
                and self.sft_weight >= 0):
            raise ValueError(f"sft_weight must be a finite number >= 0, got {self.sft_weight!r}")
        if not isinstance(self.safeguard, bool):
            raise ValueError(f"safeguard must be true or false, got {self.safeguard!r}")
        self._check_own_loss_settings()

    def _check_own_loss_settings(self) -> None:
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.mapo_snr, (int, float)) and math.isfinite(self.mapo_snr) and self.mapo_snr > 0):
            raise ValueError(f"mapo_snr must be a positive finite number, got {self.mapo_snr!r}")
        scale = self.mapo_margin_scale
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"mapo_margin_scale must be a positive finite number or null, got {scale!r}")
        if self.name not in OWN_LOSS_METHODS:
            return
        if self.use_weights or self.safeguard or self.sft_weight:
            raise ValueError(f"method {self.name} has its own loss: use_weights, safeguard and sft_weight apply to "
                             "the DPO-family methods only (set use_weights=false, safeguard=false, sft_weight=0)")
        if self.name == "mapo" and self.estimator == "relative":
            raise ValueError('method mapo runs no reference, and the "relative" estimator needs one: '
                             'use estimator "expected" or "sampled"')

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MethodConfig:
        """The named method with its defaults, then ``overrides`` (validated together)."""
        if name not in PRESETS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown method setting(s): {', '.join(sorted(unknown))}")
        return replace(PRESETS[name], **overrides)

    def transform(self, raw_weights: Tensor) -> Tensor:
        """Turn raw importance weights w (any shape) into objective weights W, without gradient."""
        raw_weights = raw_weights.detach()
        if not self.use_weights:
            return torch.ones_like(raw_weights)
        weights = raw_weights
        if self.clip is not None:
            weights = clip_weights(weights, *self.clip)
        if self.mask_threshold is not None:
            weights = mask_weights(weights, raw_weights, self.mask_threshold)
        if self.normalize:
            weights = normalize_weights(weights)
        return weights


PRESETS: dict[str, MethodConfig] = {
    "diffusion-dpo": MethodConfig(name="diffusion-dpo", use_weights=False),
    "dpo-cm": MethodConfig(name="dpo-cm", estimator="expected", mask_threshold=0.9, clip=(0.9, 1.1)),
    "sdpo": MethodConfig(name="sdpo", estimator="expected", clip=(0.0, 1.1)),
    # Diffusion-KTO's official code: beta 1000, lambda_D = lambda_U = 1.
    "kto": MethodConfig(name="kto", beta=1000.0, use_weights=False),
    # MaPO's official code: beta 0.1, snr 0.5, T = the training timesteps.
    "mapo": MethodConfig(name="mapo", beta=0.1, use_weights=False),
}


def safeguard_scale(
    residual_w: Tensor, residual_l: Tensor, weight_w: Tensor | None = None, weight_l: Tensor | None = None
) -> Tensor:
    """Diffusion-SDPO's per-pair loser scale, lambda = min(1, W^w |g_w|^2 / (W^l <g_w, g_l>)), or 1 where
    W^l <g_w, g_l> <= 0.

    g are the errors' gradients in output space, proportional to the residuals ``prediction - target``
    (shape (B, ...)); the paper's output-space approximation treats winner and loser outputs as one
    space. With loss gradient proportional to W^w grad err^w - lambda W^l grad err^l, the winner's
    error changes by -lr * c * (W^w |g_w|^2 - lambda W^l <g_w, g_l>) <= 0 for this lambda.
    """
    residual_w, residual_l = residual_w.detach().flatten(1), residual_l.detach().flatten(1)
    if residual_w.shape != residual_l.shape:
        raise ValueError(f"residual shapes differ: {tuple(residual_w.shape)} vs {tuple(residual_l.shape)}")
    ones = torch.ones(residual_w.shape[0], dtype=residual_w.dtype, device=residual_w.device)
    weight_w = ones if weight_w is None else weight_w.detach().to(residual_w.dtype)
    weight_l = ones if weight_l is None else weight_l.detach().to(residual_w.dtype)
    aligned = weight_l * (residual_w * residual_l).sum(1)
    preserved = weight_w * residual_w.square().sum(1)
    scale = torch.where(aligned > 0, preserved / aligned.clamp_min(torch.finfo(aligned.dtype).tiny), ones)
    return scale.clamp(max=1.0)


# --------------------------------------------------------------------- the objective
@dataclass
class PreferenceOutput:
    """The loss and what to log about it (all metrics are detached)."""

    loss: Tensor
    """Scalar -log sigmoid(z) averaged over pairs (carries gradient)."""
    logits: Tensor
    """Per-pair z, shape (B,) (carries gradient)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """accuracy (z > 0, ties count half), reward_margin (mean z / beta), weight_mean, weight_min,
    masked_fraction (share of pair members with W = 0), weight_gap (mean W^w - W^l)."""


def _check_errors(**errors: Tensor) -> None:
    shapes = {name: tuple(err.shape) for name, err in errors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1:
        raise ValueError(f"errors must be per-pair vectors of shape (B,), got {first}")
    if any(shape != first for shape in shapes.values()):
        raise ValueError(f"winner/loser error shapes differ: {shapes}")


def preference_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    weight_w: Tensor | None = None,
    weight_l: Tensor | None = None,
    loser_scale: Tensor | None = None,
    sft_weight: float = 0.0,
    pair_weights: Tensor | None = None,
) -> PreferenceOutput:
    """The weighted Diffusion-DPO objective of docs/concepts/method.md section 4.

    Args:
        model_err_w: per-sample mean squared errors of the trained model on the winners, shape (B,).
        model_err_l: the same on the losers.
        ref_err_w: the frozen reference's errors on the winners (no gradient needed).
        ref_err_l: the same on the losers.
        beta: positive finite temperature, -(beta/2) convention.
        weight_w: objective weights W of the winners (stop-gradient); None means 1.
        weight_l: objective weights W of the losers (stop-gradient); None means 1.
        loser_scale: a further per-pair factor on the loser term (``safeguard_scale``); None means 1.
        sft_weight: coefficient of the added supervised term ``mean(model_err_w)``.
        pair_weights: a per-pair factor on each pair's ``-log sigmoid(z)`` (stop-gradient), shape (B,);
            the preference term is then ``mean(pair_weights * -log sigmoid(z))``, the SFT term unchanged.
            None means 1.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    ones = torch.ones_like(model_err_w)
    weight_w = ones if weight_w is None else weight_w.detach().to(model_err_w.dtype)
    weight_l = ones if weight_l is None else weight_l.detach().to(model_err_w.dtype)
    scale = ones if loser_scale is None else loser_scale.detach().to(model_err_w.dtype)
    per_pair = ones if pair_weights is None else pair_weights.detach().to(model_err_w.device, model_err_w.dtype)
    _check_errors(model_err_w=model_err_w, weight_w=weight_w, weight_l=weight_l, loser_scale=scale,
                  pair_weights=per_pair)
    if not (math.isfinite(sft_weight) and sft_weight >= 0):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {sft_weight!r}")

    delta_w = model_err_w - ref_err_w.detach()
    delta_l = model_err_l - ref_err_l.detach()
    logits = -0.5 * beta * (weight_w * delta_w - scale * weight_l * delta_l)
    loss = -(per_pair * F.logsigmoid(logits)).mean()
    if sft_weight:
        loss = loss + sft_weight * model_err_w.mean()

    with torch.no_grad():
        both = torch.cat([weight_w, weight_l])
        metrics = {
            "loss": loss.detach(),
            "accuracy": ((logits > 0).to(logits.dtype) + 0.5 * (logits == 0).to(logits.dtype)).mean(),
            "reward_margin": logits.detach().mean() / beta,
            "weight_mean": both.mean(),
            "weight_min": both.min(),
            "masked_fraction": (both == 0).to(logits.dtype).mean(),
            # > 0: winners weigh more than their losers, so the objective is no longer antisymmetric.
            "weight_gap": (weight_w - weight_l).mean(),
        }
        if loser_scale is not None:
            metrics["loser_scale"] = scale.mean()
        if pair_weights is not None:
            metrics["pair_weight_mean"] = per_pair.mean()
    return PreferenceOutput(loss=loss, logits=logits, metrics=metrics)
