"""The dataset GRPO trains on: every (trajectory, trained step) of a scored rollout folder.

Item i is step j of candidate c (i = c * n + j, n trained steps per trajectory), so the trainer's batch
order shuffles steps across trajectories as it shuffles pairs. The advantage of a candidate is its
reward (the score stage's ``total``) standardised within its prompt's group of ``per_prompt``. The
dataset brings its objective's micro-step (``micro_step``, the trainer's dispatch): GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import Tensor

from sdpo.errors import InputError
from sdpo.models.base import ModelSpec
from sdpo.rl.config import GrpoConfig
from sdpo.rl.grpo import group_advantages
from sdpo.rl.rollout import RolloutSettings
from sdpo.stages.generate import trajectories_file
from sdpo.stages.records import read_records

if TYPE_CHECKING:
    from sdpo.train.run import MicroStep, TrainingRun


@dataclass
class TrajectoryBatch:
    """B (trajectory, step) members, on the training device."""

    x_t: Tensor
    x_s: Tensor
    steps: Tensor
    """(B,) sampler step index."""
    old_log_prob: Tensor
    advantages: Tensor
    conditions: dict[str, Tensor]
    empty: dict[str, Tensor]
    """The empty prompt's conditions, (1, ...)."""


class TrajectorySteps:
    """A scored rollout folder's trained steps, in memory (a round's K x prompts x n steps of latents)."""

    has_latent_std = False
    """No posterior stds (``latent_sampling`` never applies)."""
    row_name = "trajectory steps"
    """What one row is, in the trainer's announcement."""
    objective_name = "grpo"
    """What trains on the rows, in the announcement and the progress bar (not the TrainConfig's method)."""

    def __init__(self, x_t: Tensor, x_s: Tensor, steps: Tensor, log_prob: Tensor, advantages: Tensor,
                 prompt_rows: Tensor, conditions: dict[str, Tensor], empty: dict[str, Tensor],
                 rollout: RolloutSettings, grpo: GrpoConfig) -> None:
        self.x_t, self.x_s, self.steps, self.log_prob = x_t, x_s, steps, log_prob
        self.advantages, self.prompt_rows = advantages, prompt_rows
        self.conditions, self.empty, self.rollout, self.grpo = conditions, empty, rollout, grpo
        self.per_trajectory = int(steps.shape[1])

    def __len__(self) -> int:
        return int(self.steps.numel())

    @classmethod
    def from_folder(cls, folder: str | Path, spec: ModelSpec, rollout: RolloutSettings, grpo: GrpoConfig,
                    ) -> TrajectorySteps:
        """Read a generate folder made with ``rollout`` and scored; ``spec`` encodes its prompts."""
        folder = Path(folder)
        records = read_records(folder)
        if any(record.get("total") is None for record in records):
            raise InputError(f"{folder}: every candidate must be scored before GRPO trains on it (run score)")
        files: dict[str, dict[str, Tensor]] = {}
        rows: dict[str, list[Tensor]] = {"x_t": [], "x_s": [], "steps": [], "log_prob": []}
        for record in records:
            name = trajectories_file(int(Path(record["pixels"]).stem.split("-")[-1]))
            if name not in files:
                if not (folder / name).is_file():
                    raise InputError(f"{folder}: no {name}; the folder was not made by a rollout (method: grpo)")
                files[name] = load_file(str(folder / name))
            for key in rows:
                rows[key].append(files[name][key][record["pixels_index"]])
        prompts = sorted({record["prompt_index"]: record["prompt"] for record in records}.items())
        index_of = {p: i for i, (p, _) in enumerate(prompts)}
        totals = torch.tensor([float(record["total"]) for record in records], dtype=torch.float64)
        groups = torch.tensor([record["prompt_index"] for record in records])
        conditions = spec.encode_prompts([prompt for _, prompt in prompts])
        return cls(torch.stack(rows["x_t"]), torch.stack(rows["x_s"]), torch.stack(rows["steps"]),
                   torch.stack(rows["log_prob"]), group_advantages(totals, groups),
                   torch.tensor([index_of[p] for p in groups.tolist()]),
                   {k: v.cpu() for k, v in conditions.items()},
                   {k: v.cpu() for k, v in spec.encode_prompts([""]).items()}, rollout, grpo)

    def batch(self, rows: Tensor, device: torch.device | str, dtype: torch.dtype) -> TrajectoryBatch:
        """Members ``rows`` (dataset indices) on ``device``; latents and conditions in ``dtype``."""
        candidate, step = rows.div(self.per_trajectory, rounding_mode="floor"), rows % self.per_trajectory

        def cast(value: Tensor) -> Tensor:
            return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)

        prompt = self.prompt_rows[candidate]
        return TrajectoryBatch(
            x_t=self.x_t[candidate, step].to(device), x_s=self.x_s[candidate, step].to(device),
            steps=self.steps[candidate, step], old_log_prob=self.log_prob[candidate, step].to(device),
            advantages=self.advantages[candidate].to(device),
            conditions={k: cast(v[prompt]) for k, v in self.conditions.items()},
            empty={k: cast(v) for k, v in self.empty.items()})

    def micro_step(self, run: TrainingRun, rows: Tensor, positions: Tensor, micro_step: int) -> MicroStep:
        """GRPO's micro-step on members ``rows`` (the trainer's dispatch; no random draws)."""
        from sdpo.train.grpo_step import grpo_step

        del positions, micro_step  # the members and their recorded log-probabilities are all it needs
        return grpo_step(run, self.batch(rows, run.accelerator.device, run.weight_dtype), self.rollout, self.grpo)


__all__ = ["TrajectoryBatch", "TrajectorySteps"]
