"""Time one LoRA preference step of every real architecture at full size and the paper's resolutions.

Each denoiser is built from its published config with random weights (nothing is downloaded),
directly on the device in bf16, wrapped in its family spec, given rank-64 LoRA adapters (float32) on
``spec.lora_target_modules()`` and trained with gradient checkpointing and AdamW on one pair per
step (winner + loser): policy forward + backward and a reference forward with the adapters disabled,
exactly through ``sdpo.train.step.preference_step`` as the trainer runs it.

Per model and method it reports parameters, trainable LoRA parameters, the median seconds per step,
the peak GPU memory and the cost of the importance-weight computation timed on its own, so that
plain Diffusion-DPO and SDPO can be compared (the weights cost ~nothing next to the networks).
Methods are interleaved step by step, so clock drift does not favour one of them.

    python benchmarks/gpu_step.py --json results.json                  # all models, on cuda
    python benchmarks/gpu_step.py --models sd15,wan2.1-1.3b --steps 5
    python benchmarks/gpu_step.py --tiny --device cpu --steps 1        # tiny configs, seconds on CPU
    python benchmarks/gpu_step.py --count-only                          # parameter counts (meta device)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

# ---------------------------------------------------------------------- published configs
# Denoiser configs from the diffusers folders of the published checkpoints. Keys left out have the
# same value in the published config and the class default. --count-only checks the sizes.

SD15_UNET: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5, unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SDXL_UNET: dict[str, Any] = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled text 1280
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

COGVIDEOX_2B: dict[str, Any] = {  # THUDM/CogVideoX-2b, transformer/config.json
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
}

COGVIDEOX_5B: dict[str, Any] = {  # THUDM/CogVideoX-5b, transformer/config.json
    **COGVIDEOX_2B,
    "num_attention_heads": 48,
    "num_layers": 42,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
}

WAN21_1_3B: dict[str, Any] = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

# ---------------------------------------------------------------------- tiny configs (--tiny)
# The sizes of sdpo.models.tiny: same classes and code paths, a few thousand parameters.

_TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
TINY_SD15 = dict(_TINY_UNET)
TINY_SDXL = {
    **_TINY_UNET,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
    "use_linear_projection": True,
}
TINY_COGVIDEOX_2B: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 9,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 16,
    "use_rotary_positional_embeddings": False,
}
TINY_COGVIDEOX_5B = {**TINY_COGVIDEOX_2B, "attention_head_dim": 16, "use_rotary_positional_embeddings": True}
TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}


# ---------------------------------------------------------------------- schedulers
def _sd_scheduler() -> Any:
    """SD1.5 / SDXL training betas: DDPM, scaled_linear 0.00085..0.012, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def _cogvideox_scheduler(snr_shift_scale: float) -> Callable[[], Any]:
    """CogVideoX: v-prediction on zero-terminal-SNR betas with an SNR shift (3.0 for 2B, 1.0 for 5B)."""

    def build() -> Any:
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            snr_shift_scale=snr_shift_scale,
        )

    return build


def _wan_scheduler() -> Any:
    """Wan 2.1 at 480p: rectified flow with sigmas shifted by 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# ---------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """One benchmarked model: how to build it and the shapes of one pair member's inputs."""

    name: str
    published: str
    """Published parameter count of the denoiser, for the sanity check."""
    denoiser_class: str
    """diffusers class of the denoiser."""
    family: str
    """sdpo spec: "sd", "sdxl", "cogvideox" or "wan"."""
    config: dict[str, Any]
    tiny_config: dict[str, Any]
    scheduler: Callable[[], Any]
    media: tuple[int, int, int | None]
    """Pixel (height, width, frames) of the paper's setting."""
    latents: tuple[int, ...]
    """Latent shape of one sample, in the family's layout."""
    text: tuple[int, int]
    """(tokens, width) of the text conditioning."""
    tiny_latents: tuple[int, ...]
    tiny_text: tuple[int, int]
    pooled: int = 0
    """Width of SDXL's pooled text embedding (0 for the others)."""
    tiny_pooled: int = 0


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("sd15", "0.86B", "UNet2DConditionModel", "sd", SD15_UNET, TINY_SD15, _sd_scheduler,
             (512, 512, None), (4, 64, 64), (77, 768), (4, 8, 8), (8, 32)),
        Arch("sdxl", "2.6B", "UNet2DConditionModel", "sdxl", SDXL_UNET, TINY_SDXL, _sd_scheduler,
             (1024, 1024, None), (4, 128, 128), (77, 2048), (4, 8, 8), (8, 32), pooled=1280, tiny_pooled=16),
        Arch("cogvideox-2b", "1.7B", "CogVideoXTransformer3DModel", "cogvideox", COGVIDEOX_2B,
             TINY_COGVIDEOX_2B, _cogvideox_scheduler(3.0),
             (480, 720, 49), (13, 16, 60, 90), (226, 4096), (3, 4, 8, 8), (16, 16)),
        Arch("cogvideox-5b", "5.6B", "CogVideoXTransformer3DModel", "cogvideox", COGVIDEOX_5B,
             TINY_COGVIDEOX_5B, _cogvideox_scheduler(1.0),
             (480, 720, 49), (13, 16, 60, 90), (226, 4096), (3, 4, 8, 8), (16, 16)),
        Arch("wan2.1-1.3b", "1.4B", "WanTransformer3DModel", "wan", WAN21_1_3B, TINY_WAN, _wan_scheduler,
             (480, 832, 81), (16, 21, 60, 104), (512, 4096), (4, 2, 8, 8), (8, 16)),
    )
}


# ---------------------------------------------------------------------- building
@contextlib.contextmanager
def building_on(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors on ``device`` with floating default ``dtype`` (no fp32 copy on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_denoiser(arch: Arch, tiny: bool, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The denoiser with random weights, built on ``device`` in ``dtype`` and cast as the trainer casts it."""
    import diffusers

    denoiser_class = getattr(diffusers, arch.denoiser_class)
    with building_on(device, dtype):
        model = denoiser_class(**(arch.tiny_config if tiny else arch.config))
    if torch.device(device).type != "meta":
        from sdpo.train.trainer import cast_frozen

        cast_frozen(model, device, dtype)  # exactly as the trainer casts the frozen base
    return model


def make_spec(arch: Arch, denoiser: nn.Module) -> Any:
    """The family spec around ``denoiser``, with the schedule of the model's own scheduler config."""
    from sdpo.models.base import MediaFormat
    from sdpo.schedules import NoiseSchedule

    if arch.family == "sd":
        from sdpo.models.sd import StableDiffusionSpec as spec_class
    elif arch.family == "sdxl":
        from sdpo.models.sd import StableDiffusionXLSpec as spec_class
    elif arch.family == "cogvideox":
        from sdpo.models.cogvideox import CogVideoXSpec as spec_class
    elif arch.family == "wan":
        from sdpo.models.wan import WanSpec as spec_class
    else:
        raise ValueError(f"unknown family {arch.family!r}")
    height, width, frames = arch.media
    return spec_class(
        NoiseSchedule.from_scheduler(arch.scheduler()),
        denoiser,
        media_format=MediaFormat(height=height, width=width, frames=frames),
    )


def add_lora(spec: Any, model: nn.Module, rank: int) -> int:
    """Rank-``rank`` adapters on the spec's targets, trained in float32 as the trainer does; their size."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=spec.lora_target_modules())
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_batch(arch: Arch, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """One random pair: float32 latents (as the cache stores them) and conditioning in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    latents = arch.tiny_latents if tiny else arch.latents
    tokens, width = arch.tiny_text if tiny else arch.text

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator)

    cond = {"encoder_hidden_states": normal(1, tokens, width).to(device, dtype)}
    pooled = arch.tiny_pooled if tiny else arch.pooled
    if pooled:
        height, width_px, _ = arch.media
        cond["text_embeds"] = normal(1, pooled).to(device, dtype)
        cond["time_ids"] = torch.tensor([[height, width_px, 0, 0, height, width_px]], dtype=dtype, device=device)
    from sdpo.data.batch import PairBatch

    return PairBatch(chosen=normal(1, *latents).to(device), rejected=normal(1, *latents).to(device), conditions=cond)


# ---------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_weight_computation(spec: Any, method: Any, latents: tuple[int, ...], device: torch.device,
                            repeats: int) -> float:
    """Median milliseconds of the step's weight block (x0_hat, previous t, log w, transform) alone.

    The same calls ``preference_step`` makes after the forward passes, on tensors of the pair's shape.
    """
    from sdpo.importance import log_importance_weight, log_relative_weight

    schedule = spec.schedule
    generator = torch.Generator().manual_seed(1)
    shape = (2, *latents)
    x0, noise, prediction, reference_prediction, weight_noise = (
        torch.randn(shape, generator=generator).to(device) for _ in range(5)
    )
    t = torch.full((2,), schedule.num_timesteps // 2, dtype=torch.long, device=device)
    noisy = schedule.add_noise(x0, noise, t)

    def weights() -> Tensor:
        x0_hat = schedule.x0_from_prediction(noisy, prediction, t)
        previous = schedule.previous_timestep(t, method.num_inference_steps)
        sampled = weight_noise if method.estimator == "sampled" else None
        if method.estimator == "relative":
            x0_hat_ref = schedule.x0_from_prediction(noisy, reference_prediction, t)
            log_w = log_relative_weight(schedule, x0, x0_hat, x0_hat_ref, t, previous)
        else:
            log_w = log_importance_weight(schedule, x0, x0_hat, t, previous, noise=sampled)
        return method.transform(log_w.exp())

    times = []
    with torch.no_grad():
        for index in range(repeats + 2):
            _sync(device)
            start = time.perf_counter()
            weights()
            _sync(device)
            if index >= 2:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def bench_model(arch: Arch, args: argparse.Namespace, methods: list[Any]) -> list[dict[str, Any]]:
    """Build, adapt and time one model; one row per method. Raises on failure (the caller reports it)."""
    from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tag = f"[{arch.name}]"
    _reset_peak(device)
    start = time.perf_counter()
    model = build_denoiser(arch, args.tiny, device, dtype)
    params = count_parameters(model)
    spec = make_spec(arch, model)
    with torch.device(device):  # adapters made on the device too, not initialised on the CPU and copied
        lora_params = add_lora(spec, model, args.rank)
    if not args.no_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    batch = make_batch(arch, args.tiny, device, dtype, args.seed)
    latent_shape = tuple(batch.chosen.shape[1:])
    _sync(device)
    build_s = time.perf_counter() - start
    peak_build = _peak_gb(device)
    resident_gb = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"{tag} {arch.denoiser_class}: {_count(params)} parameters (published ~{arch.published}), "
          f"LoRA r={args.rank}: {_count(lora_params)} trainable, built in {build_s:.1f} s"
          + (f", {peak_build:.1f} GB" if peak_build is not None else ""), flush=True)

    def reference() -> contextlib.AbstractContextManager[nn.Module]:
        return adapters_disabled(model)

    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    step_index = 0

    def one_step(method: Any) -> tuple[float, float | None, float]:
        nonlocal step_index
        _sync(device)
        _reset_peak(device)
        begin = time.perf_counter()
        draws = draw_for_pairs(torch.arange(1), step_index, args.seed, latent_shape, spec.schedule.num_timesteps,
                               with_weight_noise=method.estimator == "sampled")
        with autocast:
            result = preference_step(spec, model, batch, draws, method, reference)
        result.output.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_index += 1
        return time.perf_counter() - begin, _peak_gb(device), float(result.output.loss.detach())

    times: dict[str, list[float]] = {m.name: [] for m in methods}
    peaks: dict[str, list[float]] = {m.name: [] for m in methods}
    losses: dict[str, float] = {}
    for method in methods:
        for _ in range(args.warmup):
            seconds, peak, loss = one_step(method)
            print(f"{tag} {method.name} warm-up step: {seconds:.2f} s", flush=True)
    for index in range(args.steps):
        for method in methods:  # interleaved, so drift hits every method alike
            seconds, peak, loss = one_step(method)
            times[method.name].append(seconds)
            if peak is not None:
                peaks[method.name].append(peak)
            losses[method.name] = loss
            memory = f", peak {peak:.1f} GB" if peak is not None else ""
            print(f"{tag} {method.name} step {index + 1}/{args.steps}: {seconds:.3f} s{memory}, "
                  f"loss {loss:.4f}", flush=True)

    rows = []
    baseline: float | None = None
    for method in methods:
        median = statistics.median(times[method.name])
        baseline = median if baseline is None else baseline
        weights_ms = time_weight_computation(spec, method, latent_shape, device, args.weight_repeats)
        rows.append({
            "model": arch.name,
            "method": method.name,
            "status": "ok",
            "denoiser": arch.denoiser_class,
            "params": params,
            "published_params": arch.published,
            "lora_params": lora_params,
            "lora_rank": args.rank,
            "latents": [2, *latent_shape],
            "median_s": median,
            "times_s": times[method.name],
            "peak_gb": max(peaks[method.name]) if peaks[method.name] else None,
            "resident_gb": resident_gb,
            "build_peak_gb": peak_build,
            "build_s": build_s,
            "weights_ms": weights_ms,
            "vs_first_method_pct": 100.0 * (median - baseline) / baseline,
            "loss": losses[method.name],
        })
        print(f"{tag} {method.name}: median {median:.3f} s/step, weight computation {weights_ms:.3f} ms",
              flush=True)
    return rows


def failed_rows(arch: Arch, methods: list[Any], status: str) -> list[dict[str, Any]]:
    return [{"model": arch.name, "method": m.name, "status": status, "denoiser": arch.denoiser_class,
             "published_params": arch.published} for m in methods]


# ---------------------------------------------------------------------- reporting
def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value / scale:{spec}}{suffix}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.{3 if suffix == 'B' else 1}f}{suffix}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | method | params | LoRA params | latents (pair) | s/step (median) | peak GB "
              "| weights ms | vs first method |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['method']} | {row['status']} | | | | | | |")
            continue
        lines.append(" | ".join([
            f"| {row['model']}",
            row["method"],
            _count(row["params"]),
            _count(row["lora_params"]),
            "x".join(str(d) for d in row["latents"]),
            _fmt(row["median_s"], ".3f"),
            _fmt(row["peak_gb"], ".1f"),
            _fmt(row["weights_ms"], ".2f"),
            _fmt(row["vs_first_method_pct"], "+.1f", suffix="%") + " |",
        ]))
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import peft

    info: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "peft": peft.__version__, "python": platform.python_version(),
                            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def count_only(archs: list[Arch], tiny: bool, rank: int, with_lora: bool = True) -> list[dict[str, Any]]:
    """Parameter (and LoRA) counts from models built on the meta device (no memory, no steps)."""
    rows = []
    print(f"| model | parameters | published | LoRA r={rank} |\n|---|---|---|---|", flush=True)
    for arch in archs:
        model = build_denoiser(arch, tiny, "meta", torch.bfloat16)
        params = count_parameters(model)
        lora = None
        if with_lora:
            spec = make_spec(arch, model)
            with torch.device("meta"):
                lora = add_lora(spec, model, rank)
        rows.append({"model": arch.name, "params": params, "published_params": arch.published, "lora_params": lora})
        print(f"| {arch.name} | {_count(params)} | ~{arch.published} | {_count(lora)} |", flush=True)
        del model
    return rows


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help=f"comma list of {', '.join(ARCHS)} (default all)")
    parser.add_argument("--method", default="diffusion-dpo,sdpo",
                        help="comma list of methods to time (presets; default diffusion-dpo,sdpo); 'all' for every one")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and method (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and method first (default 1)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="base weight dtype (default bf16)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 64; 4 with --tiny)")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and latents: runs on CPU in seconds")
    parser.add_argument("--count-only", action="store_true",
                        help="only count parameters (models built on the meta device; no steps)")
    parser.add_argument("--weight-repeats", type=int, default=20, help="repeats when timing the weights alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows and environment here as JSON")
    args = parser.parse_args(argv)
    if args.rank is None:
        args.rank = 4 if args.tiny else 64
    if args.steps < 1 or args.warmup < 0 or args.rank < 1 or args.weight_repeats < 1:
        parser.error("--steps, --rank and --weight-repeats must be >= 1 and --warmup >= 0")
    names = list(ARCHS) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ARCHS]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    args.models = names
    from sdpo.objectives import METHODS

    args.method = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in args.method if m not in METHODS]
    if bad or not args.method:
        parser.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the table rows (one per model and method)."""
    from sdpo.objectives import MethodConfig

    args = parse_args(argv)
    archs = [ARCHS[name] for name in args.models]
    if args.count_only:
        rows = count_only(archs, args.tiny, args.rank)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"rows": rows}, handle, indent=2)
        return rows

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu (and --tiny) to run on the CPU")
    methods = [MethodConfig.preset(name) for name in args.method]
    info = environment(device)
    print(f"environment: {info}", flush=True)
    print(f"settings: models={args.models} methods={args.method} steps={args.steps} warmup={args.warmup} "
          f"rank={args.rank} dtype={args.dtype} checkpointing={not args.no_checkpointing} tiny={args.tiny}",
          flush=True)

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for arch in archs:
        status = None
        try:
            rows.extend(bench_model(arch, args, methods))
        except torch.cuda.OutOfMemoryError:
            status = "OOM"
            print(f"[{arch.name}] out of GPU memory", flush=True)
        except Exception as error:  # noqa: BLE001 - one model's failure must not lose the others
            status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            traceback.print_exc()
            sys.stderr.flush()
        if status is not None:  # after the except block, so the traceback (and its tensors) is gone
            rows.extend(failed_rows(arch, methods, status))
        _free(device)
        print(f"[{arch.name}] done, {time.perf_counter() - started:.0f} s elapsed", flush=True)
        if args.json:  # after every model, so a run cut short still leaves what it measured
            write_json(args.json, info, args, rows)

    print("\n" + markdown_table(rows), flush=True)
    if args.json:
        print(f"wrote {args.json}", flush=True)
    return rows


def write_json(path: str, info: dict[str, Any], args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    payload = {"environment": info, "settings": settings, "rows": rows, "table": markdown_table(rows)}
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(temporary, path)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(row.get("status", "ok") in ("ok", "OOM") for row in result) else 1)
