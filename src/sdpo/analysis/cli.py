"""The `sdpo analyze weights` command: parsing, then one library call.

``add_analyze_commands(commands)`` is called by ``sdpo.cli.build_parser``.
"""

from __future__ import annotations

import argparse
from typing import Any

from sdpo.cli_helpers import DTYPES


def _weights(args: argparse.Namespace) -> None:
    from sdpo.analysis.analyze import analyze_weights
    from sdpo.cli_helpers import load_spec_from, media_format_from
    from sdpo.stages.records import read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None
    result = analyze_weights(load_spec_from(args, media_format_from(args)), args.out, cache=args.cache,
                             prompts=prompts, lora=args.lora, ks=tuple(args.k), grid_points=args.grid,
                             max_pairs=args.max_pairs, sampler_steps=args.steps, guidance_scale=args.guidance,
                             seed=args.seed)
    print(f"weights: {result.out / 'table.md'} ({len(result.profiles)} profiles; weight_profiles.png)")


def add_analyze_commands(commands: Any) -> None:
    """Add `analyze weights` to the `sdpo` subcommands."""
    analyze = commands.add_parser("analyze", help="diagnostics of a model and its data")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    weights = kinds.add_parser("weights", help="w(t) along the trajectory on a cache's pairs and on fresh samples, "
                                               "before and after training")
    weights.add_argument("--family", required=True, help="sd, sdxl, cogvideox, wan (or an embedded world's family)")
    weights.add_argument("--pretrained", required=True, help="base model folder or hub id")
    weights.add_argument("--cache", default=None, help="precompute cache of pairs (chosen and rejected apart)")
    weights.add_argument("--prompts", default=None, help="prompts file: profile fresh samples of each model too")
    weights.add_argument("--lora", default=None, help="a training run folder: the 'after' model")
    weights.add_argument("--k", type=int, nargs="+", default=[50], help="K of the weights (sampler steps); several compare")
    weights.add_argument("--grid", type=int, default=20, help="timesteps of the grid, 0 to T-1")
    weights.add_argument("--max-pairs", type=int, default=256, help="pairs of the cache used")
    weights.add_argument("--steps", type=int, default=50, help="sampler steps of the fresh samples")
    weights.add_argument("--guidance", type=float, default=5.0)
    weights.add_argument("--height", type=int, default=None)
    weights.add_argument("--width", type=int, default=None)
    weights.add_argument("--frames", type=int, default=None)
    weights.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    weights.add_argument("--dtype", choices=DTYPES, default=None)
    weights.add_argument("--vae-tiling", action="store_true")
    weights.add_argument("--seed", type=int, default=0)
    weights.add_argument("--out", required=True, help="output folder")
    weights.set_defaults(func=_weights)
