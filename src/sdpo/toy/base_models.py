"""A world's base-model networks as one value, and how they are written as a diffusers-style folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # diffusers and transformers load only when a model is built
    from diffusers.models import ModelMixin
    from transformers import PreTrainedModel


@dataclass
class BaseModels:
    """A world's freshly built (or trained) networks, and what ``save`` writes."""

    denoiser: ModelMixin
    denoiser_subfolder: str
    """"unet" or "transformer": the denoiser's folder (and diffusers pipeline argument)."""
    text_encoder: PreTrainedModel
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
