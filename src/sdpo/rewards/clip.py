"""CLIP-similarity rewards: PickScore and CLIP score (registered as "pickscore" and "clip-score").

Both embed the image and the prompt with a CLIP model (transformers' ``CLIPModel``), L2-normalise the
two embeddings and score their cosine ``c``:

* PickScore (Kirstain et al. 2023, a CLIP-H fine-tuned on Pick-a-Pic): ``logit_scale.exp() * c``,
  the logit of its preference softmax (about 20-23 for typical images);
* CLIP score (Hessel et al. 2021, in the torchmetrics ``CLIPScore`` convention): ``100 * max(c, 0)``.

Preprocessing is CLIP's (shortest side resized bicubic, center crop, CLIP mean/std) as batched tensor
ops on the [-1, 1] media, read from the processor folder's ``preprocessor_config.json``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from sdpo.rewards.loading import (
    ClipPreprocess,
    check_images,
    in_batches,
    load_tokenizer,
    locate,
    parse_batch_size,
    parse_dtype,
    pooled,
)

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase

ScoreKind = Literal["logit", "clip-score", "cosine"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"


class ClipReward:
    """A reward from the cosine of CLIP image and text embeddings (see the module docstring)."""

    media = "image"

    def __init__(self, name: str, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, preprocess: ClipPreprocess, *,
                 kind: ScoreKind, scale: float = 1.0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16) -> None:
        self.name, self.kind, self.scale = name, kind, float(scale)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, parse_batch_size(batch_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeddings(self, media: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, D), float32."""
        pixels = self.preprocess(media.to(self.device)).to(self.dtype)
        embeds = pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings (B, D), float32 (prompts truncated to the model's context)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        embeds = pooled(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def _score_batch(self, media: Tensor, prompts: list[str]) -> Tensor:
        cosine = (self.image_embeddings(media) * self.text_embeddings(prompts)).sum(-1)
        if self.kind == "logit":
            return self.model.logit_scale.float().exp() * cosine
        if self.kind == "clip-score":
            return 100 * cosine.clamp(min=0)
        return self.scale * cosine

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One score per image (B,), float32 on the CPU."""
        check_images(media, self.name)
        return in_batches(self._score_batch, media, prompts, self.batch_size)


def load_clip_parts(reward: str, model: str | os.PathLike[str], processor: str | os.PathLike[str] | None,
                    *, model_hub: str, processor_hub: str) -> tuple[CLIPModel, PreTrainedTokenizerBase,
                                                                    ClipPreprocess]:
    """A transformers CLIPModel, its tokenizer and preprocessing, each from a local folder or the cache."""
    from transformers import CLIPModel

    model_dir = locate(model, reward=reward, what="model", hub_id=model_hub)
    processor_dir = locate(processor if processor is not None else model_dir, reward=reward,
                           what="processor", hub_id=processor_hub)
    clip = CLIPModel.from_pretrained(str(model_dir))
    return clip, load_tokenizer(processor_dir, reward), ClipPreprocess.from_folder(processor_dir)


def pickscore(model: str | os.PathLike[str] = PICKSCORE_MODEL,
              processor: str | os.PathLike[str] = PICKSCORE_PROCESSOR, device: str = "cpu",
              dtype: str | torch.dtype = "fp32", batch_size: int = 16) -> ClipReward:
    """PickScore: ``logit_scale.exp() * cosine``; model and processor are folders or cached hub ids."""
    clip, tokenizer, preprocess = load_clip_parts("pickscore", model, processor, model_hub=PICKSCORE_MODEL,
                                                  processor_hub=PICKSCORE_PROCESSOR)
    return ClipReward("pickscore", clip, tokenizer, preprocess, kind="logit", device=device,
                      dtype=parse_dtype(dtype), batch_size=batch_size)


def clip_score(model: str | os.PathLike[str] = CLIP_SCORE_MODEL, processor: str | os.PathLike[str] | None = None,
               device: str = "cpu", dtype: str | torch.dtype = "fp32", batch_size: int = 16) -> ClipReward:
    """CLIP score ``100 * max(cosine, 0)`` (torchmetrics' convention); the processor defaults to the model's folder."""
    clip, tokenizer, preprocess = load_clip_parts("clip-score", model, processor, model_hub=CLIP_SCORE_MODEL,
                                                  processor_hub=CLIP_SCORE_MODEL)
    return ClipReward("clip-score", clip, tokenizer, preprocess, kind="clip-score", device=device,
                      dtype=parse_dtype(dtype), batch_size=batch_size)
