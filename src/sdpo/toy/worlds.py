"""The demo's two embedded worlds behind one interface: still digits, and moving-digit clips.

`sdpo.demo` runs every stage through a `World`, so the image and video demos share one pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

WORLDS = ("image", "video")


@dataclass
class World:
    """What the demo needs from an embedded world."""

    name: str
    pretrain: Callable[[str | None, bool], Path]
    """(cache root, progress) -> the cached base-model folder."""
    load_spec: Callable[[Path], Any]
    """Folder -> a fresh ModelSpec."""
    prompts: Callable[[int], list[str]]
    """Samples per digit -> prompts, digit-major (10 blocks)."""
    sample: Callable[..., Tensor]
    """(spec, model, prompts, noise, num_inference_steps, progress) -> samples."""
    reward: Callable[[], Callable[[Tensor, list[str]], Tensor]]
    """-> the reward function."""
    feature_distance: Callable[[Tensor, Tensor], float]
    """(samples, real) -> Fréchet distance in classifier features."""
    real: Callable[[str], Tensor]
    """Split name -> real samples."""
    generate_pairs: Callable[..., Path]
    """(spec, reward, prompts, out_dir, samples_per_prompt, seed, num_inference_steps, progress) -> pairs.jsonl."""
    grid: Callable[[Tensor, int, Path], None]
    """(samples, per_digit, path) -> write a PNG of the first samples of each digit."""


def _image_world(overrides: dict) -> World:
    from sdpo.toy.base_model import ToyModelConfig, pretrain_base
    from sdpo.toy.data import load_split, prompts_for
    from sdpo.toy.pairs import generate_pairs
    from sdpo.toy.reward import digit_reward, feature_distance
    from sdpo.toy.sampling import image_grid, sample
    from sdpo.toy.spec import ToySpec

    def grid(samples: Tensor, per_digit: int, path: Path) -> None:
        shown = min(8, per_digit)
        rows = samples.reshape(10, per_digit, *samples.shape[1:])[:, :shown]
        image_grid(rows.reshape(-1, *samples.shape[1:]), nrow=shown).save(path)

    return World(
        name="image",
        pretrain=lambda root, progress: pretrain_base(ToyModelConfig(**overrides), root, progress),
        load_spec=ToySpec.from_pretrained,
        prompts=lambda per_digit: prompts_for([d for d in range(10) for _ in range(per_digit)]),
        sample=lambda spec, model, prompts, noise, steps, progress: sample(
            spec, model, prompts, noise, num_inference_steps=steps, progress=progress),
        reward=digit_reward,
        feature_distance=feature_distance,
        real=lambda split: load_split(split)[0],
        generate_pairs=generate_pairs,
        grid=grid,
    )


def _video_world(overrides: dict) -> World:
    from sdpo.toy.video import (
        VideoToyConfig,
        VideoToySpec,
        generate_video_pairs,
        load_video_clips,
        pretrain_video_base,
        sample_video,
        video_feature_distance,
        video_grid,
        video_prompts_for,
        video_reward,
    )

    model_config = VideoToyConfig(**overrides)

    def prompts(per_digit: int) -> list[str]:
        digits = [d for d in range(10) for _ in range(per_digit)]
        return video_prompts_for(digits, [i % 4 for i in range(len(digits))])

    def grid(samples: Tensor, per_digit: int, path: Path) -> None:
        shown = min(2, per_digit)
        clips = samples.reshape(10, per_digit, *samples.shape[1:])[:, :shown]
        video_grid(clips.reshape(-1, *samples.shape[1:]), nrow=shown).save(path)

    return World(
        name="video",
        pretrain=lambda root, progress: pretrain_video_base(model_config, root, progress),
        load_spec=VideoToySpec.from_pretrained,
        prompts=prompts,
        sample=lambda spec, model, prompts, noise, steps, progress: sample_video(
            spec, model, prompts, noise, num_inference_steps=steps, progress=progress),
        reward=lambda: video_reward(speed=model_config.speed),
        feature_distance=video_feature_distance,
        real=lambda split: load_video_clips(split, frames=model_config.frames, canvas=model_config.canvas,
                                            speed=model_config.speed)[0],
        generate_pairs=generate_video_pairs,
        grid=grid,
    )


def get_world(name: str, overrides: dict | None = None) -> World:
    """The named world ("image" or "video") with base-model config overrides; imported only when chosen."""
    if name == "image":
        return _image_world(overrides or {})
    if name == "video":
        return _video_world(overrides or {})
    raise ValueError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
