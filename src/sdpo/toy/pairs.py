"""Preference pairs from the toy base model: sample several images per prompt, keep best vs worst.

The pairs are written in the library's JSONL pair format (PNG files beside a ``pairs.jsonl``), the
same format real datasets use, so the demo goes through the real precompute and training path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.data import PreferencePair, write_pairs_jsonl
from sdpo.toy.sampling import sample
from sdpo.toy.spec import ToySpec

RewardFn = Callable[[Tensor, list[str]], Tensor]


def to_png(image: Tensor, path: Path) -> None:
    """Write one (1, H, W) image in [-1, 1] as an 8-bit grey PNG."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(path)


def generate_pairs(
    spec: ToySpec,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    out_dir: str | Path,
    samples_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 512,
    num_inference_steps: int = 50,
    progress: bool = True,
) -> Path:
    """Sample ``samples_per_prompt`` candidates for each prompt, write (best, worst) pairs.

    Returns the path of ``pairs.jsonl``; each line also records both scores.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to form a pair, got {samples_per_prompt}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    fmt = spec.media_format
    shape = (fmt.channels, fmt.height, fmt.width)
    generator = torch.Generator().manual_seed(seed)
    candidates = [p for p in prompts for _ in range(samples_per_prompt)]
    noise = torch.randn((len(candidates), *shape), generator=generator)
    images, scores = [], []
    starts = range(0, len(candidates), batch_size)
    for start in tqdm(starts, desc="sample pairs", disable=not progress, unit="batch"):
        chunk = candidates[start : start + batch_size]
        batch = sample(spec, spec.denoiser, chunk, noise[start : start + batch_size],
                       num_inference_steps=num_inference_steps)
        images.append(batch)
        scores.append(reward_fn(batch, chunk))
    images = torch.cat(images).reshape(len(prompts), samples_per_prompt, *shape)
    scores = torch.cat(scores).reshape(len(prompts), samples_per_prompt)

    return write_best_worst_pairs(prompts, images, scores, out_dir, "images", lambda x, path: to_png(x, path),
                                  suffix=".png")


def write_best_worst_pairs(
    prompts: Sequence[str],
    samples: Tensor,
    scores: Tensor,
    out_dir: Path,
    subfolder: str,
    write: Callable[[Tensor, Path], None],
    suffix: str = "",
) -> Path:
    """Keep the best and worst of each prompt's candidates (samples (P, K, ...), scores (P, K)) as a pair.

    ``write(sample, path)`` stores one medium; the pairs go to ``out_dir/pairs.jsonl`` with both scores.
    """
    pairs = []
    for index, prompt in enumerate(prompts):
        best, worst = int(scores[index].argmax()), int(scores[index].argmin())
        chosen = f"{subfolder}/{index:05d}-chosen{suffix}"
        rejected = f"{subfolder}/{index:05d}-rejected{suffix}"
        write(samples[index, best], out_dir / chosen)
        write(samples[index, worst], out_dir / rejected)
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                                    metadata={"chosen_score": float(scores[index, best]),
                                              "rejected_score": float(scores[index, worst])}))
    path = out_dir / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path
