"""The offline toy world: digits data, the cached tiny base model, its ModelSpec, sampling, the reward."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import TINY_IMAGE

from sdpo.models.base import MediaFormat, ModelNotFoundError, ModelSpec
from sdpo.rewards import Reward, load_reward
from sdpo.toy.digits import model as base_model
from sdpo.toy.digits.data import (
    load_digit_images,
    load_split,
    parse_digit,
    parse_digits,
    prompt_for,
    prompts_for,
    split_indices,
)
from sdpo.toy.digits.model import ToyModelConfig
from sdpo.toy.digits.reward import digit_reward, feature_distance, thickness_score
from sdpo.toy.grids import media_grid
from sdpo.toy.model_folder import ToyCacheError, base_folder
from sdpo.toy.pretraining import pretrain_base
from sdpo.toy.spec import ToySpec

TINY = TINY_IMAGE  # small enough that building, 20 steps of training and saving take about a second


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tensors are tiny: a second thread only adds OpenMP barriers, and on a shared 2-core
    # machine those stall (measured 10-20x slower than one thread under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):
    return pretrain_base(TINY, cache_root=tmp_path_factory.mktemp("toy-cache"), progress=False)


@pytest.fixture(scope="module")
def spec(tiny_folder) -> ToySpec:
    return ToySpec.from_pretrained(tiny_folder)


# ------------------------------------------------------------------------------------------ data
def test_digit_images_have_the_media_convention():
    images, labels = load_digit_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_split_is_fixed_disjoint_complete_and_stratified():
    train, held_out = split_indices()
    assert not set(train.tolist()) & set(held_out.tolist())
    assert len(train) + len(held_out) == 1797
    assert torch.equal(split_indices()[1], held_out)
    _, held_labels = load_split("held_out")
    counts = torch.bincount(held_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of 174..183 per class
    with pytest.raises(ValueError, match="unknown split"):
        load_split("test")


def test_prompts_round_trip_and_parse():
    assert prompt_for(7) == "a handwritten digit 7"
    assert parse_digits(prompts_for(torch.arange(10))).tolist() == list(range(10))
    assert parse_digit("A handwritten digit SEVEN") == 7
    assert parse_digit("digit 3, please") == 3
    with pytest.raises(ValueError, match="names no digit"):
        parse_digit("a handwritten letter")
    with pytest.raises(ValueError, match="several digits"):
        parse_digit("a 3 or an 8")
    with pytest.raises(ValueError):
        parse_digit("digit 12")
    with pytest.raises(ValueError):
        prompt_for(10)


# ------------------------------------------------------------------------------------------ config and cache
def test_config_validation_and_hash():
    with pytest.raises(ValueError, match="norm_num_groups"):
        ToyModelConfig(block_out_channels=(12, 24), norm_num_groups=8)
    with pytest.raises(ValueError, match="prompt_dropout"):
        ToyModelConfig(prompt_dropout=1.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        ToyModelConfig(beta_schedule="cosine")
    assert ToyModelConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.short_hash() != ToyModelConfig(**{**TINY.to_dict(), "seed": 1}).short_hash()
    with pytest.raises(ValueError, match="unknown"):
        ToyModelConfig.from_dict({"nonsense": 1})


def test_pretrain_base_writes_a_diffusers_folder_and_reuses_it(tiny_folder, monkeypatch):
    assert tiny_folder.name == f"toy-base-{TINY.short_hash()}"
    for name in ("unet/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (tiny_folder / name).is_file()
    marker = json.loads((tiny_folder / "sdpo_toy.json").read_text())
    assert marker["complete"] is True and ToyModelConfig.from_dict(marker["config"]) == TINY
    mtime = (tiny_folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached base model must not be retrained")

    monkeypatch.setattr(base_model, "train_base", no_training)
    assert pretrain_base(TINY, cache_root=tiny_folder.parent, progress=False) == tiny_folder
    assert (tiny_folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_tokenizer_loads_with_transformers(tiny_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder / "tokenizer")
    ids = tokenizer(["a handwritten digit 7", ""], padding="max_length", max_length=8).input_ids
    assert ids[0][0] == tokenizer.bos_token_id and ids[0][5] == tokenizer.eos_token_id
    assert ids[1][:3] == [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.unk_token_id not in ids[0]
    # Digit words become numerals, so every prompt parse_digit accepts means the same to the model.
    assert tokenizer(["A handwritten digit Seven"], padding="max_length", max_length=8).input_ids[0] == ids[0]


def test_interrupted_pretraining_leaves_nothing(tmp_path, monkeypatch):
    def crash(config, models, progress):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(base_model, "train_base", crash)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain_base(TINY, cache_root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("damage", ["missing_weights", "bad_marker", "truncated_weights", "incomplete_marker"])
def test_corrupt_cache_is_reported_with_its_folder(tiny_folder, tmp_path, damage):
    folder = _copy(tiny_folder, tmp_path)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    if damage == "missing_weights":
        weights.unlink()
    elif damage == "bad_marker":
        (folder / "sdpo_toy.json").write_text("{not json")
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        (folder / "sdpo_toy.json").write_text(json.dumps({"config": TINY.to_dict(), "complete": False}))
    with pytest.raises(ToyCacheError, match="delete it") as caught:
        pretrain_base(TINY, cache_root=tmp_path, progress=False)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ToyCacheError):
        ToySpec.from_pretrained(folder)


def test_default_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SDPO_CACHE", str(tmp_path))
    assert base_folder(TINY).parent == tmp_path


# ------------------------------------------------------------------------------------------ spec
def test_spec_loads_encodes_and_predicts(spec, tiny_folder):
    assert isinstance(spec, ModelSpec)
    assert spec.family == "toy" and spec.pretrained == str(tiny_folder) and spec.denoiser is spec.unet
    assert spec.media_format == MediaFormat(channels=1, height=8, width=8)
    assert spec.schedule.num_timesteps == 1000 and spec.schedule.prediction_type == "epsilon"
    conditions = spec.encode_prompts(prompts_for([3, 1, 4]))
    assert conditions["encoder_hidden_states"].shape == (3, TINY.max_prompt_tokens, TINY.text_hidden_size)
    pixels = load_split("held_out")[0][:3]
    latents = spec.encode_media(pixels)
    assert torch.equal(latents, pixels)
    with pytest.raises(ValueError, match="shape"):
        spec.encode_media(torch.zeros(3, 3, 8, 8))
    t = spec.schedule.model_timestep(torch.tensor([0, 500, 999]))
    with torch.no_grad():
        prediction = spec.predict(spec.denoiser, latents, t, conditions)
    assert prediction.shape == latents.shape and torch.isfinite(prediction).all()


def test_spec_loading_errors(tmp_path, tiny_folder):
    with pytest.raises(ModelNotFoundError, match="not found"):
        ToySpec.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="only handles"):
        ToySpec.from_pretrained(tiny_folder, media_format=MediaFormat(3, 8, 8))
    with pytest.raises(ToyCacheError, match="delete it"):
        ToySpec.from_pretrained(tmp_path)  # a folder without a marker


def test_spec_without_text_encoder(tiny_folder):
    bare = ToySpec.from_pretrained(tiny_folder, load_text_encoder=False, load_vae=False)
    assert bare.text_encoder is None
    with pytest.raises(RuntimeError, match="load_text_encoder"):
        bare.encode_prompts(["a handwritten digit 1"])


def _lora_inputs(spec):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((4, 1, 8, 8), generator=generator)
    t = spec.schedule.model_timestep(torch.tensor([10, 200, 600, 990]))
    return latents, t, spec.encode_prompts(prompts_for([0, 2, 5, 9]))


def test_lora_add_disable_save_and_reload(tiny_folder, tmp_path):
    import peft
    from diffusers import StableDiffusionPipeline

    spec = ToySpec.from_pretrained(tiny_folder)  # a private copy: adapters are added to it
    targets = spec.lora_target_modules()
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= set(targets)
    # lora_alpha != r, so a reload that forgot the scale would give different predictions.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")
    spec.denoiser.add_adapter(config)
    with torch.no_grad():  # B starts at zero; make the adapters act
        for name, parameter in spec.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    latents, t, conditions = _lora_inputs(spec)
    with torch.no_grad():
        tuned = spec.predict(spec.denoiser, latents, t, conditions)
        spec.denoiser.disable_adapters()
        base = spec.predict(spec.denoiser, latents, t, conditions)
        spec.denoiser.enable_adapters()
    assert not torch.allclose(tuned, base, atol=1e-4)

    spec.save_lora(tmp_path / "lora", spec.denoiser)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ValueError, match="save_lora"):
        spec.save_full(tmp_path / "full", spec.denoiser)

    fresh = ToySpec.from_pretrained(tiny_folder)
    # The path StableDiffusionPipeline.load_lora_weights takes.
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path / "lora", return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas=alphas, unet=fresh.unet, metadata=metadata)
    with torch.no_grad():
        reloaded = fresh.predict(fresh.denoiser, latents, t, conditions)
    torch.testing.assert_close(reloaded, tuned, rtol=1e-4, atol=1e-5)
    # The spec's own load_lora takes the same path.
    again = ToySpec.from_pretrained(tiny_folder)
    again.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(again.predict(again.denoiser, latents, t, conditions), tuned, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        again.load_lora(tmp_path)


def test_save_full_round_trips(spec, tmp_path):
    from diffusers import UNet2DConditionModel

    spec.save_full(tmp_path, spec.denoiser)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    latents, t, conditions = _lora_inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(spec.predict(unet, latents, t, conditions), spec.predict(spec.denoiser, latents, t, conditions))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        spec.save_lora(tmp_path / "lora", spec.denoiser)


# ------------------------------------------------------------------------------------------ sampling
def test_initial_latents_depend_on_seed_and_index_only(spec):
    latents = spec.initial_latents(5, seed=3)
    assert latents.shape == (5, 1, 8, 8) and latents.dtype == torch.float32
    assert torch.equal(spec.initial_latents(2, seed=3), latents[:2])  # fewer samples: the same first ones
    assert not torch.equal(spec.initial_latents(5, seed=4), latents)
    assert not torch.equal(latents[0], latents[1])
    assert spec.initial_latents(0, seed=3).shape == (0, 1, 8, 8)


def test_sampling_is_deterministic_and_in_range(spec):
    prompts = prompts_for([0, 1, 2, 3, 4, 5])
    noise = spec.initial_latents(len(prompts), seed=3)
    settings = dict(num_inference_steps=5, guidance_scale=1.25)
    first = spec.sample(prompts, noise, **settings)
    again = spec.sample(prompts, noise.clone(), model=spec.denoiser, **settings)
    assert first.shape == (6, 1, 8, 8)
    assert torch.equal(first, again)
    assert first.min() >= -1 and first.max() <= 1
    other = spec.sample(prompts, spec.initial_latents(len(prompts), seed=4), **settings)
    assert not torch.equal(first, other)
    unguided = spec.sample(prompts, noise, num_inference_steps=5, guidance_scale=1.0)
    assert not torch.equal(first, unguided)
    chunked = spec.sample(prompts, noise, batch_size=4, **settings)
    torch.testing.assert_close(chunked, first, rtol=1e-4, atol=1e-4)
    assert spec.denoiser.training is False
    with pytest.raises(ValueError, match="latents must have shape"):
        spec.sample(prompts, spec.initial_latents(3, seed=0), **settings)


def test_image_grid_upscales():
    grid = media_grid(load_split("train")[0][:12], nrow=4, scale=8, padding=1)
    assert grid.size == ((4 * 9 + 1) * 8, (3 * 9 + 1) * 8) and grid.mode == "L"


# ------------------------------------------------------------------------------------------ reward
@pytest.fixture(scope="module")
def held_out():
    images, labels = load_split("held_out")
    return images, labels, prompts_for(labels)


def test_reward_prefers_the_prompted_digit(held_out):
    images, labels, prompts = held_out
    reward = digit_reward()
    right = reward(images, prompts)
    wrong = reward(images, prompts_for((labels + 1) % 10))
    assert right.shape == (len(images),) and right.dtype == torch.float32
    assert (right > wrong).float().mean() > 0.95
    assert (right - wrong).mean() > 3.0


def test_reward_has_headroom_on_real_digits(held_out):
    images, _, prompts = held_out
    scores = digit_reward()(images, prompts)
    # The saturated form the reward replaces: most real digits score within a few hundredths of 1.
    probability = digit_reward(kind="probability")(images, prompts)
    assert probability.median() > 0.98 and probability.quantile(0.75) > 0.99
    assert 0.6 < scores.std() < 3.0
    assert scores.quantile(0.75) - scores.quantile(0.25) > 1.0
    assert scores.unique().numel() == scores.numel()  # no ties between different real digits
    top_decile = scores.quantile(0.9)
    assert (scores > top_decile).float().mean() < 0.11  # no ceiling where many pile up


def test_style_term_is_met_by_about_half_of_real_digits(held_out):
    images, labels, _ = held_out
    train_images, train_labels = load_split("train")
    assert 0.4 < (thickness_score(images, labels) > 0).float().mean() < 0.6
    assert 0.45 < (thickness_score(train_images, train_labels) > 0).float().mean() < 0.55


def test_reward_guards_against_blobs_and_checks_inputs(held_out):
    images, _, prompts = held_out
    reward = digit_reward()
    blobs = torch.ones_like(images[:10])
    assert reward(blobs, prompts[:10]).max() < reward(images, prompts).median()
    with pytest.raises(ValueError, match="names no digit"):
        reward(images[:1], ["a handwritten letter"])
    with pytest.raises(ValueError, match="prompts"):
        reward(images[:2], prompts[:1])
    with pytest.raises(ValueError, match="unknown reward kind"):
        digit_reward(kind="aesthetics")


def test_reward_is_a_registered_reward(held_out):
    images, _, prompts = held_out
    reward = load_reward("digits")
    assert isinstance(reward, Reward) and reward.name == "digits" and reward.media == "image"
    torch.testing.assert_close(reward.score(images[:8], prompts[:8]), digit_reward()(images[:8], prompts[:8]))
    assert load_reward("digits", kind="log_odds").name == "digits-log_odds"


def test_feature_distance_separates_real_from_noise(held_out):
    images, _, _ = held_out
    train_images, _ = load_split("train")
    real = feature_distance(images, train_images)
    noise = feature_distance(torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1),
                             train_images)
    assert 0 <= real < 1.0
    assert noise > 10 * real
    assert feature_distance(train_images, train_images) == pytest.approx(0.0, abs=1e-6)


def test_package_exports_lazily():
    import sdpo.toy

    assert sdpo.toy.ToySpec is ToySpec and sdpo.toy.media_grid is media_grid
    assert os.fspath(base_folder(TINY, "/x")).startswith("/x")


def test_default_cache_keys_are_stable():
    """Cached base models are found by these hashes: a change here would retrain every user's cache."""
    from sdpo.toy.moving.model import VideoToyConfig

    assert ToyModelConfig().short_hash() == "413d77414e"
    assert VideoToyConfig().short_hash() == "3adc53149a"
    assert VideoToyConfig(arch="wan").short_hash() == "11f4aea7e8"
    assert base_folder(ToyModelConfig(), "/c").name == "toy-base-413d77414e"
    assert base_folder(VideoToyConfig(arch="wan"), "/c").name == "toy-video-wan-11f4aea7e8"


def test_worlds_follow_the_protocol():
    from sdpo.toy.world import World, get_world

    image, video = get_world("image"), get_world("video", {"arch": "wan"})
    assert isinstance(image, World) and isinstance(video, World)
    assert (image.family, video.family) == ("toy", "toy-video")
    assert image.prompts(2)[:3] == ["a handwritten digit 0"] * 2 + ["a handwritten digit 1"]
    assert video.prompts(1)[1] == "a handwritten digit 1 moving right"
    assert image.reward().name == "digits" and video.reward().name == "moving-digits"
    assert video.real("held_out").shape[1:] == (5, 1, 12, 12)
    with pytest.raises(ValueError, match="unknown world"):
        get_world("audio")


def test_one_spec_class_serves_both_family_names(tiny_folder):
    from sdpo.models.registry import load_spec, spec_class

    assert spec_class("toy") is spec_class("toy-video") is ToySpec
    spec = load_spec("toy", tiny_folder)
    assert spec.family == "toy" and spec.media_kind == "image" and spec.denoiser_subfolder == "unet"
    assert spec.pipeline_class.__name__ == "StableDiffusionPipeline"


def test_the_pretraining_average_is_diffusers_emamodel_and_matches_the_old_hand_written_one():
    """The base models' moving average moved to diffusers' EMAModel (use_ema_warmup=False) with the cache
    keys unchanged: that is sound only because it reproduces the old ``min(decay, (1+s)/(10+s))`` lerp.
    The two differ only in the first update (EMAModel copies the weights; the old code kept 0.1 of the
    initial ones) and in the rounding of the first ~9 (lerp's other branch); after a few dozen updates
    that difference has decayed below float32 resolution, so the averages are bit-identical, as they were
    for the default digits model (1000 steps, measured)."""
    from diffusers.training_utils import EMAModel

    from sdpo.toy.pretrain_loop import moving_average

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, generator=generator)), torch.nn.Parameter(torch.randn(3, 5))]
    decay = 0.995
    old = [p.detach().clone() for p in params]
    new = moving_average(params, decay)
    assert isinstance(new, EMAModel) and moving_average(params, 0.0) is None
    gaps = []
    for step in range(300):
        with torch.no_grad():
            for p in params:  # an optimizer step: noisy drift
                p.add_(0.05 * torch.randn(p.shape, generator=generator) + 0.01)
        torch._foreach_lerp_(old, [p.detach() for p in params], 1.0 - min(decay, (1 + step) / (10 + step)))
        new.step(params)
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(old, new.shadow_params, strict=True)))
    assert gaps[0] > 1e-3  # they do differ at first ...
    assert all(torch.equal(a, b) for a, b in zip(old, new.shadow_params, strict=True))  # ... then not at all
