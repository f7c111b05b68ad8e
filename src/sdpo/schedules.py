"""One Gaussian-diffusion view of every supported noise schedule.

Every family is ``x_t = alpha_t * x_0 + sigma_t * eps`` on a discrete grid of training timesteps
``t = 0 .. T-1`` (0 is the least noisy level). What differs between families is only how alpha and
sigma are tabulated and what the network predicts:

* ``epsilon``       DDPM, the network predicts eps (SD1.5, SDXL)
* ``v_prediction``  DDPM, the network predicts v = alpha * eps - sigma * x_0 (CogVideoX)
* ``flow``          rectified flow, alpha = 1 - s, sigma = s, the network predicts u = eps - x_0 (Wan2.1)

The tables are read from a freshly constructed diffusers scheduler of the same class and config,
never re-typed, so any beta schedule, zero-terminal-SNR rescale or sigma shift is the model's own.
This module imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    """Signal and noise scales of a Gaussian diffusion on a discrete timestep grid.

    Attributes:
        alphas: signal scale alpha_t for t = 0..T-1, float64.
        sigmas: noise scale sigma_t for t = 0..T-1, float64.
        prediction_type: what the network predicts: "epsilon", "v_prediction" or "flow".
        model_timesteps: the value passed to the network for each t (t itself for DDPM, sigma * T
            for flow models), float64.
        clip_sample_range: the bound the model's own sampler clips its clean-sample estimate to
            (diffusers' ``clip_sample`` / ``clip_sample_range``), or None where it does not clip. The
            importance weights compare q with the reverse step the sampler takes, so they clip too:
            near t = T an epsilon model's unclipped estimate is its noise error divided by alpha_T.
    """

    alphas: Tensor
    sigmas: Tensor
    prediction_type: str
    model_timesteps: Tensor
    clip_sample_range: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        if self.alphas.ndim != 1 or self.alphas.shape != self.sigmas.shape:
            raise ValueError("alphas and sigmas must be 1-D tensors of the same length")
        if self.model_timesteps.shape != self.alphas.shape:
            raise ValueError("model_timesteps must have one entry per timestep")
        if self.clip_sample_range is not None and not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be positive (or None: no clipping), got {self.clip_sample_range}")
        if bool((self.sigmas <= 0).any()):
            raise ValueError("every sigma must be positive (t = 0 is the least noisy level, not the data)")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Build the schedule from a diffusers scheduler (DDPM/DDIM/PNDM/Euler/CogVideoX, or flow matching).

        A fresh scheduler is made from ``scheduler.config`` so a prior ``set_timesteps`` call on the
        given object cannot change the training tables.
        """
        fresh = type(scheduler).from_config(scheduler.config)
        config = fresh.config
        if config.get("use_flow_sigmas", False) or config.get("prediction_type") == "flow_prediction":
            # e.g. Wan's UniPCMultistepScheduler: it also carries unused DDPM tables, which must not be read.
            raise ValueError(
                f"{type(scheduler).__name__} samples a flow model with its own sigma grid; convert it with "
                "sdpo.models.wan.flow_training_scheduler(scheduler) first"
            )
        if hasattr(fresh, "alphas_cumprod"):
            prediction_type = config.get("prediction_type", "epsilon")
            if prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"unsupported DDPM prediction_type {prediction_type!r}")
            abar = fresh.alphas_cumprod.to(torch.float64)
            clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
            return cls.from_alphas_cumprod(abar, prediction_type, clip)
        if "shift" in config and hasattr(fresh, "sigmas"):
            if config.get("use_dynamic_shifting", False):
                raise ValueError(
                    "flow schedulers with use_dynamic_shifting need a resolution-dependent shift; "
                    "set a fixed `shift` in the scheduler config"
                )
            sigmas = fresh.sigmas.to(torch.float64).flip(0)  # diffusers stores them noisy-first
            num_train = int(config["num_train_timesteps"])
            return cls.flow(sigmas[:num_train], num_train)
        raise ValueError(f"cannot build a noise schedule from {type(scheduler).__name__}")

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                            clip_sample_range: float | None = None) -> NoiseSchedule:
        """DDPM view from the cumulative product of alphas (abar_t), t = 0..T-1."""
        abar = alphas_cumprod.to(torch.float64)
        alphas = abar.clamp(0.0, 1.0).sqrt()
        sigmas = (1.0 - abar).clamp_min(0.0).sqrt()
        steps = torch.arange(abar.numel(), dtype=torch.float64)
        return cls(alphas, sigmas, prediction_type, steps, clip_sample_range)

    @classmethod
    def flow(cls, sigmas: Tensor, num_train_timesteps: int) -> NoiseSchedule:
        """Rectified-flow view from ascending sigmas s_t: alpha = 1 - s, sigma = s, timestep = s * T."""
        sigmas = sigmas.to(torch.float64)
        if bool((sigmas[1:] < sigmas[:-1]).any()):
            raise ValueError("flow sigmas must increase with t")
        return cls(1.0 - sigmas, sigmas, "flow", sigmas * num_train_timesteps)

    # ---------------------------------------------------------------- lookups
    @property
    def num_timesteps(self) -> int:
        return int(self.alphas.numel())

    def _check(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise TypeError("timesteps must be integer indices into the schedule")
        # Meta tensors hold shapes, no values: a shape-only run (counting a step's FLOPs) has nothing to check.
        if t.numel() and t.device.type != "meta" and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timestep out of range: got [{int(t.min())}, {int(t.max())}], "
                f"the schedule has t = 0..{self.num_timesteps - 1}"
            )
        return t.long()

    def _gather(self, table: Tensor, t: Tensor, like: Tensor | None) -> Tensor:
        values = table.to(t.device)[self._check(t).to(t.device)]
        if like is None:
            return values
        values = values.to(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def alpha(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """alpha_t; with ``like`` given, cast to its dtype and shaped to broadcast over it."""
        return self._gather(self.alphas, t, like)

    def sigma(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """sigma_t; with ``like`` given, cast to its dtype and shaped to broadcast over it."""
        return self._gather(self.sigmas, t, like)

    def snr(self, t: Tensor) -> Tensor:
        """alpha_t^2 / sigma_t^2 in float64 (0 at a zero-terminal-SNR end)."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep value the network expects (float64: t for DDPM, sigma * T for flow)."""
        return self._gather(self.model_timesteps, t, None)

    # ---------------------------------------------------------------- the forward process
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x_0 + sigma_t eps, with t one index per sample (leading dimension)."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to predict at (x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.alpha(t, x0) * noise - self.sigma(t, x0) * x0
        return noise - x0

    def x0_from_prediction(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """The clean-sample estimate implied by a prediction in the network's native target.

        For epsilon prediction at a level with alpha = 0 (only a zero-terminal-SNR epsilon model,
        which diffusers itself warns against) alpha is floored at 1e-4 to stay finite. With
        ``clip_sample_range`` set, the estimate is clipped to it, as the model's sampler does.
        """
        alpha, sigma = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            x0 = (x_t - sigma * prediction) / alpha.clamp_min(1e-4)
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x_t - sigma * prediction
        else:
            x0 = x_t - sigma * prediction
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    # ---------------------------------------------------------------- sampling helpers
    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        t_min: int = 0,
        t_max: int | None = None,
    ) -> Tensor:
        """Uniform integer timesteps in [t_min, t_max] (inclusive; default the whole grid)."""
        t_max = self.num_timesteps - 1 if t_max is None else t_max
        if not 0 <= t_min <= t_max < self.num_timesteps:
            raise ValueError(f"timestep range [{t_min}, {t_max}] is not inside 0..{self.num_timesteps - 1}")
        t = torch.randint(t_min, t_max + 1, (batch_size,), generator=generator)
        return t.to(device)

    def previous_timestep(self, t: Tensor, num_inference_steps: int) -> Tensor:
        """The previous point s < t of a sampler with ``num_inference_steps`` equally spaced steps.

        s = t - T // K. The sampler's last step goes to the clean end; as diffusers' DDIM does with
        ``set_alpha_to_one=False``, the clean end is represented by the least noisy level t = 0, so
        that every ratio stays finite. At t = 0 itself the step has zero length (s = t, weight 1).
        """
        if not 1 <= num_inference_steps <= self.num_timesteps:
            raise ValueError(
                f"num_inference_steps must be in 1..{self.num_timesteps}, got {num_inference_steps}"
            )
        t = self._check(t)
        stride = self.num_timesteps // num_inference_steps
        return (t - stride).clamp_min(0)
