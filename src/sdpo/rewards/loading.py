"""What every learned reward shares: finding its weights offline, device/dtype options, CLIP preprocessing.

Weights come from a local folder or file the user names; a hub id is accepted only when it is already in
the local Hugging Face cache (a reward never downloads: scoring runs on machines that often have no hub
access, and a silent multi-GB download in the middle of `sdpo score` is worse than a clear error).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.errors import InputError
from sdpo.models.base import ModelNotFoundError, resolve_pretrained

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXTRA_HINT = 'pip install -e ".[rewards]"'
"""The optional extra every learned reward needs (named in every missing-weights message)."""

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


class RewardWeightsNotFoundError(ModelNotFoundError):
    """A reward's weights are neither a local path nor cached; the message says what to download."""


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # resolve_pretrained downloads unless HF_HUB_OFFLINE is set; a reward must only ever use the cache.
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def locate(value: str | os.PathLike[str], *, reward: str, what: str, hub_id: str | None = None,
           url: str | None = None) -> Path:
    """The local path of ``value`` (a file, a folder, or a hub id already in the local cache).

    ``hub_id`` / ``url`` name where the published weights live, for the one-line error.
    """
    text = str(value)
    if os.path.exists(text):
        return Path(text)
    try:
        with _hub_offline():
            return Path(resolve_pretrained(text))
    except ModelNotFoundError as error:
        source = hub_id or text
        how = (f"`huggingface-cli download {source}`" if url is None else f"it from {url}")
        raise RewardWeightsNotFoundError(
            f"{reward}: {what} {text!r} is neither a local path nor in the local Hugging Face cache; "
            f"download {how}, pass its local path, and install the extra: {EXTRA_HINT}"
        ) from error


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return _DTYPES[str(dtype).lower()]


def parse_batch_size(batch_size: int) -> int:
    """A positive batch size, or one clear line."""
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return int(batch_size)


def in_batches(fn: Callable[[Tensor, list[str]], Tensor], media: Tensor, prompts: list[str],
               batch_size: int) -> Tensor:
    """``fn`` over slices of ``batch_size`` samples, concatenated as float32 on the CPU."""
    if len(media) != len(prompts):
        raise InputError(f"got {len(media)} samples but {len(prompts)} prompts")
    out = [fn(media[i:i + batch_size], prompts[i:i + batch_size]).float().cpu()
           for i in range(0, len(media), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def check_images(media: Tensor, reward: str) -> None:
    """Refuse anything but a (B, 3, H, W) batch with one line."""
    if media.ndim != 4 or media.shape[1] != 3:
        raise InputError(f"{reward} scores RGB images (B, 3, H, W) in [-1, 1], got shape {tuple(media.shape)}")


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing as batched tensor ops (pixels in [-1, 1] in, normalised pixels out).

    Mirrors ``CLIPImageProcessor``: resize the shortest side to ``size`` (bicubic), center-crop to
    ``crop``, normalise by ``mean`` / ``std``. Read from a processor folder's ``preprocessor_config.json``.
    """

    size: int = 224
    """Shortest side after resizing."""
    crop: tuple[int, int] = (224, 224)
    """(height, width) of the center crop."""
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    """Per-channel mean subtracted from pixels in [0, 1] (CLIP's)."""
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    """Per-channel standard deviation divided out (CLIP's)."""

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> ClipPreprocess:
        """Read ``preprocessor_config.json`` (the defaults where a key is absent)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        config: dict[str, Any] = json.loads(path.read_text())
        size_field = config.get("size", 224)
        size: Any = (size_field.get("shortest_edge", size_field.get("height", 224)) if isinstance(size_field, dict)
                else size_field)
        crop = config.get("crop_size", size)
        crop_size = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), (int(crop_size[0]), int(crop_size[1])), tuple(config.get("image_mean", cls.mean)),
                   tuple(config.get("image_std", cls.std)))

    def __call__(self, media: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, crop_h, crop_w) normalised, float32."""
        x = (media.float().clamp(-1, 1) + 1) / 2
        height, width = x.shape[-2:]
        short, long = min(height, width), max(height, width)
        if short != self.size:
            new_long = int(self.size * long / short)
            shape = (self.size, new_long) if height <= width else (new_long, self.size)
            x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top = max((x.shape[-2] - self.crop[0]) // 2, 0)
        left = max((x.shape[-1] - self.crop[1]) // 2, 0)
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def pooled(output: object) -> Tensor:
    """The embedding tensor from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(output, Tensor):
        return output
    return output.pooler_output  # type: ignore[attr-defined]


def load_tokenizer(folder: Path, reward: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder`` (any transformers tokenizer class), or one clear line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise RewardWeightsNotFoundError(f"{reward}: no tokenizer in {folder} ({error.__class__.__name__})") from error
