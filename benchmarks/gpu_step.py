"""Time one LoRA preference step of every real architecture at full size and the paper's resolutions.

Each denoiser is built from its published config (``benchmarks.architectures``) with random weights,
directly on the device in bf16, wrapped in its family spec, given rank-64 LoRA adapters (float32) on
``spec.lora_target_modules()`` and trained with gradient checkpointing and AdamW on one pair per
step (winner + loser): policy forward + backward and a reference forward with the adapters disabled,
exactly through ``sdpo.train.step.preference_step`` as the trainer runs it.

Per model and method it reports parameters, trainable LoRA parameters, the median seconds per step,
the peak GPU memory and the cost of the importance-weight computation timed on its own, so that
plain Diffusion-DPO and SDPO can be compared (the weights cost ~nothing next to the networks).
Methods are interleaved step by step, so clock drift does not favour one of them.

    python -m benchmarks.gpu_step --json results.json                  # all models, on cuda
    python -m benchmarks.gpu_step --models sd15,wan2.1-1.3b --steps 5
    python -m benchmarks.gpu_step --tiny --device cpu --steps 1        # tiny configs, seconds on CPU
    python -m benchmarks.gpu_step --count-only                          # parameter counts (meta device)
    python -m benchmarks.gpu_step --models cogvideox-5b --compile --model-flops benchmarks/results/step-flops.json

Before the timed steps, one eager step runs under ``sdpo.bench.flops``' counter: the FLOPs the device
does (with checkpointing, the recomputation included) and which SDPA kernel ran (flash, efficient,
cudnn or math). Model FLOPs for TFLOP/s and MFU come from ``--model-flops`` (``benchmarks.step_flops``
on the meta device), or, with ``--no-checkpointing``, from that count itself.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.architectures import (  # noqa: E402
    ARCHS,
    Arch,
    add_lora,
    build_denoiser,
    count_parameters,
    make_batch,
    make_spec,
)
from benchmarks.architectures import sync as _sync  # noqa: E402
from sdpo.bench.flops import attention_kernels, device_peak_tflops, flop_counter, mfu, tflops  # noqa: E402

REPEATED_BLOCKS = ("CogVideoXBlock", "WanTransformerBlock", "BasicTransformerBlock")
"""The denoisers' repeated blocks, each compiled on its own by --compile (regional compilation: one
graph serves every block of a class, so compiling takes a block's time, not the model's)."""

# ---------------------------------------------------------------------- measuring

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


def compile_blocks(model: nn.Module, backend: str) -> int:
    """``torch.compile`` each repeated block in place (``REPEATED_BLOCKS``); returns how many."""
    blocks = [module for module in model.modules() if type(module).__name__ in REPEATED_BLOCKS]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def model_flops_table(path: str | None) -> dict[str, dict[str, float]]:
    """Rows of ``benchmarks.step_flops --json`` by model (model and hardware TFLOP of one step)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        return {row["model"]: row for row in json.load(handle)["rows"]}


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

    # One eager step under the FLOP counter first (it warms the kernels up too): the FLOPs the device
    # does (the recomputation included when checkpointing) and which SDPA kernel ran.
    counter = flop_counter()
    with counter:
        seconds, _, _ = one_step(methods[0])
    counted_flops, kernels = int(counter.get_total_flops()), attention_kernels(counter)
    print(f"{tag} counted step: {counted_flops / 1e12:.1f} TFLOP, attention kernel(s) {', '.join(kernels) or 'none'}"
          f", {seconds:.2f} s under the counter", flush=True)
    if args.compile:
        compiled = compile_blocks(model, args.compile_backend)
        print(f"{tag} torch.compile ({args.compile_backend}) of {compiled} blocks", flush=True)
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
    known = args.model_flops.get(arch.name, {}) if args.rank == 64 and not args.tiny else {}
    model_flops = known.get("model_tflop", math.nan) * 1e12 if known else (
        counted_flops if args.no_checkpointing else math.nan)  # without checkpointing the count is the model's
    peak = device_peak_tflops(device)
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
            "counted_tflop": counted_flops / 1e12,
            "model_tflop": model_flops / 1e12 if math.isfinite(model_flops) else None,
            "attention": kernels,
            "compiled": args.compile,
            "checkpointing": not args.no_checkpointing,
            "tflops": tflops(model_flops, median) if math.isfinite(model_flops) else None,
            "mfu": mfu(model_flops, median, peak) if math.isfinite(model_flops) else None,
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
              "| weights ms | vs first method | counted TFLOP | model TFLOP/s | MFU | attention |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['method']} | {row['status']} |" + " |" * 10)
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
            _fmt(row["vs_first_method_pct"], "+.1f", suffix="%"),
            _fmt(row.get("counted_tflop"), ".4g"),
            _fmt(row.get("tflops"), ".0f"),
            _fmt(row.get("mfu"), ".1%"),
            ", ".join(row.get("attention", [])) + " |",
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each repeated denoiser block (regional compilation) after the counted step")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--model-flops", default=None, metavar="JSON",
                        help="benchmarks.step_flops --json output: model FLOPs per step, for TFLOP/s and MFU "
                             "(without it, only a --no-checkpointing run knows its model FLOPs: its own count)")
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
    args.model_flops = model_flops_table(args.model_flops)
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
          f"rank={args.rank} dtype={args.dtype} checkpointing={not args.no_checkpointing} tiny={args.tiny} "
          f"compile={args.compile}", flush=True)

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
