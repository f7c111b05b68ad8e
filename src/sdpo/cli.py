"""The `sdpo` command line. Thin: it parses arguments and calls the library.

A user mistake (an `SdpoError`: bad value, missing file, used folder, corrupt cache) and an OSError
on a user's path (read-only, disk full, not a directory) end with one line on stderr and exit status
2; `--debug` adds the traceback. Anything else is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from sdpo.cli_helpers import DTYPES
from sdpo.errors import USER_ERRNOS, InputError, SdpoError, describe_os_error
from sdpo.objectives import METHODS, OWN_LOSS_METHODS


def _demo(args: argparse.Namespace) -> None:
    from sdpo.demo import DemoConfig, run_demo

    config = DemoConfig(
        world=args.world, methods=tuple(args.method), steps=args.steps, beta=args.beta, seed=args.seed, out=args.out,
        pairs_per_digit=args.pairs_per_digit, eval_per_digit=args.eval_per_digit, progress=not args.quiet,
    )
    out = run_demo(config)
    print(f"report: {out / 'report.md'}")


STOPPED_EXIT_CODE = 3
"""Exit status of `sdpo train` stopped by SIGTERM / SIGUSR1 / a first Ctrl-C after saving a checkpoint (resumable)."""


class StoppedEarly(Exception):
    """`sdpo train` stopped on a signal; its checkpoint is saved."""


def _train(args: argparse.Namespace) -> None:
    from sdpo.train.config import TrainConfig, parse_override

    overrides = [parse_override(text) for text in args.set]
    config = TrainConfig.from_file(args.config, overrides=overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return
    from sdpo.train.trainer import train

    result = train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if result.stopped_at is not None:
        raise StoppedEarly(
            f"stopped by {result.stop_signal or 'a stop signal'} after step {result.stopped_at}; the checkpoint is "
            f"saved: run the same command with --resume latest to continue"
        )
    print(f"trained weights: {result.output_dir}")


def _export(args: argparse.Namespace) -> None:
    from sdpo.train.trainer import export_run

    result = export_run(args.run, progress=not args.quiet, allow_older=args.allow_older)
    print(f"exported weights: {result.output_dir}")


def _precompute(args: argparse.Namespace) -> None:
    from sdpo.cli_helpers import load_spec_from, media_format_from
    from sdpo.data import (
        check_buckets,
        check_out_dir,
        precompute,
        read_checked_pairs,
        read_manifest,
        read_pairs,
    )
    from sdpo.models.base import HUB_ID, resolve_pretrained

    media_format = media_format_from(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    buckets = None
    if args.buckets is not None:  # the sizes now; that they suit the model's spatial factor once it is loaded
        try:
            buckets = check_buckets(args.buckets)
        except ValueError as error:
            raise InputError(f"--buckets: {error}") from None
    # Every check that needs no model comes before the model loads: a mistake costs seconds, not minutes.
    check_out_dir(args.out, args.overwrite)
    if not os.path.isdir(args.pretrained) and not HUB_ID.fullmatch(args.pretrained):
        resolve_pretrained(args.pretrained)  # neither a folder nor a hub id: fails with one line, loading nothing
    from sdpo.models.registry import spec_class

    expected = media_format or spec_class(args.family).default_media_format
    from sdpo.data import is_samples_manifest

    if is_samples_manifest(args.pairs):  # labelled samples (Diffusion-KTO): a samples cache, one latent a row
        return _precompute_samples(args, media_format)
    if expected is None:  # the family sizes media from its model folder: precompute checks them after loading
        pairs = read_pairs(args.pairs, on_bad_pair=args.on_bad_pair)
    else:  # bad lines and undecodable media, all in one report
        pairs = read_checked_pairs(args.pairs, expected, pad_frames=args.pad_frames, on_bad_pair=args.on_bad_pair,
                                   model=args.family, progress=not args.quiet)  # fmt: skip
    spec = load_spec_from(args, media_format, encoders_only=True)
    out = precompute(pairs, spec, args.out, batch_size=args.batch_size, progress=not args.quiet,
                     overwrite=args.overwrite, pad_frames=args.pad_frames, on_bad_pair=args.on_bad_pair,
                     check_media=spec.media_format != expected, latent_std=not args.no_latent_std,
                     buckets=buckets, extra_manifest={"pairs_file": str(args.pairs)})  # fmt: skip
    manifest = read_manifest(out)
    _print_skipped(manifest, out)
    print(f"cache: {out} ({manifest['num_pairs']} pairs)")
    for bucket in manifest.get("buckets", []):
        print(f"  bucket {bucket['height']}x{bucket['width']}: {bucket['num_pairs']} pairs")


def _precompute_samples(args: argparse.Namespace, media_format: Any) -> None:
    from sdpo.cli_helpers import load_spec_from
    from sdpo.data import precompute_samples, read_manifest, read_samples

    if args.buckets is not None:
        raise InputError("--buckets: a samples cache has no aspect-ratio buckets")
    samples = read_samples(args.pairs)
    spec = load_spec_from(args, media_format, encoders_only=True)
    out = precompute_samples(samples, spec, args.out, batch_size=args.batch_size, progress=not args.quiet,
                             overwrite=args.overwrite, pad_frames=args.pad_frames,
                             extra_manifest={"samples_file": str(args.pairs)})
    good = sum(sample.desirable for sample in samples)
    print(f"cache: {out} ({read_manifest(out)['num_pairs']} labelled samples: {good} desirable, "
          f"{len(samples) - good} undesirable)")


def _print_skipped(manifest: dict, out: object, shown: int = 10) -> None:
    from sdpo.data import PairProblem

    skipped, counts = manifest.get("skipped", []), manifest.get("skipped_counts", {})
    if not counts:
        return
    detail = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    print(f"sdpo: skipped {sum(counts.values())} pairs ({detail}); they are listed in {out}/manifest.json "
          f"'skipped'", file=sys.stderr)  # fmt: skip
    for entry in skipped[:shown]:
        print(f"  {PairProblem(**entry).describe()}", file=sys.stderr)
    if sum(counts.values()) > shown:
        print(f"  ... and {sum(counts.values()) - shown} more", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from sdpo.demo import DemoConfig  # its defaults are the flags' defaults

    parser = argparse.ArgumentParser(prog="sdpo", description="Preference fine-tuning of diffusion models.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline end-to-end run on the embedded digits world")
    demo.add_argument("--method", nargs="+", default=["sdpo"], choices=[*(m for m in METHODS if m not in OWN_LOSS_METHODS), "all"],
                      help="method(s) to train and compare (default: sdpo; 'all' runs the three)")
    demo.add_argument("--world", choices=["image", "video"], default=DemoConfig.world,
                      help="embedded world: still 8x8 digits, or clips of a moving digit")
    demo.add_argument("--steps", type=int, default=DemoConfig.steps, help="optimizer steps per method")
    demo.add_argument("--beta", type=float, default=None, help="objective temperature (default: per method)")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--out", default=DemoConfig.out, help="output folder (replaced when the run succeeds)")
    demo.add_argument("--pairs-per-digit", type=int, default=DemoConfig.pairs_per_digit)
    demo.add_argument("--eval-per-digit", type=int, default=DemoConfig.eval_per_digit)
    demo.set_defaults(func=_demo)

    train = commands.add_parser("train", help="fine-tune a model from a YAML config (use with accelerate launch)")
    train.add_argument("config", help="YAML file of TrainConfig fields (see configs/)")
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    train.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config fields, e.g. --set max_steps=10 method.beta=500 (values are YAML; "
                            "applied to what the file says before the method preset is expanded, so "
                            "method.name=X gives X's defaults plus only the method keys written explicitly)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config (with --set), print it fully resolved as YAML and exit")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in output_dir (its checkpoints and metrics are deleted)")
    train.set_defaults(func=_train)

    export = commands.add_parser("export", help="write a run's final weights from its latest checkpoint (no training)")
    export.add_argument("run", help="the run folder (output_dir of sdpo train)")
    export.add_argument("--allow-older", action="store_true",
                        help="export the latest readable checkpoint even when a newer one is torn or the run's "
                             "final weights are newer")
    export.set_defaults(func=_export)

    pre = commands.add_parser("precompute", help="encode pairs to latents and text embeddings once")
    pre.add_argument("--family", required=True, help="sd, sdxl, cogvideox or wan")
    pre.add_argument("--pretrained", required=True, help="model folder or hub id")
    pre.add_argument("--pairs", required=True, help="pairs.jsonl, a Pick-a-Pic parquet folder, or samples.jsonl (labelled samples for kto)")
    pre.add_argument("--out", required=True, help="cache folder to create")
    pre.add_argument("--height", type=int, default=None)
    pre.add_argument("--width", type=int, default=None)
    pre.add_argument("--frames", type=int, default=None)
    pre.add_argument("--batch-size", type=int, default=4)
    pre.add_argument("--device", default=None, help="where the encoders run (default: cuda if available, else cpu)")
    pre.add_argument("--dtype", choices=DTYPES, default=None,
                     help="encoder weights' dtype (default: bf16 on cuda, fp32 on cpu); latents are stored in fp32")
    pre.add_argument("--vae-tiling", action="store_true",
                     help="encode large frames tile by tile (less memory for long, high-resolution videos)")
    pre.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out cache (only once the new one is complete)")
    pre.add_argument("--on-bad-pair", choices=["fail", "skip"], default="fail",
                     help="a pair whose line is malformed or whose media do not decode: fail listing every "
                          "one (default), or skip it; skipped pairs are printed and listed in the manifest")
    pre.add_argument("--pad-frames", action="store_true",
                     help="a clip shorter than --frames repeats its last frame (default: such a clip is an error)")
    pre.add_argument("--no-latent-std", action="store_true",
                     help="store the VAE posterior's mean only, not its std beside it (half the latent bytes; "
                          "training then cannot use latent_sampling=sample)")
    pre.add_argument("--buckets", nargs="+", default=None, metavar="HEIGHTxWIDTH",
                     help="aspect-ratio buckets, e.g. --buckets 512x512 448x576 576x448: each pair is loaded at "
                          "the bucket closest to its chosen image's aspect ratio (resized to cover it, then "
                          "centre-cropped) and training batches never mix buckets (default: every pair at the "
                          "model's one resolution, --height x --width)")
    pre.set_defaults(func=_precompute)

    from sdpo.stages.cli import add_stage_commands  # generate, score, pairs, evaluate (helper "stages")

    add_stage_commands(commands)
    from sdpo.analysis.cli import add_analyze_commands
    from sdpo.bench.cli import add_bench_commands
    from sdpo.human.cli import add_human_commands

    add_bench_commands(commands)
    add_analyze_commands(commands)
    add_human_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SdpoError as error:
        return _user_error(str(error), args.debug)
    except OSError as error:
        if error.errno not in USER_ERRNOS:
            raise
        return _user_error(describe_os_error(error), args.debug)
    except StoppedEarly as stop:
        print(f"sdpo: {stop}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except KeyboardInterrupt:
        print("sdpo: interrupted", file=sys.stderr)
        return 130
    return 0


def _user_error(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"sdpo: error: {message}", file=sys.stderr)
    return 2


def entry() -> None:
    """The ``sdpo`` command (and ``python -m sdpo.cli``): ``main``, then the process group ends with the process."""
    code = main()
    from sdpo.train.sharding import close_process_group

    close_process_group()
    sys.exit(code)


if __name__ == "__main__":
    entry()
