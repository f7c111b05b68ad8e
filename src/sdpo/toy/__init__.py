"""The embedded offline toy world: real 8x8 handwritten digits, a small pretrained base model, a reward.

Everything loads without a network: the digits ship inside scikit-learn, the base model is
pretrained locally in a few CPU minutes and cached (``pretrain_base``), and the reward is a small
classifier plus a style term fitted to the real digits at first use.

    folder = pretrain_base()                       # cached under $SDPO_CACHE or ~/.cache/sdpo
    spec = ToySpec.from_pretrained(folder)         # the ModelSpec of family "toy"
    prompts = prompts_for(range(10))
    digits = sample(spec, spec.denoiser, prompts, make_noise(len(prompts), seed=0))
    scores = digit_reward()(digits, prompts)

Heavy imports (torch, diffusers, transformers) happen when a name is first used, so importing the
package itself is cheap. The moving-digit video world exports its names from ``sdpo.toy.video``;
what both worlds' base models share is in ``sdpo.toy.pretraining``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_digit_images": "sdpo.toy.data",
    "load_split": "sdpo.toy.data",
    "split_indices": "sdpo.toy.data",
    "prompt_for": "sdpo.toy.data",
    "prompts_for": "sdpo.toy.data",
    "parse_digit": "sdpo.toy.data",
    "parse_digits": "sdpo.toy.data",
    "ToyModelConfig": "sdpo.toy.base_model",
    "ToyCacheError": "sdpo.toy.pretraining",
    "pretrain_base": "sdpo.toy.base_model",
    "base_folder": "sdpo.toy.base_model",
    "default_cache_root": "sdpo.toy.base_model",
    "ToySpec": "sdpo.toy.spec",
    "sample": "sdpo.toy.sampling",
    "make_noise": "sdpo.toy.sampling",
    "image_grid": "sdpo.toy.sampling",
    "DEFAULT_GUIDANCE_SCALE": "sdpo.toy.sampling",
    "digit_reward": "sdpo.toy.reward",
    "digit_classifier": "sdpo.toy.reward",
    "feature_distance": "sdpo.toy.reward",
    "RewardFn": "sdpo.toy.reward",
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
