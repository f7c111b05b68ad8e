"""Run the real-model engine end to end on a GPU: precompute, train, export, load, sample.

The test suite runs these paths on the CPU in float32. This script runs them where users run them:
tiny random pipelines of every family (saved with ``save_pretrained``, loaded back as a real folder),
``sdpo precompute`` with the encoders on the GPU in bf16, ``sdpo train`` with bf16 mixed precision
and gradient checkpointing for every method, one full fine-tune with an offloaded reference copy, and
the LoRA loaded by the family's diffusers pipeline on the GPU. ``--accelerate-config`` adds runs
launched through ``accelerate launch`` with that config (e.g. FSDP), LoRA and full, whose outputs
are loaded back. It prints one row per run and exits non-zero if any run failed or logged a
non-finite loss.

    python -m benchmarks.gpu_engine_check                       # on cuda
    python -m benchmarks.gpu_engine_check --families wan --accelerate-config configs/accelerate/fsdp.yaml
    python -m benchmarks.gpu_engine_check --device cpu --families sd --steps 1   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# family: (tiny builder name, pixel height/width, frames or None, builder keyword arguments)
FAMILIES: dict[str, tuple[str, int, int | None, dict[str, Any]]] = {
    "sd": ("build_tiny_sd", 16, None, {}),
    "sdxl": ("build_tiny_sdxl", 16, None, {}),
    "cogvideox": ("build_tiny_cogvideox", 32, 9, {"rotary": True}),
    "wan": ("build_tiny_wan", 32, 5, {}),
}


def write_random_pairs(folder: Path, size: int, frames: int | None, count: int) -> Path:
    """``count`` pairs of random images (or clips as frame folders) and their ``pairs.jsonl``."""
    from sdpo.data import PreferencePair, write_pairs_jsonl

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)

    def picture() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    pairs = []
    for index in range(count):
        media = {}
        for role in ("chosen", "rejected"):
            path = folder / f"{index}-{role}"
            if frames is None:
                path = path.with_suffix(".png")
                picture().save(path)
            else:
                path.mkdir()
                for frame in range(frames):
                    picture().save(path / f"{frame:03d}.png")
            media[role] = path.name
        pairs.append(PreferencePair(prompt=f"prompt number {index}", **media))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


def starts_at_ln2(losses: list[float]) -> bool:
    """Before the first update the policy is the reference (LoRA B = 0, or an exact copy): loss ln 2."""
    return abs(losses[0] - math.log(2)) < 1e-4


def sample_with_lora(family: str, model: Path, lora: Path, size: int, frames: int | None, device: str) -> bool:
    """Load the family pipeline in bf16 on ``device`` with the LoRA and sample two steps; finite?"""
    import diffusers

    from sdpo.models.registry import spec_class

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline_class = getattr(diffusers, spec_class(family).pipeline_name())
    pipe = pipeline_class.from_pretrained(str(model), torch_dtype=dtype).to(device)
    pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    extra = {} if frames is None else {"num_frames": frames}
    result = pipe("a prompt", num_inference_steps=2, height=size, width=size, output_type="pt",
                  generator=torch.Generator(device).manual_seed(0), **extra)
    pixels = result.images if frames is None else result.frames
    return bool(torch.isfinite(torch.as_tensor(pixels).float()).all())


def check_family(family: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from sdpo.cli import main as cli
    from sdpo.models import tiny
    from sdpo.models.registry import spec_class
    from sdpo.train.config import TrainConfig
    from sdpo.train.trainer import train

    builder, size, frames, kwargs = FAMILIES[family]
    model = getattr(tiny, builder)(root / "model", **kwargs)
    pairs = write_random_pairs(root / "media", size, frames, count=4)
    cache = root / "cache"
    size_flags = ["--height", str(size), "--width", str(size)] + ([] if frames is None else ["--frames", str(frames)])
    started = time.perf_counter()
    code = cli(["--quiet", "precompute", "--family", family, "--pretrained", str(model), "--pairs", str(pairs),
                "--out", str(cache), "--device", args.device, *size_flags])
    rows = [{"family": family, "run": "precompute", "ok": code == 0, "seconds": time.perf_counter() - started}]
    if code != 0:
        return rows

    mixed = "bf16" if args.device.startswith("cuda") else "no"
    runs: list[tuple[str, dict[str, Any]]] = [
        (f"lora {method}", {"method": {"name": method, "beta": 500.0}, "lora_rank": 4})
        for method in ("diffusion-dpo", "dpo-cm", "sdpo")
    ]
    if args.skip_in_process:
        runs = []
    else:
        runs.append(("full sdpo, offloaded reference", {"method": {"name": "sdpo", "beta": 500.0}, "lora_rank": 0,
                                                        "offload_reference": True, "learning_rate": 1e-5}))
    for name, overrides in runs:
        out = root / name.replace(" ", "-").replace(",", "")
        config = TrainConfig.from_dict({
            "family": family, "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(out),
            "max_steps": args.steps, "train_batch_size": 2, "log_every": 1, "mixed_precision": mixed,
            "gradient_checkpointing": True, "report_to": "tensorboard", "learning_rate": 1e-3,
            "validation_prompts": ["a validation prompt"] if name == "lora sdpo" else [],
            "validation_inference_steps": 2, **overrides,
        })
        started = time.perf_counter()
        row: dict[str, Any] = {"family": family, "run": name}
        try:
            result = train(config, progress=False)
            losses = [entry["loss"] for entry in result.history]
            row.update(ok=starts_at_ln2(losses) and all(math.isfinite(x) for x in losses), first_loss=losses[0],
                       last_loss=losses[-1],
                       weight_mean=result.history[-1].get("weight_mean"),
                       masked_fraction=result.history[-1].get("masked_fraction"))
            if overrides["lora_rank"] > 0:
                row["pipeline_sample_finite"] = sample_with_lora(family, model, out, size, frames, args.device)
                row["ok"] = row["ok"] and row["pipeline_sample_finite"]
            else:
                saved = out / spec_class(family).denoiser_subfolder / "config.json"
                row["ok"] = row["ok"] and saved.is_file()
        except Exception as error:  # noqa: BLE001 - report every family, not only the first failure
            traceback.print_exc()
            row.update(ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
        row["seconds"] = time.perf_counter() - started
        if args.device.startswith("cuda"):
            row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.accelerate_config:
        rows.extend(launched_runs(family, model, cache, args))
    return rows


def launched_runs(family: str, model: Path, cache: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``accelerate launch --config_file ...`` of ``sdpo train``, LoRA and full; outputs loaded back."""
    import yaml

    rows = []
    config_name = Path(args.accelerate_config).stem
    for rank in (4, 0):
        out = model.parent / f"{config_name}-rank{rank}"
        config = {"family": family, "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(out),
                  "max_steps": args.steps, "train_batch_size": 1, "log_every": 1, "mixed_precision": "bf16",
                  "gradient_checkpointing": True, "report_to": "none", "lora_rank": rank, "checkpoint_every": 1,
                  "learning_rate": 1e-3 if rank else 1e-5, "method": {"name": "sdpo", "beta": 500.0}}
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config,
                   "--num_processes", str(args.num_processes), "-m", "sdpo.cli", "--quiet", "train", str(path)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        row: dict[str, Any] = {"family": family, "run": f"{config_name} {'lora' if rank else 'full'}",
                               "ok": done.returncode == 0, "seconds": time.perf_counter() - started}
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", flush=True)
            lines = done.stderr.strip().splitlines()
            errors = [line for line in lines if line.startswith("sdpo: error") or "Error" in line]
            row["error"] = (errors or lines or ["?"])[0 if errors else -1][:200]
        else:
            info = json.loads((out / "run_info.json").read_text())
            losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            row.update(distributed_type=info["distributed_type"], num_processes=info["num_processes"],
                       first_loss=losses[0], last_loss=losses[-1],
                       ok=starts_at_ln2(losses) and all(math.isfinite(x) for x in losses))
            try:
                row["ok"] = row["ok"] and load_back(family, model, out, rank)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                row.update(ok=False, error=f"load back: {type(error).__name__}: {error}"[:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def load_back(family: str, model: Path, out: Path, rank: int) -> bool:
    """The run's output loads the diffusers way and differs from the base (training did something)."""
    import diffusers

    from sdpo.models.registry import spec_class

    cls = spec_class(family)
    if rank:
        pipe = getattr(diffusers, cls.pipeline_name()).from_pretrained(str(model))
        pipe.load_lora_weights(str(out))
        denoiser = getattr(pipe, cls.denoiser_subfolder)
        lora_b = [p for n, p in denoiser.named_parameters() if "lora_B" in n]
        return bool(lora_b) and any(bool(p.abs().sum() > 0) for p in lora_b)
    base = getattr(diffusers, type_name(model, cls.denoiser_subfolder))
    tuned = base.from_pretrained(str(out), subfolder=cls.denoiser_subfolder)
    original = base.from_pretrained(str(model), subfolder=cls.denoiser_subfolder)
    tuned_state, original_state = tuned.state_dict(), original.state_dict()
    return tuned_state.keys() == original_state.keys() and any(
        not torch.equal(tuned_state[k].float(), original_state[k].float()) for k in tuned_state)


def type_name(model: Path, subfolder: str) -> str:
    return json.loads((model / subfolder / "config.json").read_text())["_class_name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--accelerate-config", default=None,
                        help="also run `accelerate launch --config_file THIS` (LoRA and full) per family")
    parser.add_argument("--num-processes", type=int, default=1, help="processes for --accelerate-config")
    parser.add_argument("--skip-in-process", action="store_true", help="only the --accelerate-config runs")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available: pass --device cpu")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdpo-gpu-check-") as temporary:
        for family in families:
            rows.extend(check_family(family, Path(temporary) / family, args))
    print("\n| family | run | ok | first loss | last loss | masked | s | peak MB |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [format(row[key], spec) if isinstance(row.get(key), float) else "-"
                 for key, spec in (("first_loss", ".4f"), ("last_loss", ".4f"), ("masked_fraction", ".2f"),
                                  ("seconds", ".1f"), ("peak_mb", ".0f"))]
        print(f"| {row['family']} | {row['run']} | {row['ok']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
