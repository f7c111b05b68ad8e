"""The embedded offline VIDEO toy world: real handwritten digits moving across a small canvas.

The video counterpart of the image toy (``sdpo.toy``), for ``sdpo demo --world video``. Everything
runs offline: the digits ship inside scikit-learn, the base model is a tiny diffusers
``CogVideoXTransformer3DModel`` or ``WanTransformer3DModel`` pretrained locally in a few CPU minutes
and cached, and the reward reuses the image toy's digit classifier and reward.

    config = VideoToyConfig(arch="wan")                # or "cogvideox" (the default)
    folder = pretrain_video_base(config)               # cached under $SDPO_CACHE or ~/.cache/sdpo
    spec = VideoToySpec.from_pretrained(folder)        # the ModelSpec of family "toy-video"
    prompts = video_prompts_for([7, 3], ["right", "up"])
    noise = make_video_noise(len(prompts), spec.media_format, seed=0)
    clips = sample_video(spec, spec.denoiser, prompts, noise)           # (2, F, 1, H, W)
    scores = video_reward(speed=config.speed)(clips, prompts)

The parts live in ``video_data`` (clips, prompts), ``video_model`` (config, pretraining, cache),
``video_spec`` (the ModelSpec), ``video_sampling`` (sampler, grids) and ``video_reward`` (reward,
quality measures); this module re-exports their public names and writes preference pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.toy.pairs import to_png, write_best_worst_pairs
from sdpo.toy.video_data import (
    DIRECTIONS,
    clip_directions,
    load_video_clips,
    parse_direction,
    parse_directions,
    parse_video_prompt,
    render_clips,
    video_prompt_for,
    video_prompts_for,
)
from sdpo.toy.video_model import (
    ToyCacheError,
    VideoToyConfig,
    check_video_folder,
    pretrain_video_base,
    video_base_folder,
)
from sdpo.toy.video_reward import (
    clip_velocity,
    digit_crops,
    motion_score,
    moved_direction,
    video_feature_distance,
    video_metrics,
    video_reward,
)
from sdpo.toy.video_sampling import (
    DEFAULT_VIDEO_GUIDANCE_SCALE,
    DEFAULT_VIDEO_STEPS,
    make_video_noise,
    sample_video,
    video_grid,
)
from sdpo.toy.video_spec import VideoToySpec, video_media_format

RewardFn = Callable[[Tensor, list[str]], Tensor]

__all__ = [
    "DEFAULT_VIDEO_GUIDANCE_SCALE",
    "DEFAULT_VIDEO_STEPS",
    "DIRECTIONS",
    "RewardFn",
    "ToyCacheError",
    "VideoToyConfig",
    "VideoToySpec",
    "check_video_folder",
    "clip_directions",
    "clip_velocity",
    "digit_crops",
    "generate_video_pairs",
    "load_video_clips",
    "make_video_noise",
    "motion_score",
    "moved_direction",
    "parse_direction",
    "parse_directions",
    "parse_video_prompt",
    "pretrain_video_base",
    "render_clips",
    "sample_video",
    "video_base_folder",
    "video_feature_distance",
    "video_grid",
    "video_media_format",
    "video_metrics",
    "video_prompt_for",
    "video_prompts_for",
    "video_reward",
    "write_clip_frames",
]


def write_clip_frames(clip: Tensor, folder: Path) -> None:
    """Write one clip (F, 1, H, W) in [-1, 1] as a frame folder: ``frame00.png``, ``frame01.png``, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(clip):
        to_png(frame, folder / f"frame{index:02d}.png")


def generate_video_pairs(
    spec: VideoToySpec,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    out_dir: str | Path,
    samples_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_VIDEO_STEPS,
    progress: bool = True,
    batch_size: int = 256,
    guidance_scale: float = DEFAULT_VIDEO_GUIDANCE_SCALE,
) -> Path:
    """Sample ``samples_per_prompt`` clips for each prompt and write (best, worst) pairs by ``reward_fn``.

    Each clip is a folder of PNG frames under ``out_dir/clips`` (a video format of the JSONL
    manifest); returns the path of ``pairs.jsonl``, whose lines also record both scores.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to form a pair, got {samples_per_prompt}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample pairs for")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    candidates = [p for p in prompts for _ in range(samples_per_prompt)]
    noise = make_video_noise(len(candidates), spec.media_format, seed)
    clips, scores = [], []
    starts = range(0, len(candidates), batch_size)
    for start in tqdm(starts, desc="sample video pairs", disable=not progress, unit="batch"):
        chunk = candidates[start : start + batch_size]
        batch = sample_video(spec, spec.denoiser, chunk, noise[start : start + batch_size],
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        clips.append(batch)
        scores.append(reward_fn(batch, chunk).float())
    shape = tuple(clips[0].shape[1:])
    clips_t = torch.cat(clips).reshape(len(prompts), samples_per_prompt, *shape)
    scores_t = torch.cat(scores).reshape(len(prompts), samples_per_prompt)

    return write_best_worst_pairs(prompts, clips_t, scores_t, out_dir, "clips", write_clip_frames)
