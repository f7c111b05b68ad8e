"""The tiny CLIP text encoder both worlds' base models are trained with, and the fixed-length tokenising it expects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from sdpo.toy.pretrain_settings import PretrainSettings

if TYPE_CHECKING:  # transformers loads only when an encoder is built
    from transformers import PreTrainedModel


def build_text_encoder(settings: PretrainSettings, tokenizer: Any) -> PreTrainedModel:
    """A fresh CLIP text encoder sized by ``settings`` for ``tokenizer`` (seed the RNG before calling)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_hidden_size,
        intermediate_size=4 * settings.text_hidden_size,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads,
        max_position_embeddings=settings.max_prompt_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
    """Token ids (B, max_length), padded to the fixed length as the denoiser was trained with."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
