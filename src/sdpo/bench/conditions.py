"""The data conditions of `sdpo bench methods`: who generated the two members of each pair.

The policy trained is always the world's base model. What changes is where the pairs come from:

* ``on-policy``: best vs worst of K samples of the base itself (what ``sdpo demo`` trains on);
* ``off-policy-near``: the winner is the base's best sample, the loser the worst sample of a weaker
  generator (a briefly pretrained model of the same architecture, another seed): one member off-policy;
* ``off-policy-far``: both members come from the weaker generator, best vs worst (the Pick-a-Pic
  situation: the preference data was collected from other models than the one tuned).

Every condition goes through the library's stages (generate -> score -> pairs -> precompute), so a
condition's folder is what a user's own run would produce.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.errors import InputError

if TYPE_CHECKING:
    from sdpo.toy.world import World

CONDITIONS: dict[str, tuple[str, str]] = {
    "on-policy": ("base", "base"),
    "off-policy-near": ("base", "weak"),
    "off-policy-far": ("weak", "weak"),
}
"""Condition -> (generator of the winners, generator of the losers)."""

WEAK_STEPS_FRACTION = 0.15
"""The weaker generator is pretrained for this share of the base model's pretraining steps."""


def weak_overrides(base_overrides: dict[str, Any], base_steps: int, base_seed: int) -> dict[str, Any]:
    """Base-model config overrides of the weaker generator: fewer pretraining steps, another seed."""
    return {**base_overrides, "train_steps": max(1, round(base_steps * WEAK_STEPS_FRACTION)),
            "seed": base_seed + 1}


def samples_cache_of(cache: Path) -> Path:
    """Where ``condition_cache(..., samples=True)`` puts the labelled-samples cache beside the pairs cache."""
    return cache.with_name(cache.name + "-samples")


def condition_cache(
    condition: str,
    generators: dict[str, Path],
    world: World,
    folder: Path,
    *,
    prompts: list[str],
    per_prompt: int,
    seed: int,
    num_inference_steps: int,
    batch_size: int,
    progress: bool,
    samples: bool = False,
) -> Path:
    """The precompute cache of one condition's pairs (built under ``folder``, reused when complete).

    ``samples``: also a samples cache (``samples_cache_of``) of the same members unpaired, for Diffusion-KTO:
    per prompt the best 1/K of the winners' generator's candidates desirable and the worst 1/K of the
    losers' undesirable (K candidates a prompt; K = 2 or 4: exactly the pairs' members, never paired)."""
    from sdpo.data import precompute, read_pairs
    from sdpo.models.registry import load_spec
    from sdpo.stages.generate import SamplerSettings, generate
    from sdpo.stages.pairs import build_cross_pairs, build_pairs
    from sdpo.stages.score import score

    if condition not in CONDITIONS:
        raise InputError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    cache = folder / f"cache-{condition}"
    done = (cache / "manifest.json").is_file()  # written last: the cache is complete
    if done and (not samples or (samples_cache_of(cache) / "manifest.json").is_file()):
        return cache
    video = world.family == "toy-video"
    sampler = SamplerSettings(num_inference_steps, world.guidance_scale)
    candidates = {}
    for role in dict.fromkeys(CONDITIONS[condition]):
        out = folder / f"candidates-{role}"
        generate(load_spec(world.family, generators[role]), prompts, out, per_prompt=per_prompt, seed=seed,
                 sampler=sampler, batch_size=batch_size, progress=progress, frame_folders=video,
                 mp4=not video)
        score(out, [world.reward()], batch_size=batch_size, progress=progress)
        candidates[role] = out
    winners, losers = CONDITIONS[condition]
    spec = load_spec(world.family, generators["base"])
    if samples:
        _samples_cache(candidates[winners], candidates[losers], folder / f"samples-{condition}.jsonl",
                       samples_cache_of(cache), spec, per_prompt, video, batch_size, progress)
    if done:
        return cache
    pairs = folder / f"pairs-{condition}.jsonl"
    if winners == losers:
        build_pairs(candidates[winners], "best-worst", frames=video, out=pairs)
    else:
        build_cross_pairs(candidates[winners], candidates[losers], pairs, frames=video)
    return precompute(read_pairs(pairs), spec, cache, batch_size=batch_size, progress=progress, overwrite=True)


def _samples_cache(winners: Path, losers: Path, manifest: Path, cache: Path, spec: Any, per_prompt: int, video: bool,
                   batch_size: int, progress: bool) -> None:
    from sdpo.data import precompute_samples, read_samples
    from sdpo.stages.samples import build_cross_samples, build_samples

    share = 1 / per_prompt
    if winners == losers:
        build_samples(winners, "quantile", quantile=min(0.5, share), out=manifest, frames=video)
    else:
        build_cross_samples(winners, losers, manifest, quantile=min(0.5, share), frames=video)
    precompute_samples(read_samples(manifest), spec, cache, batch_size=batch_size, progress=progress, overwrite=True)
