"""The diffusers-backed model specs, on tiny random pipelines saved as real model folders.

Every family goes the way a real checkpoint does: ``load_spec`` on the folder, encoders, a
prediction, LoRA saved with ``save_lora`` and read back by the family's own pipeline
(``load_lora_weights``), which then samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tiny_models import TINY_COGVIDEOX_15

from sdpo.models import tiny
from sdpo.models.base import MediaFormat, ModelNotFoundError, ModelSpec
from sdpo.models.registry import LAZY_SPECS, SPECS, known_families, load_spec, spec_class

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Case:
    family: str
    build: Any
    prediction_type: str
    media_format: MediaFormat
    pixels: tuple[int, ...]
    latents: tuple[int, ...]
    sample_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_shape: tuple[int, ...] = ()


def _image(family: str, build: Any, prediction_type: str) -> Case:
    """16x16 images -> 8x8 latents (the tiny SD VAEs downsample by 2)."""
    size = {"height": 16, "width": 16}
    return Case(
        family,
        build,
        prediction_type,
        MediaFormat(**size),
        (2, 3, 16, 16),
        (2, 4, 8, 8),
        size,
        (1, 3, 16, 16),
    )


def _video(
    family: str, build: Any, prediction_type: str, frames: int, latents: tuple[int, ...], **sample: Any
) -> Case:
    """Clips of 32x32 pixels -> 4x4 latents (x8 spatial, x4 temporal compression)."""
    size = {"height": 32, "width": 32}
    return Case(
        family,
        build,
        prediction_type,
        MediaFormat(**size, frames=frames),
        (2, frames, 3, 32, 32),
        latents,
        {**size, "num_frames": frames, **sample},
        (1, frames, 3, 32, 32),
    )


CASES = {
    "sd": _image("sd", tiny.build_tiny_sd, "epsilon"),
    "sd-v": _image("sd", lambda f: tiny.build_tiny_sd(f, prediction_type="v_prediction"), "v_prediction"),
    "sdxl": _image("sdxl", tiny.build_tiny_sdxl, "epsilon"),
    # CogVideoX latents are (B, F, C, H, W): 9 frames -> 3 latent frames. Its VAE decodes an even number of
    # latent frames to 4 frames each, so clips have 8k + 1 frames (49 for the real models).
    "cogvideox": _video(
        "cogvideox", tiny.build_tiny_cogvideox, "v_prediction", 9, (2, 3, 4, 4, 4), max_sequence_length=16
    ),
    "cogvideox-rotary": _video(
        "cogvideox",
        lambda f: tiny.build_tiny_cogvideox(f, rotary=True),
        "v_prediction",
        9,
        (2, 3, 4, 4, 4),
        max_sequence_length=16,
    ),
    # Wan latents are (B, C, F, H, W): 5 frames -> 2 latent frames.
    "wan": _video("wan", tiny.build_tiny_wan, "flow", 5, (2, 4, 2, 4, 4)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Run these tiny models on one thread.

    Their ops take microseconds, so two threads gain nothing, and when other processes keep the two
    cores busy every parallel op waits a scheduler slice for its second thread (measured: a 64x64
    matmul 16 ms instead of 10 us, the module 80 s instead of 20 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny pipeline, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: case.build(root / name) for name, case in CASES.items()}


def _spec(case: Case, folder: Path, **kwargs: Any) -> Any:
    return load_spec(case.family, str(folder), media_format=case.media_format, **kwargs)


def _inputs(spec: Any, case: Case) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Noisy latents, model timesteps and conditions for two samples."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(case.pixels, generator=generator) * 2 - 1
    latents = spec.encode_media(pixels)
    conditions = spec.encode_prompts(["a red cat", "a blue dog on a hill"])
    t = torch.tensor([100, 900])
    noisy = spec.schedule.add_noise(latents, torch.randn(latents.shape, generator=generator), t)
    return noisy, spec.schedule.model_timestep(t), conditions


def _train_a_little(model: torch.nn.Module) -> None:
    """Give every LoRA B matrix random values, as training would.

    peft's "gaussian" init draws A at random but still zeros B, so a fresh adapter changes nothing.
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _pipeline(spec: Any, folder: Path) -> Any:
    pipe = spec.pipeline_class.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_denoiser(pipe: Any, spec: Any) -> torch.nn.Module:
    return getattr(pipe, spec.denoiser_subfolder)


# ---------------------------------------------------------------------- per family
@pytest.mark.parametrize("name", list(CASES))
def test_spec_encodes_and_predicts(name: str, folders: dict[str, Path]) -> None:
    case = CASES[name]
    spec = _spec(case, folders[name])
    assert isinstance(spec, ModelSpec)
    assert spec.family == case.family
    assert spec.schedule.prediction_type == case.prediction_type
    assert spec.media_format == case.media_format
    noisy, timesteps, conditions = _inputs(spec, case)
    assert tuple(noisy.shape) == case.latents
    assert all(value.shape[0] == 2 for value in conditions.values())
    with torch.no_grad():
        prediction = spec.predict(spec.denoiser, noisy, timesteps, conditions)
    assert prediction.shape == noisy.shape
    assert torch.isfinite(prediction).all()


@pytest.mark.parametrize("name", ["sd", "sdxl", "cogvideox", "cogvideox-rotary", "wan"])
def test_lora_saved_by_spec_loads_into_pipeline(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    case = CASES[name]
    spec = _spec(case, folders[name])
    noisy, timesteps, conditions = _inputs(spec, case)
    targets = spec.lora_target_modules()
    spec.denoiser.add_adapter(
        peft.LoraConfig(target_modules=targets, r=4, lora_alpha=4, init_lora_weights="gaussian")
    )
    adapted = [n for n, _ in spec.denoiser.named_modules() if n.endswith("lora_A")]
    assert {t for t in targets if any(n.removesuffix(".lora_A").endswith(t) for n in adapted)} == set(targets)
    _train_a_little(spec.denoiser)
    with torch.no_grad():
        with_lora = spec.predict(spec.denoiser, noisy, timesteps, conditions)
        spec.denoiser.disable_adapters()
        without = spec.predict(spec.denoiser, noisy, timesteps, conditions)
        spec.denoiser.enable_adapters()
    assert not torch.allclose(with_lora, without)

    spec.save_lora(tmp_path / "lora", spec.denoiser)
    pipe = _pipeline(spec, folders[name])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():  # the pipeline's denoiser now predicts what the trained one did
        reloaded = spec.predict(_pipeline_denoiser(pipe, spec), noisy, timesteps, conditions)
    torch.testing.assert_close(reloaded, with_lora, rtol=1e-4, atol=1e-5)

    out = pipe(
        "a red cat",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **case.sample_kwargs,
    )
    media = out.images if hasattr(out, "images") else out.frames
    assert tuple(media.shape) == case.sample_shape
    assert torch.isfinite(media).all()


def test_lora_alpha_survives_the_round_trip(folders: dict[str, Path], tmp_path: Path) -> None:
    """alpha != rank: the adapter config saved beside the weights must give the same scaling back."""
    case = CASES["sd"]
    spec = _spec(case, folders["sd"])
    noisy, timesteps, conditions = _inputs(spec, case)
    spec.denoiser.add_adapter(
        peft.LoraConfig(
            target_modules=spec.lora_target_modules(), r=4, lora_alpha=16, init_lora_weights="gaussian"
        )
    )
    _train_a_little(spec.denoiser)
    spec.save_lora(tmp_path, spec.denoiser)
    pipe = _pipeline(spec, folders["sd"])
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(
            spec.predict(pipe.unet, noisy, timesteps, conditions),
            spec.predict(spec.denoiser, noisy, timesteps, conditions),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.parametrize("name", ["sd", "sdxl", "cogvideox", "wan"])
def test_save_full_round_trips(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    case = CASES[name]
    spec = _spec(case, folders[name], load_vae=False, load_text_encoder=False)
    with torch.no_grad():
        for parameter in spec.denoiser.parameters():
            parameter.add_(0.01)  # a "fine-tuned" model, different from the one in the folder
    spec.save_full(tmp_path, spec.denoiser)
    reloaded = type(spec.denoiser).from_pretrained(str(tmp_path), subfolder=spec.denoiser_subfolder)
    expected = spec.denoiser.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_component_dtypes_follow_the_family_rules(folders: dict[str, Path], tmp_path: Path) -> None:
    """fp16 asked for: SD's VAE stays float32 when its config says force_upcast; Wan's VAE always does."""
    import json
    import shutil

    sd = tmp_path / "sd"
    shutil.copytree(folders["sd"], sd)
    config_path = sd / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "force_upcast": True}))
    spec = load_spec("sd", sd, torch_dtype=torch.float16)
    assert next(spec.vae.parameters()).dtype == torch.float32
    assert next(spec.denoiser.parameters()).dtype == torch.float16
    assert next(spec.text_encoder.parameters()).dtype == torch.float16
    wan = load_spec("wan", folders["wan"], torch_dtype=torch.bfloat16, load_text_encoder=False)
    assert next(wan.vae.parameters()).dtype == torch.float32 and wan.text_encoder is None
    with pytest.raises(TypeError, match="no component"):
        type(wan)(wan.schedule, wan.denoiser, unet=None)


def test_lora_export_matches_peft_and_survives_checkpoint_wrappers(folders: dict[str, Path]) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from sdpo.models.base import peft_lora_state_dict

    spec = _spec(CASES["wan"], folders["wan"], load_vae=False, load_text_encoder=False)
    model = spec.denoiser
    model.add_adapter(peft.LoraConfig(target_modules=spec.lora_target_modules(), r=2, init_lora_weights="gaussian"))
    expected = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    ours = peft_lora_state_dict(model)
    assert ours.keys() == expected.keys() and len(ours) > 0
    assert all(torch.equal(ours[key], expected[key]) for key in ours)

    # FSDP's activation checkpointing wraps each block; peft's own walk then finds no adapter at all.
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "WanTransformerBlock":
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_module(leaf, checkpoint_wrapper(module))
    wrapped = peft_lora_state_dict(model, model.state_dict())
    assert wrapped.keys() == expected.keys()
    assert all(torch.equal(wrapped[key], expected[key]) for key in wrapped)


def test_gathered_state_dict_is_what_gets_saved(folders: dict[str, Path], tmp_path: Path) -> None:
    """After sharded training the model's own parameters are one shard: save the gathered state given."""
    case = CASES["wan"]
    spec = _spec(case, folders["wan"], load_vae=False, load_text_encoder=False)
    gathered = {key: value + 0.5 for key, value in spec.denoiser.state_dict().items()}
    spec.save_full(tmp_path / "full", spec.denoiser, gathered)
    reloaded = type(spec.denoiser).from_pretrained(str(tmp_path / "full"), subfolder=spec.denoiser_subfolder)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, gathered[key], rtol=0, atol=0)

    spec.denoiser.add_adapter(peft.LoraConfig(target_modules=spec.lora_target_modules(), r=2, lora_alpha=2))
    state = spec.denoiser.state_dict()
    lora_keys = [key for key in state if "lora_B" in key]
    gathered = {key: (value + 1.0 if key in lora_keys else value) for key, value in state.items()}
    spec.save_lora(tmp_path / "lora", spec.denoiser, gathered)
    pipe = _pipeline(spec, folders["wan"])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = {k: v for k, v in _pipeline_denoiser(pipe, spec).state_dict().items() if "lora_B" in k}
    assert loaded and all(torch.all(v == 1.0) for v in loaded.values())  # B was 0 in the model, 1 in the gathered state


@pytest.mark.parametrize("name", ["sd", "sdxl", "cogvideox", "wan"])
def test_without_encoders_encoding_says_how_to_fix_it(name: str, folders: dict[str, Path]) -> None:
    case = CASES[name]
    spec = _spec(case, folders[name], load_vae=False, load_text_encoder=False)
    assert spec.vae is None and spec.text_encoder is None
    with pytest.raises(RuntimeError, match="load_text_encoder=True"):
        spec.encode_prompts(["a cat"])
    with pytest.raises(RuntimeError, match="load_vae=True"):
        spec.encode_media(torch.zeros(case.pixels))


# ---------------------------------------------------------------------- family details
def test_lora_targets_per_family(folders: dict[str, Path]) -> None:
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    for name, feed_forward in [("sd", "ff"), ("sdxl", "ff"), ("cogvideox", "ff"), ("wan", "ffn")]:
        spec = _spec(CASES[name], folders[name], load_vae=False, load_text_encoder=False)
        assert spec.lora_target_modules() == [
            *attention,
            f"{feed_forward}.net.0.proj",
            f"{feed_forward}.net.2",
        ]


def test_sdxl_conditions_carry_pooled_embeddings_and_size(folders: dict[str, Path]) -> None:
    spec = _spec(CASES["sdxl"], folders["sdxl"])
    conditions = spec.encode_prompts(["a", "b", "c"])
    assert conditions["encoder_hidden_states"].shape == (3, 77, 32)
    assert conditions["text_embeds"].shape == (3, 16)
    assert conditions["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3
    # an older cache without time_ids predicts the same (falls back to media_format)
    noisy, timesteps, _ = _inputs(spec, CASES["sdxl"])
    two = {key: value[:2] for key, value in conditions.items()}
    without = {key: value for key, value in two.items() if key != "time_ids"}
    with torch.no_grad():
        torch.testing.assert_close(
            spec.predict(spec.denoiser, noisy, timesteps, two),
            spec.predict(spec.denoiser, noisy, timesteps, without),
        )


def test_cogvideox_schedule_is_zero_terminal_snr_and_text_is_padded(folders: dict[str, Path]) -> None:
    spec = _spec(CASES["cogvideox"], folders["cogvideox"])
    assert float(spec.schedule.alphas[-1]) == pytest.approx(0.0, abs=1e-6)
    assert spec.encode_prompts(["x"])["encoder_hidden_states"].shape == (1, 16, 16)


def test_cogvideox_rotary_matches_the_pipeline(folders: dict[str, Path]) -> None:
    """The spec's rotary tables equal those the CogVideoX pipeline builds for sampling."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    from sdpo.models.cogvideox import centered_fit, rotary_embedding

    for grid, base in [
        ((4, 4), (4, 4)),
        ((30, 45), (30, 45)),
        ((20, 45), (30, 45)),
        ((33, 17), (30, 45)),
        ((7, 3), (5, 9)),
    ]:
        assert centered_fit(grid, base) == get_resize_crop_region_for_grid(grid, base[1], base[0])

    spec = _spec(
        CASES["cogvideox-rotary"], folders["cogvideox-rotary"], load_vae=False, load_text_encoder=False
    )
    pipe = _pipeline(spec, folders["cogvideox-rotary"])
    for frames, height, width in [(2, 4, 4), (3, 8, 12), (1, 12, 6)]:
        ours = rotary_embedding(spec.denoiser.config, frames, height, width, torch.device("cpu"))
        theirs = pipe._prepare_rotary_positional_embeddings(
            height * 8, width * 8, frames, torch.device("cpu")
        )
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b)


def test_cogvideox_15_pads_odd_latent_frames() -> None:
    """With ``patch_size_t`` (CogVideoX 1.5) an odd frame count is padded in front and cut again."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from sdpo.models.cogvideox import CogVideoXSpec
    from sdpo.schedules import NoiseSchedule

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**TINY_COGVIDEOX_15)
    scheduler = CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    spec = CogVideoXSpec(NoiseSchedule.from_scheduler(scheduler), transformer)
    conditions = {"encoder_hidden_states": torch.randn(1, 16, 16)}
    timesteps = spec.schedule.model_timestep(torch.tensor([500]))
    with torch.no_grad():
        for frames in (3, 4):
            latents = torch.randn(1, frames, 4, 4, 6)
            assert spec.predict(transformer, latents, timesteps, conditions).shape == latents.shape


def test_wan_schedule_normalisation_and_prompt_padding(folders: dict[str, Path]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdpo.schedules import NoiseSchedule

    spec = _spec(CASES["wan"], folders["wan"])
    # the UniPC flow scheduler of the folder trains on the same grid as flow matching with shift 3
    reference = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    torch.testing.assert_close(spec.schedule.sigmas, reference.sigmas)
    torch.testing.assert_close(spec.schedule.model_timesteps, spec.schedule.sigmas * 1000)

    pixels = torch.rand(1, 5, 3, 32, 32) * 2 - 1
    raw = spec.vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    mean = torch.tensor([0.1, -0.2, 0.3, -0.4]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(spec.encode_media(pixels), (raw - mean) / std)

    hidden = spec.encode_prompts(["ab", "a  b &amp; c"])["encoder_hidden_states"]
    assert hidden.shape == (2, spec.max_sequence_length, 16)
    lengths = (hidden.abs().sum(-1) > 0).sum(-1).tolist()
    assert lengths == [3, 5]  # "▁a b </s>" and "▁a ▁b ▁& ▁c </s>" (unescaped, spaces collapsed)
    assert hidden[:, 5:].abs().max() == 0  # positions after the prompt are zero


# ---------------------------------------------------------------------- registry and loading errors
def test_registry_lists_families_and_rejects_unknown() -> None:
    assert {"sd", "sdxl", "cogvideox", "wan"} <= set(SPECS)
    assert LAZY_SPECS["toy"] == "sdpo.toy.spec:ToySpec"
    assert known_families() == sorted({"sd", "sdxl", "cogvideox", "wan", "toy", *SPECS, *LAZY_SPECS})
    with pytest.raises(ValueError, match="unknown model family 'sd3'.*cogvideox.*toy.*wan"):
        load_spec("sd3", "/nowhere")


def test_lazy_family_is_imported_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpo.models.wan import WanSpec

    monkeypatch.setitem(LAZY_SPECS, "lazy-wan", "sdpo.models.wan:WanSpec")
    monkeypatch.delitem(SPECS, "lazy-wan", raising=False)
    assert spec_class("lazy-wan") is WanSpec
    assert SPECS.pop("lazy-wan") is WanSpec


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_spec("sd", str(missing))


def test_folder_without_component_names_it(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd"], broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match="unet"):
        load_spec("sd", str(broken))


def test_uncached_hub_id_fails_offline_with_one_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever the machine has
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model"):
        load_spec("wan", "nobody/no-such-model")


# ---------------------------------------------------------------------- sampling contract
@pytest.mark.parametrize("name", ["sd", "sdxl", "cogvideox", "cogvideox-rotary", "wan"])
def test_sample_from_initial_latents(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    """Same noise -> same pixels; a sample does not depend on its batch; a loaded LoRA changes the output."""
    case = CASES[name]
    spec = _spec(case, folders[name])
    assert spec.pretrained == str(folders[name])
    assert spec.pipeline_class.__name__ == spec.pipeline_name()
    assert spec.media_kind == ("video" if case.media_format.frames else "image")
    noise = spec.initial_latents(3, seed=7)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert tuple(noise.shape[1:]) == case.latents[1:] == spec.latent_shape()
    torch.testing.assert_close(spec.initial_latents(2, seed=7), noise[:2], rtol=0, atol=0)
    assert not torch.equal(spec.initial_latents(1, seed=8)[0], noise[0])

    prompts = ["a red cat", "a blue dog on a hill", "x"]
    settings = {"num_inference_steps": 2, "guidance_scale": 3.0}
    pixels = spec.sample(prompts, noise, seeds=[1, 2, 3], **settings)
    assert tuple(pixels.shape) == (3, *case.sample_shape[1:]) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and torch.isfinite(pixels).all()
    again = spec.sample(prompts, noise, seeds=[1, 2, 3], **settings)
    torch.testing.assert_close(again, pixels, rtol=0, atol=0)
    alone = spec.sample(prompts[1:2], noise[1:2], seeds=[2], **settings)
    torch.testing.assert_close(alone[0], pixels[1], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        spec.sample(prompts[:2], noise, **settings)

    spec.denoiser.add_adapter(peft.LoraConfig(target_modules=spec.lora_target_modules(), r=4, lora_alpha=4))
    _train_a_little(spec.denoiser)
    spec.save_lora(tmp_path / "run", spec.denoiser)
    tuned = _spec(case, folders[name])
    tuned.load_lora(tmp_path / "run")
    with_lora = tuned.sample(prompts[:1], noise[:1], seeds=[1], **settings)
    assert (with_lora - pixels[:1]).abs().max() > 1e-3
    with pytest.raises(FileNotFoundError, match="LoRA"):
        tuned.load_lora(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["sd", "sdxl", "cogvideox", "wan"])
def test_posterior_moments_are_in_the_latents_scale_and_layout(name: str, folders: dict[str, Path]) -> None:
    """What precompute stores: the mean is ``encode_media``'s latent, the std diffusers' ``latent_dist.std``
    scaled as the latents are (times scaling_factor; Wan: over latents_std), and a draw ``mean + std * eps``
    is diffusers' own posterior sample with the same eps."""
    case = CASES[name]
    spec = _spec(case, folders[name])
    pixels = torch.rand(case.pixels, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = spec.encode_media_moments(pixels)
    torch.testing.assert_close(mean, spec.encode_media(pixels))
    video = pixels.ndim == 5
    with torch.no_grad():
        raw = spec.vae.encode(pixels.permute(0, 2, 1, 3, 4) if video else pixels).latent_dist.std
    if name == "wan":
        expected = raw / torch.tensor(spec.vae.config.latents_std).view(1, -1, 1, 1, 1)
    else:
        expected = raw * spec.vae.config.scaling_factor
    if name == "cogvideox":
        expected = expected.permute(0, 2, 1, 3, 4)  # its transformer's (B, F, C, H, W)
    torch.testing.assert_close(std, expected)
    assert (std - (raw.permute(0, 2, 1, 3, 4) if name == "cogvideox" else raw)).abs().max() > 1e-3  # scaled
    eps = torch.randn(raw.shape, generator=torch.Generator().manual_seed(5))
    eps = eps.permute(0, 2, 1, 3, 4) if name == "cogvideox" else eps
    sampled = spec.encode_media(pixels, sample=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sampled, mean + std * eps, rtol=1e-4, atol=1e-5)
