"""Test-wide settings: nothing may reach a model hub, and torch stays on one thread."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import TINY_DIGITS  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread beats two, and far more so on a busy machine




@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """(tiny digits base-model folder, a precomputed cache of 20 of its best-vs-worst pairs), built once
    for the training and reliability tests, which only read them."""
    from sdpo.data import precompute, read_pairs
    from sdpo.stages.generate import SamplerSettings, generate
    from sdpo.stages.pairs import build_pairs
    from sdpo.stages.score import score
    from sdpo.toy import ToyModelConfig, ToySpec, digit_reward, pretrain_base, prompts_for

    root = tmp_path_factory.mktemp("world")
    base = pretrain_base(ToyModelConfig(**TINY_DIGITS), cache_root=root / "models", progress=False)
    spec = ToySpec.from_pretrained(base)
    # The same stages a user runs: 2 candidates for each of 20 prompts, scored, best vs worst.
    generate(spec, prompts_for(list(range(10)) * 2), root / "candidates", per_prompt=2,
             sampler=SamplerSettings(num_inference_steps=4, guidance_scale=1.25), batch_size=64, progress=False)
    score(root / "candidates", [digit_reward()], progress=False)
    pairs = build_pairs(root / "candidates")
    cache = precompute(read_pairs(pairs.out), spec, root / "cache", progress=False)
    return base, cache
