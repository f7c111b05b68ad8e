"""The toy world's base model: a small text-conditioned UNet pretrained on the 8x8 digits.

``pretrain_base`` trains a diffusers ``UNet2DConditionModel`` and a tiny ``CLIPTextModel`` together,
from scratch, on prompts such as "a handwritten digit 7", and writes a diffusers-style folder
(``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``ToySpec.from_pretrained`` loads,
like any Stable Diffusion folder without a VAE (the 8x8 pixels are the latents).

The folder is cached under ``$SDPO_CACHE`` (or ``~/.cache/sdpo``) by a hash of the config, written
to a temporary sibling and renamed into place only when complete, so an interrupted run never
leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.toy.data import DIGIT_WORDS, IMAGE_SIZE, NUM_CLASSES, PROMPT_TEMPLATE, load_split, prompts_for
from sdpo.toy.pretraining import (
    MARKER_FILE,
    PretrainSettings,
    build_text_encoder,
    corrupt_folder_error,
    pretrain,
    pretrain_into_cache,
)

FORMAT_VERSION = 2
"""Bumped whenever the folder layout or the training recipe changes, so old caches are not reused."""
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Files that must exist in a complete folder; weights are checked further when read.
REQUIRED_FILES = (
    MARKER_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "scheduler/scheduler_config.json",
)


@dataclass(frozen=True)
class ToyModelConfig(PretrainSettings):
    """Size and training recipe of the toy base model. Every field is part of the cache key."""

    block_out_channels: tuple[int, ...] = (32, 64)
    """UNet channels per resolution level (8x8, then 4x4, ...)."""
    full_resolution_attention: bool = False
    """Give the 8x8 level attention too; lower levels and the middle block always have it. Off by
    default: on two CPU cores it triples the step time for little gain on 8x8 digits."""
    layers_per_block: int = 1
    """ResNet (+ transformer) layers per UNet level."""
    attention_heads: int = 4
    """Attention heads in the UNet's transformer blocks (diffusers' ``attention_head_dim``)."""
    norm_num_groups: int = 8
    """GroupNorm groups in the UNet; must divide every entry of ``block_out_channels``."""
    beta_schedule: str = "squaredcos_cap_v2"
    """DDPM beta schedule; the cosine schedule keeps more signal at mid t, which 8x8 images need."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" or "v_prediction"."""

    def __post_init__(self) -> None:
        channels = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", channels)
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"block_out_channels must be positive integers, got {self.block_out_channels}")
        # Each level but the last halves the resolution; 8 -> 4 -> 2 -> 1 is the deepest possible.
        if len(channels) > 4:
            raise ValueError(f"at most 4 UNet levels fit an 8x8 image, got {len(channels)}")
        if self.norm_num_groups <= 0 or any(c % self.norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels {channels}")
        if self.attention_heads <= 0 or any(c % self.attention_heads for c in channels):
            raise ValueError(f"attention_heads={self.attention_heads} must divide every block_out_channels {channels}")
        if int(self.layers_per_block) <= 0:
            raise ValueError(f"layers_per_block must be positive, got {self.layers_per_block}")
        self.check_pretrain_settings()
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")

    def hash_header(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION}


@dataclass
class _Models:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    history: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ building
def vocabulary() -> list[str]:
    """The tokenizer's words: special tokens, the words of the prompt template and the ten numerals."""
    template_words = PROMPT_TEMPLATE.replace("{digit}", "").split()
    words = [*SPECIAL_TOKENS, *template_words, *(str(d) for d in range(NUM_CLASSES))]
    return list(dict.fromkeys(words))


def build_tokenizer(max_length: int) -> Any:
    """A word-level fast tokenizer: lower-cased, whitespace split, [BOS] ... [EOS], padded with [PAD].

    Digit words are rewritten to numerals before the split ("seven" -> "7"), so the model, trained
    on numerals only, understands every prompt ``parse_digit`` accepts.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            *(normalizers.Replace(Regex(rf"\b{word}\b"), str(d)) for d, word in enumerate(DIGIT_WORDS)),
        ]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
    )


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
    """Token ids (B, max_length), padded to the fixed length as the UNet was trained with."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def build_models(config: ToyModelConfig) -> _Models:
    """Freshly initialised UNet, text encoder, tokenizer and scheduler for ``config`` (seeded)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    tokenizer = build_tokenizer(config.max_prompt_tokens)
    levels = len(config.block_out_channels)
    first_down = "CrossAttnDownBlock2D" if config.full_resolution_attention else "DownBlock2D"
    last_up = "CrossAttnUpBlock2D" if config.full_resolution_attention else "UpBlock2D"
    # Initialise under a private RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        text_encoder = build_text_encoder(config, tokenizer)
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE,
            in_channels=1,
            out_channels=1,
            down_block_types=(first_down, *("CrossAttnDownBlock2D",) * (levels - 1)),
            up_block_types=(*("CrossAttnUpBlock2D",) * (levels - 1), last_up),
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=config.text_hidden_size,
            attention_head_dim=config.attention_heads,  # diffusers' name for the number of heads
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
    )
    return _Models(unet, text_encoder, tokenizer, scheduler)


# ------------------------------------------------------------------------------------------ training
def _train(config: ToyModelConfig, models: _Models, progress: bool) -> None:
    from sdpo.schedules import NoiseSchedule

    images, labels = load_split("train")
    ids_by_image = tokenize(models.tokenizer, prompts_for(labels), config.max_prompt_tokens)
    empty_ids = tokenize(models.tokenizer, [""], config.max_prompt_tokens)[0]
    schedule = NoiseSchedule.from_scheduler(models.scheduler)

    def batch_loss(batch: Tensor, generator: torch.Generator) -> Tensor:
        x0 = images[batch]
        ids = ids_by_image[batch].clone()
        ids[torch.rand(len(batch), generator=generator) < config.prompt_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = schedule.sample_timesteps(len(batch), generator=generator)
        hidden = models.text_encoder(ids).last_hidden_state
        prediction = models.unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        return torch.nn.functional.mse_loss(prediction, schedule.target(x0, noise, t))

    pretrain(config, [models.unet, models.text_encoder], len(images), batch_loss, models.history,
             "pretraining toy base", progress)


# ------------------------------------------------------------------------------------------ cache
def default_cache_root() -> Path:
    """``$SDPO_CACHE`` if set, else ``~/.cache/sdpo``."""
    env = os.environ.get("SDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdpo"


def base_folder(config: ToyModelConfig, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the base model for ``config`` is (or will be) cached."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"toy-base-{config.short_hash()}"


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``sdpo_toy.json`` of a toy folder; ToyCacheError if missing, unreadable or incomplete."""
    folder = Path(folder)
    path = folder / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} is missing or not valid JSON ({type(error).__name__})") from error
    if not isinstance(marker, dict) or marker.get("complete") is not True or "config" not in marker:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} does not mark a completed pretraining")
    return marker


def check_folder(folder: str | os.PathLike[str], config: ToyModelConfig | None = None) -> dict[str, Any]:
    """Validate a toy base folder without loading the models; returns its marker.

    Checks the marker, that every required file exists, that the weight files have readable
    safetensors headers whose sizes match the files (a truncated copy fails), and, given
    ``config``, that the folder was trained with it. Raises ToyCacheError otherwise.
    """
    from safetensors import safe_open

    folder = Path(folder)
    marker = read_marker(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise corrupt_folder_error(folder, f"missing {', '.join(missing)}")
    for name in REQUIRED_FILES:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), framework="pt") as handle:
                    if not list(handle.keys()):
                        raise ValueError("no tensors")
            except Exception as error:  # noqa: BLE001 - any read failure means the file is damaged
                raise corrupt_folder_error(folder, f"{name} is unreadable ({type(error).__name__})") from error
        elif name.endswith(".json"):
            try:
                json.loads((folder / name).read_text())
            except ValueError as error:
                raise corrupt_folder_error(folder, f"{name} is not valid JSON") from error
    if config is not None:
        try:
            stored = ToyModelConfig.from_dict(marker["config"])
        except (TypeError, ValueError) as error:
            raise corrupt_folder_error(folder, f"{MARKER_FILE} holds an invalid config ({error})") from error
        if stored != config:
            raise corrupt_folder_error(folder, f"{MARKER_FILE} holds a different config than its name's hash")
    return marker


def save_models(models: _Models, folder: Path) -> None:
    """Write the four diffusers subfolders."""
    models.unet.save_pretrained(folder / "unet")
    models.text_encoder.save_pretrained(folder / "text_encoder")
    models.tokenizer.save_pretrained(folder / "tokenizer")
    models.scheduler.save_pretrained(folder / "scheduler")


def pretrain_base(
    config: ToyModelConfig | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the pretrained toy base model for ``config``, training it on first use.

    A complete cached folder is reused as it is. Otherwise the model is trained on the train split
    of the digits and written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted run leaves nothing behind that could be mistaken for a finished model.
    Raises ToyCacheError when the folder exists but is damaged.
    """
    config = config or ToyModelConfig()

    def train_and_save(folder: Path) -> list[float]:
        models = build_models(config)
        _train(config, models, progress)
        save_models(models, folder)
        return models.history

    return pretrain_into_cache(base_folder(config, cache_root), config, train_and_save,
                               lambda folder: check_folder(folder, config))
