"""The LAION aesthetic predictor v2 (registered as "aesthetic"; christophschuhmann/improved-aesthetic-predictor).

A CLIP ViT-L/14 image embedding, L2-normalised, into a small MLP trained on SAC + LOGOS + AVA ratings
(``sac+logos+ava1-l14-linearMSE.pth``, about 1-10, higher is prettier). The published head is linear
layers with dropout between them and no activation (state-dict keys ``layers.{0,2,4,6,7}``):
Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1). The prompt is ignored.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdpo.rewards.clip import CLIP_SCORE_MODEL
from sdpo.rewards.loading import (
    ClipPreprocess,
    check_images,
    in_batches,
    locate,
    parse_batch_size,
    parse_dtype,
    pooled,
)

if TYPE_CHECKING:
    from transformers import CLIPModel

HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac%2Blogos%2Bava1-l14-linearMSE.pth")


class AestheticHead(nn.Module):
    """The predictor's MLP, keys as published (``layers.N``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """(B, input_size) normalised embeddings -> (B,) scores."""
        return self.layers(embeddings).squeeze(-1)


class AestheticReward:
    """``head(normalise(clip.get_image_features(preprocess(image))))``."""

    name = "aesthetic"
    media = "image"

    def __init__(self, clip: CLIPModel, head: AestheticHead, preprocess: ClipPreprocess, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16) -> None:
        self.clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # The head is tiny: it stays float32 so bf16 only touches the CLIP tower.
        self.head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.preprocess, self.device, self.dtype = preprocess, torch.device(device), dtype
        self.batch_size = parse_batch_size(batch_size)

    @torch.no_grad()
    def _score_batch(self, media: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(media.to(self.device)).to(self.dtype)
        embeds = pooled(self.clip.get_image_features(pixel_values=pixels)).float()
        return self.head(embeds / embeds.norm(dim=-1, keepdim=True))

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One aesthetic score per image (B,), float32 on the CPU."""
        check_images(media, self.name)
        return in_batches(self._score_batch, media, prompts, self.batch_size)


def load_head(path: str | os.PathLike[str]) -> AestheticHead:
    """The MLP from a published ``.pth`` state dict (input size read off its first layer)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head


def aesthetic(head: str | os.PathLike[str] = "sac+logos+ava1-l14-linearMSE.pth",
              model: str | os.PathLike[str] = CLIP_SCORE_MODEL, processor: str | os.PathLike[str] | None = None,
              device: str = "cpu", dtype: str | torch.dtype = "fp32", batch_size: int = 16) -> AestheticReward:
    """The aesthetic predictor: ``head`` the MLP .pth file, ``model`` a CLIP ViT-L/14 folder (or cached id)."""
    from transformers import CLIPModel

    head_path = locate(head, reward="aesthetic", what="head", url=HEAD_URL)
    model_dir = locate(model, reward="aesthetic", what="CLIP model", hub_id=CLIP_SCORE_MODEL)
    processor_dir = locate(processor if processor is not None else model_dir, reward="aesthetic",
                           what="processor", hub_id=CLIP_SCORE_MODEL)
    return AestheticReward(CLIPModel.from_pretrained(str(model_dir)), load_head(head_path),
                           ClipPreprocess.from_folder(processor_dir), device=device, dtype=parse_dtype(dtype),
                           batch_size=batch_size)
