"""The tiny model configs the tests build, in one place (``from tiny_models import ...``: pytest puts
tests/ on sys.path). Each is small enough that building and a few training steps take about a second;
the values are what the tests were written against, so changing one changes what many tests check."""

from __future__ import annotations

from typing import Any

from sdpo.toy.digits.model import ToyModelConfig
from sdpo.toy.moving.model import VideoToyConfig

TINY_DIGITS: dict[str, Any] = dict(block_out_channels=(16, 32), attention_heads=2, norm_num_groups=8,
                                   text_hidden_size=16, train_steps=10, batch_size=32)
"""The digits base model of the session ``world`` fixture, the demo and the benches (as toy overrides)."""


def as_flags(settings: dict[str, Any]) -> list[str]:
    """``settings`` as the CLI's ``--toy KEY=VALUE`` words (tuples as YAML lists)."""
    def value(item: Any) -> str:
        return "[" + ",".join(map(str, item)) + "]" if isinstance(item, tuple) else str(item)

    return [f"{key}={value(item)}" for key, item in settings.items()]


TINY_DIGITS_FLAGS = as_flags(TINY_DIGITS)
"""``TINY_DIGITS`` as ``--toy`` words."""

TINY_IMAGE = ToyModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_heads=2, text_hidden_size=8,
                            text_heads=2, train_steps=20, batch_size=16, warmup_steps=2)
"""A still smaller digits base model, for tests that pretrain their own."""

# 3 frames of 10x10 (a digit moving 1 px per frame), patch 2: 75 video tokens, one block.
TINY_VIDEO: dict[str, Any] = {
    "frames": 3,
    "canvas": 10,
    "patch_size": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "time_embed_dim": 16,
    "text_hidden_size": 16,
    "train_steps": 3,
    "batch_size": 4,
    "warmup_steps": 1,
}
"""The moving-digits base model (either arch), as toy overrides."""


def tiny_video(arch: str, **overrides: Any) -> VideoToyConfig:
    """``TINY_VIDEO`` for ``arch`` ("cogvideox" or "wan"), with ``overrides``."""
    return VideoToyConfig(arch=arch, **{**TINY_VIDEO, **overrides})


TINY_COGVIDEOX_15: dict[str, Any] = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                         time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=8,
                                         sample_height=8, sample_frames=9, patch_size=2, patch_size_t=2,
                                         max_text_seq_length=16, use_rotary_positional_embeddings=True)
"""A CogVideoXTransformer3DModel with CogVideoX 1.5's temporal patches (``patch_size_t``)."""
