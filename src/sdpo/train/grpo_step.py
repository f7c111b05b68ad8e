"""GRPO's micro-step: recompute each member's step log-density under the policy, the clipped ratio
objective, the KL to the reference. Family-agnostic: it knows only the ModelSpec protocol.

The log-density is ``sdpo.rl.rollout.step_log_prob``, the computation the rollout recorded, so while
the policy is the sampling policy (the first optimizer step of a round) every ratio is 1 to rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sdpo.rl.config import GrpoConfig
from sdpo.rl.grpo import grpo_loss
from sdpo.rl.rollout import RolloutSettings, guided_prediction, step_gaussian, step_log_prob
from sdpo.rl.sde import gaussian_kl, sampling_levels
from sdpo.train.run import MicroStep, TrainingRun

if TYPE_CHECKING:
    from sdpo.rl.trajectories import TrajectoryBatch


def grpo_step(run: TrainingRun, batch: TrajectoryBatch, rollout: RolloutSettings, grpo: GrpoConfig) -> MicroStep:
    """The GRPO loss of one micro-batch of (trajectory, step) members, ready to back-propagate."""
    spec = run.spec
    log_prob, gaussian = step_log_prob(spec, run.model, batch.x_t, batch.x_s, batch.steps, batch.conditions,
                                       batch.empty, rollout)
    levels, _, _ = sampling_levels(spec.schedule, rollout.num_inference_steps)
    kl = None
    if grpo.kl_coefficient > 0:
        with torch.no_grad(), run.reference() as reference:
            prediction = guided_prediction(spec, reference, batch.x_t, levels[batch.steps].to(batch.x_t.device),
                                           batch.conditions, batch.empty, rollout.guidance_scale)
            reference_step = step_gaussian(spec.schedule, batch.x_t, prediction, batch.steps,
                                           rollout.num_inference_steps, rollout.noise_level)
        kl = gaussian_kl(gaussian, reference_step)
    output = grpo_loss(log_prob, batch.old_log_prob, batch.advantages, grpo.clip_range, kl, grpo.kl_coefficient)
    timesteps = levels[batch.steps.cpu()]
    return MicroStep(loss=output.loss, metrics={k: float(v) for k, v in output.metrics.items()},
                     timesteps=timesteps, raw_weights=output.ratio.float().cpu(), drawn=timesteps)


__all__ = ["grpo_step"]
