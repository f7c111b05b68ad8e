"""Train one method variant on a finished demo run's pairs and compare it with that run's models.

A demo run folder (`sdpo demo --out DIR`) keeps its precompute
cache and its evaluation samples (noise, prompts, every model's samples). This script:
1. fine-tunes the base model again with a variant of a method (any MethodConfig setting changed,
   e.g. `normalize=true` or `beta=2200`), with the run's own training settings;
2. samples the variant from the same noise and prompts;
3. compares it with the base and with each of the run's models on the same samples.
No pairs are regenerated, so the comparison isolates the objective.

    python -m benchmarks.variant RUN_FOLDER --method sdpo --set normalize=true --steps 800
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import yaml

from sdpo.data import CachedPairs
from sdpo.demo import EVAL_SAMPLES_FILE, DemoConfig, load_eval_samples
from sdpo.models.registry import load_spec
from sdpo.stats import compare
from sdpo.toy.world import get_world
from sdpo.train.trainer import train


def parse_settings(items: list[str]) -> dict:
    """``key=value`` strings to a dict, values read as YAML (``true``, ``0.5``, ``[0, 1.1]``)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def run_variant(folder: Path, method: str, settings: dict, steps: int | None) -> str:
    """Train the variant on ``folder``'s cache, score it on ``folder``'s evaluation samples; a table."""
    recorded = json.loads((folder / "results.json").read_text())["config"]
    demo = DemoConfig(**{k: v for k, v in recorded.items() if k in {f.name for f in dataclasses.fields(DemoConfig)}
                         and k not in ("methods", "toy_overrides")})
    demo = dataclasses.replace(demo, steps=steps or demo.steps, progress=False,
                               toy_overrides=recorded.get("toy_overrides") or {})
    world = get_world(demo.world, demo.toy_overrides)
    base = world.pretrain(demo.cache_root, False)
    prompts, noise, saved = load_eval_samples(folder)

    template = demo.train_config(method, Path("unused"))
    variant = dataclasses.replace(template.method, **settings)  # validated again in __post_init__
    with tempfile.TemporaryDirectory(prefix="sdpo-variant-") as out:
        config = dataclasses.replace(template, output_dir=out, method=variant, report_to="none")
        spec = load_spec(world.family, base)
        run = train(config, spec=spec, dataset=CachedPairs(folder / "cache"), progress=False)
        samples = spec.sample(prompts, noise, model=run.model,  # the export's noise is the initial latents
                              num_inference_steps=demo.num_inference_steps, guidance_scale=world.guidance_scale)

    reward = world.reward()
    scores = reward.score(samples, prompts)
    label = f"{method} + " + ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else method
    lines = [f"{folder}: {label}, {config.max_steps} steps, final training loss {run.history[-1]['loss']:.3f}, "
             f"mean W {run.history[-1]['weight_mean']:.3f}", "",
             "| variant vs | variant wins [95% CI] | reward difference [95% CI] |", "|---|---|---|"]
    for name, other in saved.items():
        result = compare(reward.score(other, prompts), scores)
        lines.append(f"| {name} | {result.win_rate} | {result.gain} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a demo run folder (results.json, cache/, eval_samples.safetensors)")
    parser.add_argument("--method", required=True, help="the preset the variant starts from")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="MethodConfig settings to change")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run's own)")
    args = parser.parse_args()
    for needed in ("results.json", "cache", EVAL_SAMPLES_FILE):
        if not (args.folder / needed).exists():
            parser.error(f"{args.folder} has no {needed}: pass a finished demo run folder")
    print(run_variant(args.folder, args.method, parse_settings(args.set), args.steps))


if __name__ == "__main__":
    main()
