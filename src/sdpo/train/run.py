"""The state a training run's phases share: where it starts (``ResumePoint``), what it holds
(``TrainingRun``) and what one optimizer step produced (``StepOutcome``).

Set-up (``sdpo.train.setup``) builds a ``TrainingRun``; the optimizer step (``sdpo.train.optimize``), the
metrics log (``sdpo.train.metrics``), the after-step actions (``sdpo.train.after_step``), checkpointing
(``sdpo.train.checkpoint.save_run``) and the finish (``sdpo.train.export``) each take it. This module
imports none of them, so every phase depends on it and it on no phase: a trainer of another objective
family can build the same state and reuse every phase.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from sdpo.data.batch import Pair
from sdpo.models.base import ModelSpec, unwrap
from sdpo.train.config import TrainConfig
from sdpo.train.order import GlobalBatchOrder
from sdpo.train.pair_weights import PairWeights
from sdpo.train.resume_policy import ConfigChange

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from torch.optim.lr_scheduler import LRScheduler

__all__ = ["MicroStep", "ObjectiveDataset", "PairDataset", "ResumePoint", "StepOutcome", "TrainingData",
           "TrainingRun", "final_model"]


class PairDataset(Protocol):
    """What training reads pairs from: a ``CachedPairs``, or any sequence of ``Pair`` (for Diffusion-KTO: a
    ``CachedSamples``, or any sequence of ``Sample``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Pair: ...


@dataclass
class MicroStep:
    """What one micro-batch's forward gave the optimizer step, whatever the objective."""

    loss: Tensor
    """The scalar loss to back-propagate."""
    metrics: dict[str, float]
    """Scalar metrics to log."""
    timesteps: Tensor
    """Schedule timestep index per member (what the log buckets by), integer (M,)."""
    raw_weights: Tensor
    """Per member: the importance weight (preference objectives) or the ratio to the sampling policy (GRPO), (M,)."""
    drawn: Tensor
    """Per dataset row of the micro-batch: its timestep (what ``bad_steps.jsonl`` names), (B,)."""


class ObjectiveDataset(Protocol):
    """A dataset that brings its own objective's micro-step (e.g. GRPO's trajectories); a plain
    ``PairDataset`` is trained by the preference step."""

    def __len__(self) -> int: ...

    def micro_step(self, run: TrainingRun, rows: Tensor, positions: Tensor, micro_step: int) -> MicroStep:
        """Forward the rows ``rows`` (dataset indices; ``positions`` in the global batch) under ``run.model``."""
        ...


TrainingData = PairDataset | ObjectiveDataset
"""What a run trains on: pairs, or a dataset with its own objective's micro-step."""


@dataclass
class ResumePoint:
    """Where a run starts: a checkpoint (None: step 0) and what changed in the config since it was made."""

    checkpoint: Path | None = None
    """The checkpoint folder the run continues from, or None for a fresh start."""
    step: int = 0
    """Optimizer steps already done (the checkpoint's step)."""
    state: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's ``trainer_state.json`` (empty for a fresh start)."""
    changes: list[ConfigChange] = field(default_factory=list)
    """The config fields changed since the checkpoint (``sdpo.train.resume_policy.check_resume``'s records)."""


@dataclass
class TrainingRun:
    """Everything the phases of a run share, built once by ``sdpo.train.setup.build_run``."""

    config: TrainConfig
    accelerator: Accelerator
    spec: ModelSpec
    dataset: TrainingData | None
    """The cached pairs (or an objective's own dataset); None when the run only exports (it resumes at ``max_steps``)."""
    model: nn.Module
    """The trained denoiser, wrapped by ``accelerator.prepare``."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    params: list[nn.Parameter]
    """The trainable parameters (the LoRA adapters, or every denoiser weight)."""
    reference: Callable[[], contextlib.AbstractContextManager[nn.Module]]
    """A context manager factory yielding the frozen reference network."""
    weight_dtype: torch.dtype
    """The frozen weights' dtype (the conditioning follows it)."""
    output_dir: Path
    resume: ResumePoint
    order: GlobalBatchOrder | None = None
    """Which pairs each process sees per micro-step (None without a dataset)."""
    sample_latents: bool = False
    """Whether each latent is drawn from its cached posterior (``latent_sampling``)."""
    bad_steps: int = 0
    """Steps skipped by the non-finite guard over the whole run (resumes included)."""
    consecutive_bad: int = 0
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    """Each resume's changed settings, as ``{"step": N, "changes": [...]}`` (saved in checkpoints)."""
    ema: EMAModel | None = None
    """diffusers' EMAModel of ``params`` (``ema_decay``), or None."""
    pair_weights: PairWeights | None = None
    """How ``pair_weighting`` turns a batch's gaps into weights, or None."""

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files."""
        return bool(self.accelerator.is_main_process)


@dataclass
class StepOutcome:
    """One optimizer step: per-micro-step metrics, the gradient norm, and why it was skipped (None: applied)."""

    metrics: list[tuple[dict[str, float], Tensor, Tensor]]
    """Per micro-step: (scalar metrics, timesteps per member, raw importance weights per member)."""
    grad_norm: float
    """The clipped gradient's norm before clipping (NaN when the backend did not report it)."""
    skipped: str | None
    """Why the update was skipped by the non-finite guard, or None."""
    rows: Tensor
    """The dataset indices of this process's pairs over the step's micro-steps."""
    timesteps: Tensor
    """Their training timesteps."""
    max_loss: float
    """The largest micro-step loss (inf when one was not finite)."""


def final_model(run: TrainingRun) -> nn.Module:
    """The trained denoiser without accelerate's or torch.compile's wrappers."""
    return unwrap(run.accelerator.unwrap_model(run.model))
