"""The ModelSpec of both embedded worlds: diffusers denoisers without a VAE, pixels as latents.

One class serves every toy base model: the digits world's ``UNet2DConditionModel`` (family "toy",
shaped like Stable Diffusion) and the moving-digits world's ``CogVideoXTransformer3DModel`` or
``WanTransformer3DModel`` (family "toy-video"). The grey pixels in [-1, 1] are the latents
themselves (identity encode), in the family's own layout: images (B, 1, 8, 8), CogVideoX clips
(B, F, C, H, W), Wan clips (B, C, F, H, W). Precompute, the trainer and the stages therefore treat
the toys exactly as they treat the real families, only faster; LoRA is saved and loaded through
the real pipeline classes (``StableDiffusionPipeline``, ``CogVideoXPipeline``, ``WanPipeline``).

Sampling is the toys' own deterministic sampler (no VAE for a diffusers pipeline to decode with):
DDIM with eta = 0 for the UNet and CogVideoX (``trailing`` spacing, ``set_alpha_to_one``), Euler
steps on the flow ODE for Wan, each with classifier-free guidance against the empty prompt. It adds
no noise after the start, so two models sampled from the same initial latents differ only by their
weights.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat, ModelNotFoundError, unwrap
from sdpo.models.loading import diffusers_dtype_keyword, load_scheduler
from sdpo.models.lora import checked_lora_folder
from sdpo.models.modules import module_device
from sdpo.models.spec_base import SpecBase
from sdpo.schedules import NoiseSchedule
from sdpo.toy.model_folder import MARKER_FILE, check_folder, corrupt_folder_error, read_marker
from sdpo.toy.pretrain_settings import PretrainSettings
from sdpo.toy.text_encoder import tokenize

WORLD_CONFIGS = {
    None: ("toy", "sdpo.toy.digits.model:ToyModelConfig"),
    "toy-video": ("toy-video", "sdpo.toy.moving.model:VideoToyConfig"),
}
"""Marker ``world`` entry -> (family name, config class) of each embedded world's base models."""
_PIPELINES = {"unet": "StableDiffusionPipeline", "cogvideox": "CogVideoXPipeline", "wan": "WanPipeline"}
# The projections of diffusers' BasicTransformerBlock: attention (self and cross) and feed-forward.
_UNET_LORA_CANDIDATES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_SAMPLE_BATCH = {"unet": 1024, "cogvideox": 256, "wan": 256}
"""Samples per forward pass of ``sample`` by default."""


def toy_media_format(config: PretrainSettings) -> MediaFormat:
    """The media format of a base-model config: 1 x 8 x 8 digits, or ``frames`` frames of ``canvas`` squared."""
    # A world's config extends PretrainSettings; the moving world's adds the clip's frames and canvas.
    frames, canvas = getattr(config, "frames", None), getattr(config, "canvas", None)
    if frames is None or canvas is None:
        from sdpo.toy.digits.data import IMAGE_SIZE

        return MediaFormat(channels=1, height=IMAGE_SIZE, width=IMAGE_SIZE)
    return MediaFormat(channels=1, height=canvas, width=canvas, frames=frames)


def _lora_candidates(arch: str) -> tuple[str, ...]:
    """The LoRA targets of the real family whose denoiser ``arch`` is."""
    if arch == "unet":
        return _UNET_LORA_CANDIDATES
    from sdpo.models.cogvideox import CogVideoXSpec
    from sdpo.models.wan import WanSpec

    return CogVideoXSpec.lora_candidates if arch == "cogvideox" else WanSpec.lora_candidates


def _config_class(folder: Path, world: Any) -> tuple[str, type[PretrainSettings]]:
    if world not in WORLD_CONFIGS:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} names an unknown world {world!r}")
    family, path = WORLD_CONFIGS[world]
    module, _, name = path.partition(":")
    return family, getattr(importlib.import_module(module), name)


class ToySpec(SpecBase):
    """A toy base model (denoiser + tiny CLIP text encoder) as a ModelSpec of family "toy" or "toy-video".

    Conditions: ``{"encoder_hidden_states": (B, max_prompt_tokens, D)}``, the text encoder's last layer
    for prompts padded to the fixed length (for CogVideoX that is its ``max_text_seq_length``).

    Attributes:
        family: "toy" (digits) or "toy-video" (moving digits), read from the folder.
        pretrained: the folder it was loaded from.
        config: the base-model config the folder was trained with.
        arch: "unet", "cogvideox" or "wan".
        denoiser: the network that is fine-tuned (also ``unet`` / ``transformer``).
        denoiser_subfolder: "unet" or "transformer".
        text_encoder: the CLIP text encoder, or None when loaded without it.
        tokenizer: the word-level fast tokenizer.
        scheduler: the training scheduler (DDPM, CogVideoXDDIM or FlowMatchEulerDiscrete).
        schedule: the NoiseSchedule read from ``scheduler``.
        media_format: the format of the world's media, fixed by the folder.
    """

    family: ClassVar[str] = "toy"
    default_media_format: ClassVar[MediaFormat | None] = None
    """None: the format is the folder's own (``toy_media_format`` of its config)."""
    vae: Any = None
    """None: the pixels are the latents."""

    def __init__(self, pretrained: str | Path, family: str, config: PretrainSettings, denoiser: nn.Module,
                 text_encoder: nn.Module | None, tokenizer: Any, scheduler: Any) -> None:
        self.pretrained: str | None = str(pretrained)
        self.family = family  # type: ignore[misc]  # one class, two families: set per folder
        self.config = config
        self.arch: str = getattr(config, "arch", "unet")
        self.denoiser = denoiser
        self.denoiser_subfolder = type(config).denoiser_subfolder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.media_format = toy_media_format(config)
        self.lora_candidates = _lora_candidates(self.arch)

    @property
    def unet(self) -> nn.Module:
        """The denoiser (the digits world's name for it)."""
        return self.denoiser

    @property
    def transformer(self) -> nn.Module:
        """The denoiser (the moving world's name for it)."""
        return self.denoiser

    @property
    def max_prompt_tokens(self) -> int:
        """The fixed padded prompt length the model was trained with."""
        return self.config.max_prompt_tokens

    @property
    def default_guidance_scale(self) -> float:
        """The guidance its world samples best with (validation samples use it unless told otherwise)."""
        from sdpo.toy.world import get_world

        return get_world(self.media_kind).guidance_scale  # worlds are named by their media kind

    @property
    def can_sample(self) -> bool:
        """True when the text encoder is loaded (the toys' sampler needs nothing else)."""
        return self.text_encoder is not None

    def pipeline_name(self) -> str:
        """The real family's pipeline, whose ``save_lora_weights`` / ``load_lora_weights`` the adapters use."""
        return _PIPELINES[self.arch]

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike[str],
        *,
        load_vae: bool = True,
        load_text_encoder: bool = True,
        media_format: MediaFormat | None = None,
        torch_dtype: torch.dtype = torch.float32,
        denoiser: nn.Module | None = None,
    ) -> ToySpec:
        """Load a folder written by ``sdpo.toy.pretraining.pretrain_base`` (either world).

        ``load_vae`` is accepted for the common signature and ignored: the toys have no VAE.
        ``media_format`` may only repeat the folder's own format. ``denoiser``: a network to use in place
        of the folder's, which is then not loaded (and left in the mode it is in).
        """
        del load_vae  # pixels are the latents
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"toy model folder not found: {folder} (create one with `sdpo demo`, "
                                     f"or sdpo.toy.pretrain_base)")
        family, config_class = _config_class(folder, read_marker(folder).get("world"))
        config = config_class.from_dict(check_folder(folder, config_class)["config"])
        if media_format is not None and media_format != toy_media_format(config):
            raise InputError(f"this toy model only handles {toy_media_format(config)}, got {media_format}")

        import diffusers
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        subfolder = config_class.denoiser_subfolder
        try:
            loaded = denoiser is None
            if denoiser is None:
                class_name = json.loads((folder / subfolder / "config.json").read_text())["_class_name"]
                denoiser = getattr(diffusers, class_name).from_pretrained(
                    folder / subfolder, **{diffusers_dtype_keyword(): torch_dtype})
            text_encoder = (CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype)
                            if load_text_encoder else None)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
            scheduler = load_scheduler(str(folder))
        except Exception as error:  # noqa: BLE001 - any load failure of a marked folder is damage
            raise corrupt_folder_error(folder, f"cannot load it ({type(error).__name__}: {error})") from error
        if loaded:
            denoiser.eval()
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        return cls(folder, family, config, denoiser, text_encoder, tokenizer, scheduler)

    # ---------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, max_prompt_tokens), padded as in pretraining."""
        return tokenize(self.tokenizer, list(prompts), self.max_prompt_tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, max_prompt_tokens, D)}`` from the text encoder's last layer."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        if self.text_encoder is None:
            raise RuntimeError(f"this {self.family} spec was loaded with load_text_encoder=False; "
                               f"it cannot encode prompts")
        ids = self.tokenize(list(prompts)).to(module_device(self.text_encoder))
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def _pixel_shape(self) -> tuple[int, ...]:
        fmt = self.media_format
        frames = () if fmt.frames is None else (fmt.frames,)
        return (*frames, fmt.channels, fmt.height, fmt.width)

    def _check_media(self, pixels: Tensor, what: str) -> None:
        expected = self._pixel_shape()
        if pixels.ndim != len(expected) + 1 or tuple(pixels.shape[1:]) != expected:
            raise InputError(f"{what} must have shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")

    def _to_layout(self, pixels: Tensor) -> Tensor:
        # Wan keeps channels before frames; the UNet and CogVideoX take the pixels as they are.
        return pixels.permute(0, 2, 1, 3, 4) if self.arch == "wan" else pixels

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latents in the family's layout."""
        return tuple(self._to_layout(torch.empty((1, *self._pixel_shape()))).shape[1:])

    def encode_media(self, pixels: Tensor) -> Tensor:
        """Latents for media in [-1, 1]: the pixels themselves, in the family's layout."""
        self._check_media(pixels, "toy media")
        return self._to_layout(pixels).contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Media from latents in the family's layout (the inverse of ``encode_media``)."""
        pixels = self._to_layout(latents)  # the permutation is its own inverse
        self._check_media(pixels, "decoded latents")
        return pixels

    # ---------------------------------------------------------------- the network
    def predict(self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]) -> Tensor:
        """The denoiser's prediction in its native target (eps or v; u for Wan) for latents in the layout."""
        hidden = conditions["encoder_hidden_states"]
        if self.arch == "unet":
            return model(noisy_latents, timesteps, encoder_hidden_states=hidden).sample
        from sdpo.toy.moving.model import check_transformer_inputs, run_transformer

        self._check_media(self._to_layout(noisy_latents), "noisy latents (in clip layout)")
        check_transformer_inputs(model, self.arch, noisy_latents, hidden)
        timesteps = torch.as_tensor(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        return run_transformer(model, self.arch, noisy_latents, timesteps, hidden)

    # ---------------------------------------------------------------- sampling
    def sampling_scheduler(self) -> Any:
        """A fresh sampling scheduler on the model's own training schedule.

        DDIM (the UNet; CogVideoX's own DDIM) with ``trailing`` spacing, so the first step is the last
        training step, and ``set_alpha_to_one``, so the last step lands on the clean estimate; Wan's
        flow-matching scheduler with the training shift, deterministic Euler steps.
        """
        if self.arch == "wan":
            return type(self.scheduler).from_config(self.scheduler.config)
        scheduler_class: Any = type(self.scheduler)
        if self.arch == "unet":
            from diffusers import DDIMScheduler

            scheduler_class = DDIMScheduler
        return scheduler_class.from_config(self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        latents: Tensor,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        model: nn.Module | None = None,
        progress: bool = False,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Media in [-1, 1], float32 on the CPU (images (B, 1, 8, 8), clips (B, F, 1, H, W)), sampled by
        ``model`` (default: the denoiser, adapters as they are) for ``prompts`` from ``latents``.

        ``guidance_scale`` w weighs ``pred_u + w (pred_c - pred_u)`` with the empty prompt as the
        unconditional branch (1 disables guidance: one forward per step). ``seeds`` is accepted for
        the common signature and unused: the sampler adds no noise after the start.
        """
        from tqdm.auto import tqdm

        del seeds
        prompts = list(prompts)
        shape = self.latent_shape()
        if latents.ndim != len(shape) + 1 or latents.shape[0] != len(prompts) or tuple(latents.shape[1:]) != shape:
            raise InputError(f"latents must have shape ({len(prompts)}, {', '.join(map(str, shape))}) for "
                             f"{len(prompts)} prompts, got {tuple(latents.shape)}")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        model = self.denoiser if model is None else model
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        guided = guidance_scale != 1.0
        batch_size = batch_size or _SAMPLE_BATCH[self.arch]

        was_training = model.training
        model.eval()
        conditions = self.encode_prompts(prompts)["encoder_hidden_states"].to(device=device, dtype=dtype)
        empty = self.encode_prompts([""])["encoder_hidden_states"].to(device=device, dtype=dtype)
        outputs = []
        chunks = range(0, len(prompts), batch_size)
        bar = tqdm(total=len(chunks) * num_inference_steps, desc="sampling", disable=not progress, leave=False)
        try:
            for start in chunks:
                # A fresh scheduler per chunk: the flow scheduler counts its steps internally.
                scheduler = self.sampling_scheduler()
                scheduler.set_timesteps(num_inference_steps, device=device)
                x = latents[start : start + batch_size].to(device=device, dtype=dtype)
                cond = conditions[start : start + batch_size]
                hidden = torch.cat([empty.expand(x.shape[0], -1, -1), cond]) if guided else cond
                for t in scheduler.timesteps:
                    inputs = torch.cat([x, x]) if guided else x
                    prediction = self.predict(model, inputs, t.expand(inputs.shape[0]),
                                              {"encoder_hidden_states": hidden})
                    if guided:
                        unconditional, conditional = prediction.chunk(2)
                        prediction = unconditional + guidance_scale * (conditional - unconditional)
                    x = scheduler.step(prediction, t, x, return_dict=False)[0]
                    bar.update(1)
                outputs.append(self.decode_latents(x).clamp(-1.0, 1.0).float().cpu())
        finally:
            bar.close()
            model.train(was_training)
        return torch.cat(outputs) if outputs else torch.zeros((0, *self._pixel_shape()))

    # ---------------------------------------------------------------- saving and LoRA
    def save_lora(
        self, output_dir: str | os.PathLike[str], model: nn.Module, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the adapters as ``pytorch_lora_weights.safetensors``, readable by the pipeline's ``load_lora_weights``.

        The adapter config (rank, alpha, targets) goes into the file's metadata, so a reload restores
        the same scale even when ``lora_alpha != r``.
        """
        if not getattr(unwrap(model), "peft_config", None):
            raise InputError("the model has no LoRA adapters to save; use save_full for a fully tuned denoiser")
        super().save_lora(output_dir, model, state_dict)

    def save_full(
        self, output_dir: str | os.PathLike[str], model: nn.Module, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the fully fine-tuned denoiser to ``output_dir/<unet|transformer>`` (a ``from_pretrained`` folder)."""
        if getattr(unwrap(model), "peft_config", None):
            raise InputError("the model carries LoRA adapters: save them with save_lora (or fuse them first)")
        super().save_full(output_dir, model, state_dict)

    def load_lora(self, folder: str | os.PathLike[str], model: nn.Module | None = None) -> None:
        """Load adapters written by ``save_lora`` (a run folder) into ``model`` (default: the denoiser).

        Goes through the family pipeline's ``lora_state_dict`` / ``load_lora_into_*``, the path
        ``load_lora_weights`` takes on a real pipeline.
        """
        path = checked_lora_folder(folder)
        target = unwrap(self.denoiser if model is None else model)
        pipeline = self.pipeline_class
        if self.arch == "unet":
            state_dict, alphas, metadata = pipeline.lora_state_dict(str(path), return_lora_metadata=True)
            pipeline.load_lora_into_unet(state_dict, network_alphas=alphas, unet=target, metadata=metadata)
        else:
            state_dict, metadata = pipeline.lora_state_dict(str(path), return_lora_metadata=True)
            pipeline.load_lora_into_transformer(state_dict, transformer=target, metadata=metadata)
