"""VideoAlign's VideoReward (registered as "videoreward"): Qwen2-VL with a linear head at reward tokens.

VideoReward (Liu et al. 2025, KwaiVGI/VideoAlign) is Qwen2-VL-2B fine-tuned to rate a generated clip.
Its prompt (VideoAlign's "detailed_special" template) asks for three ratings and ends each request with
a special token, ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``; a bias-free
``Linear(hidden_size, 1)`` (``rm_head``) read at the last hidden state of those three tokens gives
visual quality, motion quality and text alignment, in that order. VideoAlign then optionally
standardises each with the means / stds of its ``model_config.json`` ``inference_config``, and the
overall score is their sum. ``score`` returns the overall score; ``score_dimensions`` all four.

The frames are prepared here as tensor ops (no qwen-vl-utils): ``frames`` frames chosen evenly, resized
(bicubic) to multiples of ``patch * merge`` within ``max_pixels``, normalised with the processor's
mean / std, and cut into Qwen2-VL's flattened (temporal, spatial) patches.

Two model layouts load: VideoAlign's release (``huggingface-cli download KwaiVGI/VideoReward``:
``model_config.json`` + ``checkpoint-<step>/`` with ``model.pth`` or a LoRA + ``non_lora_state_dict.pth``),
applied to the base ``Qwen/Qwen2-VL-2B-Instruct`` folder (``base=``) with the reward tokens added to its
tokenizer and the LoRA merged; or a merged transformers ``Qwen2VLForConditionalGeneration`` folder with
the tokens in its tokenizer and a head file holding ``rm_head.weight`` (default ``rm_head.safetensors``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.rewards.loading import (
    RewardWeightsNotFoundError,
    in_batches,
    load_tokenizer,
    locate,
    parse_batch_size,
    parse_dtype,
)
from sdpo.rewards.video import frame_indices

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

VIDEOREWARD_HUB = "KwaiVGI/VideoReward"
BASE_HUB = "Qwen/Qwen2-VL-2B-Instruct"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CRITERIA = (
    "Visual Quality: the overall visual quality, with a focus on static factors: reasonableness (no "
    "biological or logical errors), clarity, detail richness, aesthetics and creativity, safety.\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
    "Motion Quality: the dynamic aspects: stability between frames, naturalness under physical laws, "
    "smooth and pleasing movement, natural fusion of moving elements with the background, clarity of "
    "motion, and amplitude (a largely static video scores low).\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
    "Text Alignment: how well the video matches the prompt in subject, motion, environment, style and "
    "camera movement.\nTextual prompt - {prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
)


def build_query(prompt: str) -> str:
    """The user turn: VideoAlign's three-criteria request, each ending in its reward token, in VQ, MQ, TA order.

    VideoReward was trained on VideoAlign's own wording; pass ``template`` to ``videoreward`` with that
    exact text (a ``{prompt}`` placeholder and the three tokens) to score as it was trained.
    """
    return ("You are tasked with evaluating a generated video based on three distinct criteria: Visual "
            "Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each, "
            "0 the worst and 10 the best, each independent of the others.\n\n" + _CRITERIA.format(prompt=prompt))


def chat_text(query: str, video_tokens: int) -> str:
    """Qwen2-VL's chat template for one user turn holding a video then the text, generation prompt added."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{'<|video_pad|>' * video_tokens}<|vision_end|>{query}<|im_end|>\n"
            "<|im_start|>assistant\n")


def fit_size(height: int, width: int, factor: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of ``factor``, aspect kept, area within [min, max] pixels."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def patchify(frames: Tensor, patch: int, merge: int, temporal: int) -> tuple[Tensor, Tensor]:
    """(T, C, H, W) normalised frames -> Qwen2-VL's flat patches (N, C*temporal*patch*patch) and grid (t, h, w).

    Patches are ordered frame pair, then merge window (row, column), then position in the window, as
    Qwen2-VL's processors lay them out (its patch merger groups each ``merge x merge`` run of rows).
    """
    if len(frames) % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - len(frames) % temporal, -1, -1, -1)])
    t, c, height, width = frames.shape
    gt, gh, gw = t // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), torch.tensor([gt, gh, gw])


class VideoReward:
    """VideoReward on (B, F, 3, H, W) clips in [-1, 1] (see the module docstring)."""

    name = "videoreward"
    media = "video"

    def __init__(self, model: PreTrainedModel, head: nn.Linear, tokenizer: PreTrainedTokenizerBase, *, frames: int = 8,
                 max_pixels: int = 200704, min_pixels: int = 3136, mean: tuple[float, ...] = CLIP_MEAN,
                 std: tuple[float, ...] = CLIP_STD, norm: dict[str, tuple[float, float]] | None = None,
                 template: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 2) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # VideoAlign keeps its head in float32 whatever the backbone's dtype.
        self.head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer, self.frames, self.norm, self.template = tokenizer, int(frames), norm, template
        self.max_pixels, self.min_pixels, self.mean, self.std = max_pixels, min_pixels, mean, std
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, parse_batch_size(batch_size)
        vision = model.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.token_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in self.token_ids:
            raise InputError(f"videoreward: the tokenizer lacks the reward tokens {', '.join(REWARD_TOKENS)}")

    def prepare_frames(self, clip: Tensor) -> Tensor:
        """One clip (F, 3, H, W) in [-1, 1] -> chosen, resized, normalised frames (T, 3, h, w)."""
        x = (clip[frame_indices(len(clip), self.frames)].float().clamp(-1, 1) + 1) / 2
        height, width = x.shape[-2:]
        size = fit_size(height, width, self.patch * self.merge, self.max_pixels, self.min_pixels)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def inputs(self, media: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids, attention mask, flat video patches and grids for one batch (right padded)."""
        patches, grids, texts = [], [], []
        for clip, prompt in zip(media, prompts, strict=True):
            flat, grid = patchify(self.prepare_frames(clip), self.patch, self.merge, self.temporal)
            patches.append(flat)
            grids.append(grid)
            query = self.template.format(prompt=prompt) if self.template else build_query(prompt)
            texts.append(chat_text(query, int(grid.prod()) // self.merge**2))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                 "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.stack(grids)}
        if "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters:
            # transformers 5 computes M-RoPE from these (0 text, 1 image, 2 video), as its processor returns them.
            batch["mm_token_type_ids"] = (tokens["input_ids"] == self.model.config.video_token_id).long() * 2
        return batch

    @torch.no_grad()
    def raw_dimensions(self, media: Tensor, prompts: list[str]) -> Tensor:
        """Head outputs (B, 3) at the VQ, MQ, TA tokens, unnormalised."""
        batch = self.inputs(media, prompts)
        ids = batch["input_ids"]
        batch = {k: v.to(self.device, self.dtype if v.is_floating_point() else None) for k, v in batch.items()}
        hidden = self.model.model(**batch).last_hidden_state
        mask = torch.isin(ids, torch.tensor(self.token_ids)).to(self.device)
        if (mask.sum(dim=1) != len(REWARD_TOKENS)).any():
            raise InputError("videoreward: each query must hold each reward token exactly once")
        return self.head(hidden[mask].float()).view(len(ids), len(REWARD_TOKENS))

    def score_dimensions(self, media: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """VQ, MQ, TA (standardised when the checkpoint has its inference means / stds) and Overall, each (B,)."""
        if media.ndim != 5 or media.shape[2] != 3:
            raise InputError(f"videoreward scores RGB videos (B, F, 3, H, W), got shape {tuple(media.shape)}")
        raw = in_batches(self.raw_dimensions, media, prompts, self.batch_size).view(len(media), 3)
        out = {}
        for i, key in enumerate(DIMENSIONS):
            mean, std = self.norm[key] if self.norm else (0.0, 1.0)
            out[key] = (raw[:, i] - mean) / std
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """The overall score VQ + MQ + TA (B,), float32 on the CPU."""
        return self.score_dimensions(media, prompts)["Overall"]


def read_norm(folder: Path) -> dict[str, tuple[float, float]] | None:
    """VideoAlign's ``inference_config`` means / stds from ``model_config.json``, if the folder has one."""
    path = folder / "model_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("inference_config") or {}
    if not all(f"{k}_mean" in config and f"{k}_std" in config for k in DIMENSIONS):
        return None
    return {k: (float(config[f"{k}_mean"]), float(config[f"{k}_std"])) for k in DIMENSIONS}


def load_head(path: Path, hidden_size: int) -> nn.Linear:
    """``rm_head`` (Linear(hidden, 1), no bias) from a safetensors / torch file holding ``rm_head.weight``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state.get("rm_head.weight", state.get("weight"))
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        raise InputError(f"videoreward: {path} holds no rm_head.weight of shape (1, {hidden_size})")
    head = nn.Linear(hidden_size, 1, bias=False)
    head.weight.data.copy_(weight)
    return head


def latest_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-<step>`` subfolder with the highest step (VideoAlign's training output), if any."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return max(found)[1] if found else None


def _plain_key(key: str) -> str:
    # PEFT wraps the model ("base_model.model.") and its modules (".base_layer", "modules_to_save.default").
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def videoalign_state(checkpoint: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights to set, LoRA deltas ``alpha / r * B @ A`` to add) of a VideoAlign ``checkpoint-<step>`` folder.

    Either a full ``model.pth``, or ``adapter_model.safetensors`` + ``adapter_config.json`` (the LoRA)
    with ``non_lora_state_dict.pth`` (the other trained weights: head, new token embeddings, ...).
    """
    full = checkpoint / "model.pth"
    if full.is_file():
        state = torch.load(full, map_location="cpu", weights_only=True)
        return {_plain_key(k): v for k, v in state.items()}, {}
    from safetensors.torch import load_file

    lora = load_file(str(checkpoint / "adapter_model.safetensors"))
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    deltas = {}
    for key, down in lora.items():
        if ".lora_A." in key:
            up = lora[key.replace(".lora_A.", ".lora_B.")]
            target = _plain_key(key.split(".lora_A.")[0] + ".weight")
            deltas[target] = scale * (up.float() @ down.float())
    extra = torch.load(checkpoint / "non_lora_state_dict.pth", map_location="cpu", weights_only=True)
    return {_plain_key(k): v for k, v in extra.items()}, deltas


def _model_key(key: str, keys: set[str]) -> str:
    """A VideoAlign (transformers 4.4x) key in this model's layout (5.x nests text and vision under model.)."""
    for candidate in (key, key.replace("model.", "model.language_model.", 1), "model." + key):
        if candidate in keys:
            return candidate
    raise InputError(f"videoreward: checkpoint weight {key!r} has no place in the Qwen2-VL model")


def apply_videoalign(backbone: nn.Module, checkpoint: Path) -> Tensor:
    """Load a VideoAlign checkpoint into ``backbone`` (LoRA merged in); returns the ``rm_head`` weight."""
    weights, deltas = videoalign_state(checkpoint)
    if "rm_head.weight" not in weights:
        raise InputError(f"videoreward: {checkpoint} holds no rm_head.weight")
    head = weights.pop("rm_head.weight")
    state = backbone.state_dict()
    keys = set(state)
    with torch.no_grad():
        for key, value in weights.items():
            state[_model_key(key, keys)].copy_(value)
        for key, delta in deltas.items():
            target = state[_model_key(key, keys)]
            target.copy_(target.float() + delta)
    return head


def videoreward(model: str | os.PathLike[str] = VIDEOREWARD_HUB, head: str | os.PathLike[str] | None = None,
                frames: int = 8, max_pixels: int = 200704, normalize: bool = True, template: str | None = None,
                device: str = "cpu", dtype: str | torch.dtype = "bf16", batch_size: int = 2,
                base: str | os.PathLike[str] = BASE_HUB) -> VideoReward:
    """VideoReward from ``model``: VideoAlign's own release folder (``model_config.json`` + ``checkpoint-*``,
    applied to the ``base`` Qwen2-VL-2B-Instruct folder), or a merged Qwen2-VL folder whose head is ``head``
    (default: its ``rm_head.safetensors``). Folders or cached hub ids."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = locate(model, reward="videoreward", what="model", hub_id=VIDEOREWARD_HUB)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        return _videoalign_reward(folder, checkpoint, base, frames=frames, max_pixels=max_pixels,
                                  normalize=normalize, template=template, device=device, dtype=dtype,
                                  batch_size=batch_size)
    head_path = locate(head, reward="videoreward", what="head") if head is not None else folder / "rm_head.safetensors"
    if not head_path.is_file():
        raise RewardWeightsNotFoundError(f"videoreward: no reward head file {head_path}; pass head=PATH")
    backbone = Qwen2VLForConditionalGeneration.from_pretrained(str(folder))
    preprocessor = folder / "preprocessor_config.json"
    stats = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    return VideoReward(backbone, load_head(head_path, backbone.config.text_config.hidden_size),
                       load_tokenizer(folder, "videoreward"), frames=frames, max_pixels=max_pixels,
                       mean=tuple(stats.get("image_mean", CLIP_MEAN)), std=tuple(stats.get("image_std", CLIP_STD)),
                       norm=read_norm(folder) if normalize else None, template=template, device=device,
                       dtype=parse_dtype(dtype), batch_size=batch_size)


def _videoalign_reward(folder: Path, checkpoint: Path, base: str | os.PathLike[str], **options) -> VideoReward:
    """VideoAlign's release: the base model and tokenizer plus the reward tokens, then the checkpoint."""
    from transformers import Qwen2VLForConditionalGeneration

    base_dir = locate(base, reward="videoreward", what="base model", hub_id=BASE_HUB)
    tokenizer = load_tokenizer(base_dir, "videoreward")
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    tokenizer.padding_side = "right"
    backbone = Qwen2VLForConditionalGeneration.from_pretrained(str(base_dir))
    backbone.resize_token_embeddings(len(tokenizer))
    hidden = backbone.config.text_config.hidden_size
    head = nn.Linear(hidden, 1, bias=False)
    head.weight.data.copy_(apply_videoalign(backbone, checkpoint).view(1, hidden))
    preprocessor = base_dir / "preprocessor_config.json"
    stats = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    return VideoReward(backbone, head, tokenizer, frames=options["frames"], max_pixels=options["max_pixels"],
                       mean=tuple(stats.get("image_mean", CLIP_MEAN)), std=tuple(stats.get("image_std", CLIP_STD)),
                       norm=read_norm(folder) if options["normalize"] else None, template=options["template"],
                       device=options["device"], dtype=parse_dtype(options["dtype"]), batch_size=options["batch_size"])
