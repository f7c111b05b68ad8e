"""The video toy world: moving-digit clips, the tiny CogVideoX- / Wan-style base models, spec, sampler,
reward, and one short preference-training run through the real precompute and trainer.

Models are TINY (a few pretraining steps): these tests check plumbing and invariants, not quality.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import peft
import pytest
import torch
from tiny_models import tiny_video

from sdpo.models.base import ModelSpec
from sdpo.rewards import Reward, load_reward
from sdpo.stages.generate import SamplerSettings, generate
from sdpo.stages.pairs import build_pairs
from sdpo.stages.score import score
from sdpo.toy.digits.data import IMAGE_SIZE, load_split
from sdpo.toy.grids import media_grid
from sdpo.toy.model_folder import MARKER_FILE, ToyCacheError, base_folder
from sdpo.toy.moving import model as video_model
from sdpo.toy.moving.data import (
    DIRECTIONS,
    clip_directions,
    load_video_clips,
    parse_video_prompt,
    render_clips,
    video_prompt_for,
    video_prompts_for,
)
from sdpo.toy.moving.model import VideoToyConfig
from sdpo.toy.moving.reward import (
    clip_velocity,
    digit_crops,
    motion_score,
    moved_direction,
    moving_digit_reward,
    video_feature_distance,
    video_metrics,
)
from sdpo.toy.pretraining import pretrain_base
from sdpo.toy.spec import ToySpec

ARCHS = ("cogvideox", "wan")
tiny_config = tiny_video


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run thousands of small ops, which one thread does fastest: a second thread
    only adds synchronisation, and on a shared machine it waits for a busy core at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-cache")


@pytest.fixture(scope="module")
def folders(cache_root: Path) -> dict[str, Path]:
    return {arch: pretrain_base(tiny_config(arch), cache_root, progress=False) for arch in ARCHS}


def _train_a_little(model: torch.nn.Module) -> None:
    """Random LoRA B matrices, as training would give: peft's "gaussian" init leaves B = 0 (a no-op adapter)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _inputs(spec: ToySpec) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    clips, labels = load_video_clips("held_out", spec.config.frames, spec.config.canvas, spec.config.speed)
    prompts = video_prompts_for(labels[:2], clip_directions("held_out")[:2])
    latents = spec.encode_media(clips[:2])
    t = torch.tensor([100, 900])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    noisy = spec.schedule.add_noise(latents, noise, t)
    return noisy, spec.schedule.model_timestep(t), spec.encode_prompts(prompts)


# ------------------------------------------------------------------------------------------ data
def test_clips_shapes_ranges_and_motion() -> None:
    clips, labels = load_video_clips("held_out")
    images, image_labels = load_split("held_out")
    directions = clip_directions("held_out")
    assert clips.shape == (len(images), 5, 1, 12, 12) and clips.dtype == torch.float32
    assert torch.equal(labels, image_labels)
    assert clips.min() >= -1 and clips.max() <= 1
    # The digit is whole on every frame: each frame holds exactly the digit's ink.
    ink = ((clips + 1) / 2).sum(dim=(2, 3, 4))
    torch.testing.assert_close(ink, ((images + 1) / 2).sum(dim=(1, 2, 3))[:, None].expand_as(ink))
    # It moves exactly 1 px per frame in its direction, and that direction is what the reward reads.
    velocity = clip_velocity(clips)
    expected = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])[directions]
    torch.testing.assert_close(velocity, expected, atol=1e-3, rtol=0)
    assert torch.equal(moved_direction(clips), directions)
    # Directions: fixed per digit, every one used, all four about equally often.
    assert torch.equal(directions, clip_directions("held_out"))
    counts = torch.bincount(clip_directions("all"), minlength=4)
    assert counts.min() >= counts.max() - 1
    train, _ = load_video_clips("train")
    assert train.shape[0] + clips.shape[0] == clip_directions("all").shape[0]


def test_render_places_the_digit_along_its_path() -> None:
    image = load_split("train")[0][:1]
    for direction, name in enumerate(DIRECTIONS):
        clip = render_clips(image, [direction], frames=5, canvas=12, speed=1)[0]
        first, last = clip[0, 0], clip[-1, 0]
        if name == "right":
            assert torch.equal(first[2:10, 0:8], image[0, 0]) and torch.equal(last[2:10, 4:12], image[0, 0])
        if name == "up":
            assert torch.equal(first[4:12, 2:10], image[0, 0]) and torch.equal(last[0:8, 2:10], image[0, 0])
    with pytest.raises(ValueError, match="canvas of at least 13"):
        render_clips(image, [0], frames=6, canvas=12, speed=1)
    with pytest.raises(ValueError, match="directions must be indices"):
        render_clips(image, [4])


def test_prompts_round_trip() -> None:
    prompt = video_prompt_for(7, "right")
    assert prompt == "a handwritten digit 7 moving right"
    assert parse_video_prompt(prompt) == (7, 1)
    assert parse_video_prompt("A handwritten digit seven moving UP") == (7, 2)
    with pytest.raises(ValueError, match="no direction"):
        parse_video_prompt("a handwritten digit 7")
    with pytest.raises(ValueError, match="several directions"):
        parse_video_prompt("a handwritten digit 7 moving left then right")


# ------------------------------------------------------------------------------------------ config and cache
def test_config_validation() -> None:
    with pytest.raises(ValueError, match="arch"):
        VideoToyConfig(arch="sd")
    with pytest.raises(ValueError, match="must divide canvas"):
        VideoToyConfig(patch_size=5)
    with pytest.raises(ValueError, match="attention_head_dim >= 12"):
        VideoToyConfig(arch="wan", attention_head_dim=8)
    with pytest.raises(ValueError, match="divisible by 16"):
        VideoToyConfig(arch="cogvideox", attention_head_dim=12)
    with pytest.raises(ValueError, match="canvas of at least"):
        VideoToyConfig(frames=9)
    config = tiny_config("wan")
    assert VideoToyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.short_hash() != tiny_config("cogvideox").short_hash()
    with pytest.raises(ValueError, match="unknown VideoToyConfig fields"):
        VideoToyConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_pretraining_is_cached_and_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("cogvideox", train_steps=1, seed=5)
    folder = pretrain_base(config, tmp_path, progress=False)
    assert folder == base_folder(config, tmp_path)
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["complete"] is True and marker["world"] == "toy-video" and marker["config"] == config.to_dict()
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached base model was trained again")

    monkeypatch.setattr(video_model, "train_video_base", must_not_train)
    assert pretrain_base(config, tmp_path, progress=False) == folder  # reused, not retrained

    # A crash mid-training leaves neither the final folder nor a temporary one behind.
    other = dataclasses.replace(config, seed=6)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_model, "train_video_base", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain_base(other, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]

    # A damaged folder is reported, not silently used or overwritten.
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ToyCacheError, match="unreadable"):
        pretrain_base(config, tmp_path, progress=False)
    (folder / MARKER_FILE).write_text("{")
    with pytest.raises(ToyCacheError, match="corrupt"):
        ToySpec.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize("arch", ARCHS)
def test_spec_loads_encodes_and_predicts(arch: str, folders: dict[str, Path]) -> None:
    spec = ToySpec.from_pretrained(folders[arch])
    assert isinstance(spec, ModelSpec)
    assert spec.family == "toy-video" and spec.arch == arch and spec.pretrained == str(folders[arch])
    assert spec.schedule.prediction_type == ("v_prediction" if arch == "cogvideox" else "flow")
    if arch == "cogvideox":  # zero terminal SNR: the last training step is pure noise
        assert float(spec.schedule.alphas[-1]) == 0.0
    fmt = spec.media_format
    assert (fmt.channels, fmt.frames, fmt.height, fmt.width) == (1, 3, 10, 10)

    clips = torch.rand(2, 3, 1, 10, 10) * 2 - 1
    latents = spec.encode_media(clips)
    assert latents.shape == ((2, 3, 1, 10, 10) if arch == "cogvideox" else (2, 1, 3, 10, 10))
    assert torch.equal(spec.decode_latents(latents), clips)
    with pytest.raises(ValueError, match="must have shape"):
        spec.encode_media(torch.zeros(2, 4, 1, 10, 10))

    noisy, timesteps, conditions = _inputs(spec)
    assert conditions["encoder_hidden_states"].shape == (2, 8, 16)
    with torch.no_grad():
        prediction = spec.predict(spec.denoiser, noisy, timesteps, conditions)
    assert prediction.shape == noisy.shape and torch.isfinite(prediction).all()
    if arch == "cogvideox":
        short = {"encoder_hidden_states": conditions["encoder_hidden_states"][:, :6]}
        with pytest.raises(ValueError, match="max_text_seq_length=8"):
            spec.predict(spec.denoiser, noisy, timesteps, short)

    without_text = ToySpec.from_pretrained(folders[arch], load_text_encoder=False, load_vae=False)
    assert without_text.text_encoder is None
    with pytest.raises(RuntimeError, match="load_text_encoder"):
        without_text.encode_prompts(["a handwritten digit 1 moving up"])
    with pytest.raises(ValueError, match="only handles"):
        ToySpec.from_pretrained(folders[arch], media_format=dataclasses.replace(fmt, frames=5))


def test_registry_loads_the_family(folders: dict[str, Path]) -> None:
    from sdpo.models.registry import known_families, load_spec

    assert "toy-video" in known_families()
    spec = load_spec("toy-video", folders["wan"], load_vae=False, load_text_encoder=False)
    assert isinstance(spec, ToySpec) and spec.arch == "wan" and spec.text_encoder is None


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_changes_prediction_and_reloads(arch: str, folders: dict[str, Path], tmp_path: Path) -> None:
    spec = ToySpec.from_pretrained(folders[arch])
    noisy, timesteps, conditions = _inputs(spec)
    targets = spec.lora_target_modules()
    feed_forward = "ff.net.2" if arch == "cogvideox" else "ffn.net.2"
    assert {"to_q", "to_k", "to_v", "to_out.0", feed_forward} <= set(targets)
    spec.denoiser.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    _train_a_little(spec.denoiser)
    with torch.no_grad():
        with_lora = spec.predict(spec.denoiser, noisy, timesteps, conditions)
        spec.denoiser.disable_adapters()
        without = spec.predict(spec.denoiser, noisy, timesteps, conditions)
        spec.denoiser.enable_adapters()
    assert not torch.allclose(with_lora, without)

    spec.save_lora(tmp_path, spec.denoiser)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = ToySpec.from_pretrained(folders[arch])
    fresh.load_lora(tmp_path)
    with torch.no_grad():  # alpha != rank survives through the saved adapter metadata
        torch.testing.assert_close(fresh.predict(fresh.denoiser, noisy, timesteps, conditions), with_lora,
                                   rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="LoRA adapters"):
        spec.save_full(tmp_path / "full", spec.denoiser)


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_deterministic_and_in_range(arch: str, folders: dict[str, Path]) -> None:
    spec = ToySpec.from_pretrained(folders[arch])
    prompts = [video_prompt_for(3, "left"), video_prompt_for(8, "down")]
    noise = spec.initial_latents(2, seed=0)
    assert noise.shape == (2, *spec.encode_media(torch.zeros(1, 3, 1, 10, 10)).shape[1:])
    assert torch.equal(spec.initial_latents(1, seed=0), noise[:1])
    settings = dict(num_inference_steps=3, guidance_scale=2.0)
    first = spec.sample(prompts, noise, **settings)
    again = spec.sample(prompts, noise.clone(), batch_size=1, **settings)
    other = spec.sample(prompts, spec.initial_latents(2, seed=1), **settings)
    assert first.shape == (2, 3, 1, 10, 10)
    assert first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    with pytest.raises(ValueError, match="latents must have shape"):
        spec.sample(prompts, noise[:1], **settings)


def test_video_grid_size() -> None:
    clips = torch.zeros(3, 5, 1, 12, 12)
    grid = media_grid(clips, nrow=1, scale=2, padding=1)
    assert grid.size == (2 * (5 * 13 + 1), 2 * (3 * 13 + 1))  # (width, height): one clip per row


# ------------------------------------------------------------------------------------------ reward
def test_reward_prefers_the_prompted_digit_and_direction() -> None:
    clips, labels = load_video_clips("held_out")
    directions = clip_directions("held_out")
    reward = moving_digit_reward()
    assert isinstance(reward, Reward) and reward.name == "moving-digits" and reward.media == "video"
    assert isinstance(load_reward("moving-digits", kind="motion"), Reward)
    right = reward(clips, video_prompts_for(labels, directions))
    for shift in (1, 2, 3):  # every wrong direction: the motion term drops from 1 to at most 0
        wrong = reward(clips, video_prompts_for(labels, (directions + shift) % 4))
        assert (right > wrong).all()
    wrong_digit = reward(clips, video_prompts_for((labels + 1) % 10, directions))
    assert (right > wrong_digit).float().mean() > 0.95
    # The motion term peaks at the prompted speed: still or too fast clips score lower.
    torch.testing.assert_close(motion_score(clips, directions), torch.ones(len(clips)), atol=1e-3, rtol=0)
    still = clips[:, :1].expand_as(clips)
    assert (motion_score(still, directions) < 0.01).all()
    fast = render_clips(load_split("held_out")[0], directions, frames=3, canvas=12, speed=2)
    assert (motion_score(fast, directions, speed=1) < 0.01).all()
    # The crops are the digits: the classifier reads real clips about as well as the 8x8 digits.
    assert digit_crops(clips).shape == (clips.shape[0] * 5, 1, IMAGE_SIZE, IMAGE_SIZE)
    metrics = video_metrics(clips, video_prompts_for(labels, directions))
    assert metrics["digit_accuracy"] > 0.9 and metrics["direction_accuracy"] == 1.0
    with pytest.raises(ValueError, match="no direction"):
        reward(clips[:1], ["a handwritten digit 3"])


def test_the_held_out_scorer_is_another_classifier_that_agrees_on_real_clips() -> None:
    """The second scorer of `sdpo bench methods` on the video world: its own name (results keyed by name
    must not collide with the reward's), another classifier, and still the prompted digit and direction."""
    clips, labels = load_video_clips("held_out")
    directions = clip_directions("held_out")
    reward, held_out = moving_digit_reward(), load_reward("moving-digits", split="held_out", seed=1, hidden=32)
    assert held_out.name == "moving-digits@held_out" != reward.name
    prompts = video_prompts_for(labels, directions)
    first, second = reward(clips, prompts), held_out(clips, prompts)
    assert not torch.allclose(first, second)
    assert torch.corrcoef(torch.stack([first, second]))[0, 1] > 0.5
    wrong = held_out(clips, video_prompts_for((labels + 1) % 10, directions))
    assert (second > wrong).float().mean() > 0.9


def test_feature_distance_separates_real_from_noise() -> None:
    real, _ = load_video_clips("held_out")
    train, _ = load_video_clips("train")
    noise = torch.rand(200, 5, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert video_feature_distance(train[:400], real) < video_feature_distance(noise, real) / 5


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("arch", ARCHS)
def test_preference_training_end_to_end(arch: str, folders: dict[str, Path], tmp_path: Path) -> None:
    from sdpo.data import CachedPairs, precompute, read_pairs
    from sdpo.objectives import MethodConfig
    from sdpo.train.config import TrainConfig
    from sdpo.train.trainer import train

    spec = ToySpec.from_pretrained(folders[arch])
    prompts = [video_prompt_for(d, d % 4) for d in range(4)]
    # the library's stages, as the demo runs them: clips with lossless frame folders, pairs pointing at those
    candidates = tmp_path / "candidates"
    generate(spec, prompts, candidates, per_prompt=2, sampler=SamplerSettings(2, 2.0), progress=False,
             frame_folders=True)
    score(candidates, [moving_digit_reward()], progress=False)
    pairs = read_pairs(build_pairs(candidates, frames=True).out)
    assert len(pairs) == 4
    for pair in pairs:
        assert pair.metadata["chosen_score"] >= pair.metadata["rejected_score"]
        assert len(os.listdir(pair.chosen)) == spec.config.frames
    cache = precompute(pairs, spec, tmp_path / "cache", progress=False, num_workers=0)
    dataset = CachedPairs(cache)
    assert dataset.manifest["family"] == "toy-video"

    before = {name: p.detach().clone() for name, p in spec.denoiser.named_parameters()}
    config = TrainConfig(family="toy-video", output_dir=str(tmp_path / "run"), max_steps=3, train_batch_size=2,
                         method=MethodConfig.preset("sdpo", beta=500.0, num_inference_steps=10), lora_rank=4, learning_rate=1e-3,
                         report_to="none")
    result = train(config, spec=spec, dataset=dataset, progress=False)
    assert len([row for row in result.history if "loss" in row]) >= 1
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history if "loss" in row)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    for name, p in spec.denoiser.named_parameters():  # the base weights are untouched; only adapters train
        if name in before:
            assert torch.equal(p, before[name])
    fresh = ToySpec.from_pretrained(folders[arch])
    fresh.load_lora(tmp_path / "run")
    noisy, timesteps, conditions = _inputs(fresh)
    with torch.no_grad():
        tuned = fresh.predict(fresh.denoiser, noisy, timesteps, conditions)
        fresh.denoiser.disable_adapters()
        base = fresh.predict(fresh.denoiser, noisy, timesteps, conditions)
    assert not torch.allclose(tuned, base)
