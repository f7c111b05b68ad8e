"""The `sdpo bench methods`, `sdpo bench online` and `sdpo bench speed` commands: parsing, then one library call each.

``add_bench_commands(commands)`` is called by ``sdpo.cli.build_parser``.
"""

from __future__ import annotations

import argparse
from typing import Any

from sdpo.errors import InputError


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    import yaml

    found = {}
    for text in items:
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise InputError(f"{flag} expects KEY=VALUE, got {text!r}")
        found[key.strip()] = yaml.safe_load(value)
    return found


def bench_config(args: argparse.Namespace, cls: Any, flags: tuple[str, ...], what: str) -> Any:
    """The config of a bench command: its --set fields, its own flags, --toy overrides, --quick."""
    from dataclasses import fields

    settings = _key_values(args.set, "--set")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"--set {unknown[0]}: not a {what} setting; known: {', '.join(sorted(known))}")
    for flag in flags:
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    settings["toy_overrides"] = _key_values(args.toy, "--toy")
    settings["progress"] = not args.quiet
    return cls.quick(**settings) if args.quick else cls(**settings)


def _methods(args: argparse.Namespace) -> None:
    from sdpo.bench.methods import BenchConfig, run_bench

    out = run_bench(bench_config(args, BenchConfig, ("world", "seeds", "steps", "out", "methods"), "bench"))
    print(f"bench: {out / 'table.md'} (results.json, reward_vs_beta.png, reward_over_steps.png)")


def _online(args: argparse.Namespace) -> None:
    from sdpo.bench.online import OnlineBenchConfig, run_online_bench

    out = run_online_bench(bench_config(args, OnlineBenchConfig, ("seeds", "rounds", "out"), "bench online"))
    print((out / "table.md").read_text(), end="")
    print(f"bench: {out / 'table.md'} (results.json, online_vs_offline.png, reward_curves.png)")


def _speed(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from sdpo.bench.speed import SpeedConfig, markdown_table, run_speed

    config = SpeedConfig(models=tuple(args.models), batch_size=args.batch_size, steps=args.steps,
                         warmup=args.warmup, memory=not args.no_memory, device=args.device, threads=args.threads)
    results = run_speed(config)
    table = markdown_table(results)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(results, indent=1))
        (out / "speed.md").write_text(table)
        print(f"bench: {out / 'speed.md'}")


def _world_bench_flags(parser: argparse.ArgumentParser, quick: str, out: str, settings: str) -> None:
    """The flags every embedded-world bench takes (read back by ``bench_config``)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=None, help=f"output folder (a rerun resumes it; default {out})")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=settings)
    parser.add_argument("--toy", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="base-model config overrides of the world, e.g. --toy train_steps=10 (a tiny model)")


def add_bench_commands(commands: Any) -> None:
    """Add `bench methods`, `bench online` and `bench speed` to the `sdpo` subcommands."""
    from sdpo.bench.speed import MODELS, SpeedConfig
    from sdpo.objectives import METHODS

    bench = commands.add_parser("bench", help="measure the methods against each other: results and speed")
    kinds = bench.add_subparsers(dest="bench", required=True)

    methods = kinds.add_parser("methods", help="the methods, baselines and variants over data conditions, betas "
                                               "and seeds on an embedded world, with seed-level statistics")
    _world_bench_flags(methods, "the test-sized sweep (about 2 minutes)", "outputs/bench-methods",
                       "any other BenchConfig field, e.g. --set betas=[200,20000] long_steps=0 (values are YAML)")
    methods.add_argument("--world", choices=["image", "video"], default=None)
    methods.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 5)")
    methods.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 100)")
    methods.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                         help="the methods trained at every beta (default all; diffusion-dpo is always needed), e.g. "
                              "--methods diffusion-dpo kto mapo --set baselines=[] variants=[] long_steps=0")
    methods.set_defaults(func=_methods)

    online = kinds.add_parser("online", help="offline pairs from the base vs online rounds from the current policy, "
                                             "at the same candidates and steps, over seeds")
    _world_bench_flags(online, "the test-sized run (well under a minute)", "outputs/bench-online",
                       "any other OnlineBenchConfig field, e.g. --set steps_per_round=50 (values are YAML)")
    online.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    online.add_argument("--rounds", type=int, default=None, help="rounds R (default 3)")
    online.set_defaults(func=_online)

    speed = kinds.add_parser("speed", help="step time and peak memory: SFT on the winners vs the preference methods")
    speed.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    speed.add_argument("--batch-size", type=int, default=SpeedConfig.batch_size)
    speed.add_argument("--steps", type=int, default=SpeedConfig.steps, help="timed steps per arm")
    speed.add_argument("--warmup", type=int, default=SpeedConfig.warmup)
    speed.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    speed.add_argument("--device", default="cpu", help="cpu or cuda")
    speed.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    speed.add_argument("--out", default=None, help="folder for speed.json and speed.md")
    speed.set_defaults(func=_speed)
