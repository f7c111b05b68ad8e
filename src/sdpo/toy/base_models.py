"""A world's base-model networks as one value, and how they are written as a diffusers-style folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class BaseModels:
    """A world's freshly built (or trained) networks, and what ``save`` writes."""

    denoiser: nn.Module
    denoiser_subfolder: str
    """"unet" or "transformer": the denoiser's folder (and diffusers pipeline argument)."""
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    history: list[float] = field(default_factory=list)
    """Pretraining loss per step."""

    def save(self, folder: Path) -> None:
        """Write the four diffusers subfolders."""
        self.denoiser.save_pretrained(folder / self.denoiser_subfolder)
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
