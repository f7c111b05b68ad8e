"""`sdpo bench speed`: what a preference step costs against plain fine-tuning on the winners.

On one model and one batch, five steps are timed, interleaved round by round so that clock drift
favours none of them: supervised fine-tuning on the winners (one policy pass on B samples), the same
on both members of each pair (``sft-pairs``: 2B samples, what a preference step passes through the
policy), Diffusion-DPO, DPO-C&M and SDPO (policy and no-grad reference passes on 2B samples,
exactly ``sdpo.train.step.preference_step`` as the trainer runs it), Diffusion-KTO (the 2B members as
labelled samples, ``sample_step``: the same passes) and MaPO (``preference_step`` with no reference pass). Each step includes backward and an
AdamW update of the LoRA adapters. Peak memory is the steps' own: on a GPU the allocator's peak
above the memory held before the first step; on the CPU the peak of the resident set (sampled every
0.5 ms) above what the loaded model and batch hold, in a fresh process per arm (freed heap is not
always returned to the system, so arms measured one after another would hide each other's peaks).
Each arm's first warm-up step runs under ``sdpo.bench.flops``'s counter: its FLOPs over the median
step time give the achieved TFLOP/s, and on a GPU whose dense bf16 peak is known, the MFU (a second
table; "-" on a CPU or an unknown GPU). Arms are the ``ARMS`` tuple: a new one needs a stepper only.

Targets (issue 11): sdpo / diffusion-dpo <= 1.03 (the weights reuse predictions already made) and
diffusion-dpo / sft-pairs <= 1.40 (on the same 2B samples, the one extra no-grad reference pass is the
floor: about 4/3, a forward against a forward and backward). Against SFT on the B winners alone the
floor is twice that, about 8/3; that ratio is reported without a target. Issue 23: mapo / diffusion-dpo
<= 0.75 (no reference pass: about 3/4 of the passes' cost, a forward less out of four units).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from sdpo.bench.flops import count_flops, device_peak_tflops, mfu, tflops
from sdpo.errors import InputError
from sdpo.method_presets import method_preset

if TYPE_CHECKING:
    from sdpo.data.batch import PairBatch
    from sdpo.models.base import ModelSpec

ARMS = ("sft", "sft-pairs", "diffusion-dpo", "dpo-cm", "sdpo", "kto", "mapo")
"""Step kinds, in table order; all but the first two are MethodConfig presets (kto steps on the batch's 2B
members as labelled samples, winners desirable: the same 2B policy and reference passes as a pair step)."""
SFT_ARMS = frozenset({"sft", "sft-pairs"})
"""The supervised arms: on the B winners, and on both members (2B samples)."""

SpeedModel = Literal["sd-tiny", "toy", "toy-video"]
MODELS: tuple[SpeedModel, ...] = get_args(SpeedModel)
"""Models the CPU benchmark can build offline: a small random Stable Diffusion pipeline (64x64
pixels, the test suite's architecture) and the two embedded worlds' base-model architectures."""

SD_TINY_FORMAT_SIZE = 64
"""Pixel size of the sd-tiny benchmark images (latents 32x32); the toy worlds use their own size."""

RATIOS: dict[tuple[str, str], float | None] = {
    ("sdpo", "diffusion-dpo"): 1.03, ("diffusion-dpo", "sft-pairs"): 1.40, ("diffusion-dpo", "sft"): None,
    ("mapo", "diffusion-dpo"): 0.75, ("kto", "diffusion-dpo"): None}
"""Step-time ratios reported (numerator, denominator) -> their upper bound (None: no target)."""


@dataclass
class SpeedConfig:
    """Settings of `sdpo bench speed`."""

    models: tuple[SpeedModel, ...] = MODELS
    """Models to time (MODELS)."""
    batch_size: int = 4
    """Pairs per step (SFT takes the B winners)."""
    steps: int = 20
    """Timed steps per arm after the warm-up."""
    warmup: int = 3
    """Untimed steps per arm first (allocator, kernels, optimizer state)."""
    lora_rank: int = 8
    """Rank of the LoRA adapters trained."""
    memory: bool = True
    """Measure each arm's peak step memory (on the CPU: one fresh process per model and arm)."""
    device: str = "cpu"
    """Where the steps run ("cpu" or "cuda")."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    work_dir: str | None = None
    """Where model folders are built (default: a temporary folder)."""

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        unknown = [name for name in self.models if name not in MODELS]
        if unknown or not self.models:
            raise InputError(f"unknown model {unknown[0] if unknown else '(none)'}; choose from {', '.join(MODELS)}")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise InputError(f"warmup must be at least 1 (the first step pays one-off costs), got {self.warmup}")


def _model_folder(name: str, work: Path) -> tuple[str, Path]:
    """(family, model folder) of a benchmark model, built on first use under ``work``."""
    if name == "sd-tiny":
        from sdpo.models.tiny import build_tiny_sd

        folder = work / "sd-tiny"
        if not folder.is_dir():
            build_tiny_sd(folder)
        return "sd", folder
    from sdpo.toy.world import get_world

    # Step time does not depend on the weights: the world's architecture, pretrained for one step.
    world = get_world("image" if name == "toy" else "video", {"train_steps": 1})
    return world.family, world.pretrain(work / "toy-models", progress=False)


def _batch(spec: ModelSpec, pairs: int, device: torch.device) -> PairBatch:
    """A batch as training sees it: encoded random pixels for both members and encoded prompts."""
    from sdpo.data.batch import PairBatch

    media = spec.media_format
    shape: tuple[int, ...] = (media.channels, media.height, media.width)
    shape = (media.frames, *shape) if media.frames else shape
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((2 * pairs, *shape), generator=generator) * 2 - 1
    with torch.no_grad():
        latents = spec.encode_media(pixels).float()
        conditions = spec.encode_prompts([f"a photo of the digit {i % 10}" for i in range(pairs)])
    return PairBatch(chosen=latents[:pairs].to(device), rejected=latents[pairs:].to(device),
                     conditions={key: value.to(device) for key, value in conditions.items()})


def _stepper(spec: Any, arm: str, batch: Any, config: SpeedConfig) -> Callable[[int], float]:
    """A function doing one optimizer step of ``arm`` (draws keyed on the step) and returning its loss."""
    import peft

    from sdpo.data.batch import SampleBatch
    from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step, sample_step

    model = spec.denoiser
    model.add_adapter(peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                      target_modules=spec.lora_target_modules()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    schedule, pairs = spec.schedule, batch.chosen.shape[0]
    method = None if arm in SFT_ARMS else method_preset(arm)
    indices = torch.arange(pairs)
    copies = 2 if arm == "sft-pairs" else 1
    x0 = torch.cat([batch.chosen, batch.rejected]) if copies == 2 else batch.chosen
    conditions = {key: torch.cat([value] * copies) for key, value in batch.conditions.items()}
    samples = SampleBatch(torch.cat([batch.chosen, batch.rejected]), torch.arange(2 * pairs) < pairs,
                          {key: torch.cat([value] * 2) for key, value in batch.conditions.items()})

    def step(number: int) -> float:
        draws = draw_for_pairs(indices, number, 0, tuple(batch.chosen.shape[1:]), schedule.num_timesteps)
        if method is None:
            # both members of a pair share its timestep and noise, as in the preference step
            t = torch.cat([draws.timesteps] * copies).to(x0.device)
            noise = torch.cat([draws.noise] * copies).to(x0.device)
            noisy = schedule.add_noise(x0, noise, t)
            model_t = schedule.model_timestep(t).to(device=x0.device, dtype=torch.float32)
            prediction = spec.predict(model, noisy, model_t, conditions).float()
            loss = (prediction - schedule.target(x0, noise, t)).square().mean()
        elif method.unpaired:
            draws = draw_for_pairs(torch.arange(2 * pairs), number, 0, tuple(batch.chosen.shape[1:]),
                                   schedule.num_timesteps)
            loss = sample_step(spec, model, samples, draws, method, lambda: adapters_disabled(model)).output.loss
        else:
            loss = preference_step(spec, model, batch, draws, method, lambda: adapters_disabled(model)).output.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepared(name: str, arm: str, config: SpeedConfig, work: Path) -> tuple[Callable[[int], float], torch.device]:
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec

    family, folder = _model_folder(name, work)
    device = torch.device(config.device)
    spec = load_spec(family, folder, media_format=MediaFormat(3, SD_TINY_FORMAT_SIZE, SD_TINY_FORMAT_SIZE) if name == "sd-tiny" else None)
    spec.denoiser.to(device)
    batch = _batch(spec, config.batch_size, device)
    spec.denoiser.train()
    return _stepper(spec, arm, batch, config), device


def time_model(name: str, config: SpeedConfig, work: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each timed step per arm, the arms interleaved step by step, and the FLOPs of one step
    per arm, counted on its first warm-up step (``sdpo.bench.flops``; the counter's overhead is untimed)."""
    steppers = {arm: _prepared(name, arm, config, work) for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    flops: dict[str, int] = {}
    for number in range(config.warmup + config.steps):
        for arm, (step, device) in steppers.items():
            if number == 0:  # a warm-up step (warmup >= 1): counted, not timed
                flops[arm] = count_flops(lambda: step(0))  # noqa: B023 - called at once
                continue
            _sync(device)
            start = time.perf_counter()
            step(number)
            _sync(device)
            if number >= config.warmup:
                seconds[arm].append(time.perf_counter() - start)
    return seconds, flops


def throughput(flops: dict[str, int], medians: dict[str, float], peak: float | None) -> dict[str, dict[str, Any]]:
    """Per arm: achieved TFLOP/s (one step's FLOPs over its median time) and MFU against ``peak`` (None:
    no peak known for this device, as on a CPU)."""
    return {"tflops": {arm: tflops(flops[arm], medians[arm]) for arm in flops},
            "mfu": {arm: mfu(flops[arm], medians[arm], peak) for arm in flops}}


def resident_bytes() -> int:
    """This process's resident set in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ResidentPeak(threading.Thread):
    """Samples the resident set every half millisecond (torch releases the GIL inside its ops)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._finished = resident_bytes(), threading.Event()

    def run(self) -> None:
        while not self._finished.wait(0.0005):
            self.peak = max(self.peak, resident_bytes())

    def stop(self) -> int:
        self._finished.set()
        self.join()
        return max(self.peak, resident_bytes())


def step_peak_mb(name: str, arm: str, config: SpeedConfig, work: Path) -> float:
    """Peak memory one arm's warm-up steps add above what the loaded model and batch hold, in MiB."""
    step, device = _prepared(name, arm, config, work)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for number in range(config.warmup):
            step(number)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # give freed heap back, so the baseline is what is held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    held = resident_bytes()
    sampler = ResidentPeak()
    sampler.start()
    for number in range(config.warmup):
        step(number)
    return (sampler.stop() - held) / 2**20


def peak_in_fresh_process(name: str, arm: str, config: SpeedConfig, work: Path) -> float:
    """``step_peak_mb`` in a fresh process: freed heap is not always returned to the system, so one arm
    measured after another in the same process would hide the second's peak."""
    settings = json.dumps({**asdict(config), "models": [name]})
    code = ("import json, sys; from pathlib import Path; from sdpo.bench.speed import SpeedConfig, step_peak_mb; "
            "config = SpeedConfig(**json.loads(sys.argv[1])); "
            "print(step_peak_mb(sys.argv[2], sys.argv[3], config, Path(sys.argv[4])))")
    done = subprocess.run([sys.executable, "-c", code, settings, name, arm, str(work)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name}/{arm} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def run_speed(config: SpeedConfig) -> dict[str, Any]:
    """Time every model's four arms (and measure memory); returns the results as JSON-ready data."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    peak = device_peak_tflops(device)
    with tempfile.TemporaryDirectory(dir=config.work_dir) as scratch:
        work = Path(config.work_dir or scratch)
        rows = []
        for name in config.models:
            seconds, flops = time_model(name, config, work)
            medians = {arm: statistics.median(values) for arm, values in seconds.items()}
            memory = ({arm: (peak_in_fresh_process(name, arm, config, work) if config.device == "cpu"
                             else step_peak_mb(name, arm, config, work)) for arm in ARMS} if config.memory else {})
            ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS}
            rows.append({"model": name, "median_s": medians, "peak_mb": memory, "ratios": ratios, "flops": flops,
                         **throughput(flops, medians, peak),
                         "meets_targets": {f"{a}/{b}": ratios[f"{a}/{b}"] <= bound
                                           for (a, b), bound in RATIOS.items() if bound is not None}})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    machine = f"{platform.machine()} {config.device} ({device_name}), {torch.get_num_threads()} threads, torch {torch.__version__}"
    return {"config": asdict(config), "machine": machine, "device_name": device_name, "peak_tflops": peak, "rows": rows}


def markdown_table(results: dict[str, Any]) -> str:
    """The speed table: median ms per step, peak step memory and the two target ratios per model."""
    config = results["config"]
    lines = [f"Machine: {results['machine']}; batch {config['batch_size']} pairs, LoRA rank {config['lora_rank']}, "
             f"median of {config['steps']} steps after {config['warmup']} warm-up, arms interleaved.", "",
             "| model | " + " | ".join(f"{arm} ms" for arm in ARMS) + " | " + " | ".join(f"{arm} MiB" for arm in ARMS)
             + " | " + " | ".join(_ratio_header(a, b, bound) for (a, b), bound in RATIOS.items()) + " |",
             "|---" * (2 * len(ARMS) + len(RATIOS) + 1) + "|"]
    for row in results["rows"]:
        times = " | ".join(f"{1000 * row['median_s'][arm]:.1f}" for arm in ARMS)
        memory = " | ".join(f"{row['peak_mb'][arm]:.0f}" if row["peak_mb"] else "—" for arm in ARMS)
        ratios = " | ".join(f"{row['ratios'][f'{a}/{b}']:.3f}" for a, b in RATIOS)
        lines.append(f"| {row['model']} | {times} | {memory} | {ratios} |")
    return "\n".join(lines) + "\n\n" + throughput_table(results)


def throughput_table(results: dict[str, Any]) -> str:
    """One row per model and arm: FLOPs of a step, achieved TFLOP/s and MFU ("-" without a known peak)."""
    peak = results.get("peak_tflops")
    lines = ["Model FLOPs per step (matrix products, convolutions, attention; forward and backward) over the median "
             "step time; MFU against " + (f"a dense bf16 peak of {peak:g} TFLOP/s." if peak else
                                          "no known peak on this device (-)."), "",
             "| model | arm | GFLOP / step | TFLOP/s | MFU |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        for arm in row.get("flops", {}):
            utilisation = row["mfu"][arm]
            lines.append(f"| {row['model']} | {arm} | {row['flops'][arm] / 1e9:.3f} | {row['tflops'][arm]:.4f} | "
                         + (f"{utilisation:.1%}" if utilisation is not None else "-") + " |")
    return "\n".join(lines) + "\n"


def _ratio_header(numerator: str, denominator: str, bound: float | None) -> str:
    short = {"diffusion-dpo": "dpo"}
    text = f"{short.get(numerator, numerator)} / {short.get(denominator, denominator)}"
    return f"{text} (≤ {bound:g})" if bound is not None else text
