"""Preference pairs from a toy base model: sample several candidates per prompt, keep best vs worst.

The pairs are written in the library's JSONL pair format (PNG images, or clips as folders of PNG
frames, beside a ``pairs.jsonl``), the format real datasets use, so the demo goes through the real
precompute and training path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.data import PreferencePair, write_pairs_jsonl
from sdpo.rewards import Reward
from sdpo.toy.spec import ToySpec


def to_png(image: Tensor, path: Path) -> None:
    """Write one (1, H, W) image in [-1, 1] as an 8-bit grey PNG."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(path)


def write_medium(medium: Tensor, path: Path) -> None:
    """One image (1, H, W) as a PNG file, or one clip (F, 1, H, W) as a folder of ``frame00.png``, ..."""
    if medium.ndim == 3:
        to_png(medium, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(medium):
        to_png(frame, path / f"frame{index:02d}.png")


def generate_pairs(
    spec: ToySpec,
    reward: Reward,
    prompts: Sequence[str],
    out_dir: str | Path,
    samples_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.25,
    progress: bool = True,
) -> Path:
    """Sample ``samples_per_prompt`` candidates for each prompt and write (best, worst) pairs by ``reward``.

    Returns the path of ``pairs.jsonl``; each line also records both scores.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to form a pair, got {samples_per_prompt}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample pairs for")
    video = spec.media_kind == "video"
    out_dir = Path(out_dir)
    subfolder, suffix = ("clips", "") if video else ("images", ".png")
    (out_dir / subfolder).mkdir(parents=True, exist_ok=True)
    candidates = [p for p in prompts for _ in range(samples_per_prompt)]
    fmt = spec.media_format
    shape = (fmt.channels, fmt.height, fmt.width) if fmt.frames is None else (fmt.frames, fmt.channels, fmt.height, fmt.width)
    noise = torch.randn((len(candidates), *shape), generator=torch.Generator().manual_seed(seed))
    batch_size = 256 if video else 512
    media, scores = [], []
    for start in tqdm(range(0, len(candidates), batch_size), desc="sample pairs", disable=not progress, unit="batch"):
        chunk = candidates[start : start + batch_size]
        batch = spec.sample(chunk, spec.encode_media(noise[start : start + batch_size]),
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        media.append(batch)
        scores.append(reward.score(batch, chunk).float())
    samples = torch.cat(media).reshape(len(prompts), samples_per_prompt, *shape)
    table = torch.cat(scores).reshape(len(prompts), samples_per_prompt)

    pairs = []
    for index, prompt in enumerate(prompts):
        best, worst = int(table[index].argmax()), int(table[index].argmin())
        chosen, rejected = (f"{subfolder}/{index:05d}-{role}{suffix}" for role in ("chosen", "rejected"))
        write_medium(samples[index, best], out_dir / chosen)
        write_medium(samples[index, worst], out_dir / rejected)
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                                    metadata={"chosen_score": float(table[index, best]),
                                              "rejected_score": float(table[index, worst])}))
    path = out_dir / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path
