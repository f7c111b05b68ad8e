"""The embedded offline worlds: real 8x8 handwritten digits, still (``digits``) or moving (``moving``).

Everything loads without a network: the digits ship inside scikit-learn, each world's base model is
pretrained locally in a few CPU minutes and cached (``sdpo.toy.pretraining``), and the rewards are a
small classifier plus a style term fitted to the real digits at first use.

    folder = pretrain_base()                       # cached under $SDPO_CACHE or ~/.cache/sdpo
    spec = ToySpec.from_pretrained(folder)         # the ModelSpec of family "toy" (or "toy-video")
    prompts = prompts_for(range(10))
    digits = spec.sample(prompts, spec.initial_latents(len(prompts), seed=0),
                         num_inference_steps=25, guidance_scale=1.25)
    scores = digit_reward().score(digits, prompts)

Layout, from the bottom up: what both base models share, one job a module: ``base_models`` (the
networks and how they are saved), ``pretrain_settings`` (the shared config fields and cache key),
``text_encoder``, ``pretrain_loop`` and ``model_folder`` (a cached folder's place, contents and
checks); one folder per world with what differs: ``digits/`` (``data``, ``tokenizer``, the digit
prompts' tokenizer both worlds use, ``model``, ``reward``, ``world``) and ``moving/`` (``data``,
``model``, ``reward``, ``world``); between them ``pretraining`` (the cached pretraining of a config,
and ``PretrainedWorld``, the base of both worlds); above them ``world`` (the ``World`` protocol the
demo runs on and the lookup by name), ``spec`` (the one ModelSpec of both worlds, with their
sampler), ``grids`` and ``report`` (the demo's figures).
Heavy imports (torch, diffusers, transformers) happen when a name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_digit_images": "sdpo.toy.digits.data",
    "load_split": "sdpo.toy.digits.data",
    "split_indices": "sdpo.toy.digits.data",
    "prompt_for": "sdpo.toy.digits.data",
    "prompts_for": "sdpo.toy.digits.data",
    "parse_digit": "sdpo.toy.digits.data",
    "parse_digits": "sdpo.toy.digits.data",
    "ToyModelConfig": "sdpo.toy.digits.model",
    "pretrain_base": "sdpo.toy.pretraining",
    "base_folder": "sdpo.toy.model_folder",
    "digit_reward": "sdpo.toy.digits.reward",
    "digit_classifier": "sdpo.toy.digits.reward",
    "feature_distance": "sdpo.toy.digits.reward",
    "video_prompts_for": "sdpo.toy.moving.data",
    "load_video_clips": "sdpo.toy.moving.data",
    "VideoToyConfig": "sdpo.toy.moving.model",
    "moving_digit_reward": "sdpo.toy.moving.reward",
    "ToyCacheError": "sdpo.toy.model_folder",
    "default_cache_root": "sdpo.toy.model_folder",
    "ToySpec": "sdpo.toy.spec",
    "media_grid": "sdpo.toy.grids",
    "World": "sdpo.toy.world",
    "get_world": "sdpo.toy.world",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdpo.toy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
