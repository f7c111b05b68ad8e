"""The `sdpo generate / score / pairs / evaluate` commands: parsing, then one library call each.

``add_stage_commands(commands)`` is called by ``sdpo.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sdpo.cli_helpers import DTYPES
from sdpo.errors import InputError
from sdpo.stages import checks


def _load(args: argparse.Namespace) -> Any:
    from sdpo.cli_helpers import load_spec_from, media_format_from

    return load_spec_from(args, media_format_from(args))


def _check_model_flags(args: argparse.Namespace, out: str | None, per_prompt: int | None) -> None:
    """What generate and evaluate can check before their model loads (minutes on a video model)."""
    from sdpo.cli_helpers import media_format_from

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--per-prompt", per_prompt)):
        checks.check_positive(flag, value)
    checks.check_finite("--guidance", args.guidance)
    checks.check_size(args.family, args.height, args.width, args.frames)
    media_format_from(args)  # --frames given exactly for a video family, --height with --width
    if out:
        checks.check_out_folder(out, "--vbench" if out == getattr(args, "vbench", None) else "--out")


def _sampler(args: argparse.Namespace) -> Any:
    from sdpo.stages.generate import SamplerSettings

    return SamplerSettings(num_inference_steps=args.steps, guidance_scale=args.guidance)


def _generate(args: argparse.Namespace) -> None:
    from sdpo.stages.generate import generate
    from sdpo.stages.records import read_prompts

    if not args.out and not args.vbench:
        raise InputError("generate needs --out (or --vbench DIR)")
    if args.no_mp4 and not args.frame_folders:
        raise InputError("--no-mp4 needs --frame-folders: without either a clip would leave no viewable file")
    _check_model_flags(args, args.vbench or args.out, args.per_prompt)
    if args.lora:
        checks.check_lora_folder(args.lora, args.family)
    prompts = read_prompts(args.prompts)
    if args.vbench:
        return _generate_vbench(args, prompts)
    per_prompt = 4 if args.per_prompt is None else args.per_prompt
    _check_generate_rerun(args, prompts, per_prompt)
    result = generate(_load(args), prompts, args.out, per_prompt=per_prompt, seed=args.seed,
                      sampler=_sampler(args), lora=args.lora, batch_size=args.batch_size,
                      progress=not args.quiet, frame_folders=args.frame_folders, mp4=not args.no_mp4)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns; one line is enough
        print(f"candidates: {result.out_dir}/candidates.jsonl ({result.candidates}, {result.generated} new)")


def _check_generate_rerun(args: argparse.Namespace, prompts: list[str], per_prompt: int) -> None:
    """A rerun with other settings (or into another stage's folder) is refused before the model loads."""
    from dataclasses import asdict
    from pathlib import Path

    from sdpo.stages.generate import generate_settings

    generate_settings(Path(args.out), {
        "prompts": prompts, "per_prompt": per_prompt, "seed": args.seed, "sampler": asdict(_sampler(args)),
        "batch_size": args.batch_size, "family": args.family, "lora": args.lora, "frame_folders": args.frame_folders,
        "mp4": not args.no_mp4})


def _generate_vbench(args: argparse.Namespace, prompts: list[str]) -> None:
    from sdpo.stages.vbench import generate_vbench

    result = generate_vbench(_load(args), prompts, args.vbench, per_prompt=5 if args.per_prompt is None else args.per_prompt,
                             seed=args.seed,
                             sampler=_sampler(args), lora=args.lora, batch_size=args.batch_size,
                             progress=not args.quiet)
    print(f"vbench: {len(result.files)} clips in {result.out_dir} ({result.generated} new); evaluate with:")
    for line in result.commands:
        print(f"  {line}")


def _online(args: argparse.Namespace) -> None:
    from sdpo.stages.online import OnlineConfig, run_online

    config = OnlineConfig.from_file(args.config)
    checks.check_out_folder(config.out, f"{args.config}: out")
    config.progress = not args.quiet
    runs = run_online(config, restart=args.restart)
    print(f"online: {len(runs)} rounds in {config.out}; last policy {runs[-1]}")


def _rewards(args: argparse.Namespace) -> list:
    """The named rewards; ``--reward-option KEY=VALUE`` goes to every reward, ``NAME.KEY=VALUE`` to one."""
    from sdpo.rewards.registry import load_reward

    options = _reward_options(args)
    return [load_reward(name, **options[name]) for name in args.reward]


def _reward_options(args: argparse.Namespace) -> dict[str, dict]:
    """Reward name -> the options its factory gets (``--reward-option``)."""
    import yaml

    shared: dict = {}
    scoped: dict[str, dict] = {name: {} for name in args.reward}
    for text in args.reward_option or []:
        if "=" not in text:
            raise InputError(f"--reward-option expects KEY=VALUE or REWARD.KEY=VALUE, got {text!r}")
        key, value = (part.strip() for part in text.split("=", 1))
        name, dot, option = key.rpartition(".")
        target = scoped.get(name) if dot else shared
        if target is None:
            raise InputError(f"--reward-option {text!r} names reward {name!r}, which is not among --reward "
                             f"{', '.join(args.reward)}")
        target[option if dot else key] = yaml.safe_load(value)
    return {name: {**shared, **scoped[name]} for name in args.reward}


def _score(args: argparse.Namespace) -> None:
    from sdpo.stages.score import score

    checks.check_positive("--batch-size", args.batch_size)
    for value in args.weight or []:
        checks.check_finite("--weight", value)
    summary = score(args.dir, _rewards(args), args.weight, batch_size=args.batch_size, normalize=args.normalize,
                    progress=not args.quiet, reward_options=_reward_options(args), rescore=args.rescore,
                    media_root=args.media_root)
    print(f"scored {summary.candidates} candidates: " + ", ".join(f"{k} ({v} new)" for k, v in summary.scored.items()))


def _pairs(args: argparse.Namespace) -> None:
    from sdpo.stages.pairs import build_pairs

    if args.from_labels:
        from sdpo.human.cli import pairs_from_labels_command

        if args.out is not None:
            checks.check_out_file(args.out)
        return pairs_from_labels_command(args)
    checks.check_finite("--margin", args.margin)
    if args.out is not None:
        checks.check_out_file(args.out)
    if args.strategy in ("threshold", "quantile"):
        from sdpo.stages.samples import build_samples

        found = build_samples(args.dir, args.strategy, threshold=args.threshold, quantile=args.quantile,
                              out=args.out, media_root=args.media_root)
        left = ", ".join(f"{v} {k}" for k, v in found.skipped.items()) or "none"
        print(f"samples: {found.out} ({found.desirable} desirable, {found.undesirable} undesirable, unpaired; "
              f"left out {left})")
        return None
    summary = build_pairs(args.dir, args.strategy, args.margin, args.out, media_root=args.media_root)
    skipped = ", ".join(f"{v} {k}" for k, v in summary.skipped.items()) or "none"
    print(f"pairs: {summary.out} ({summary.pairs} from {summary.prompts} prompts; skipped {skipped})")


def _evaluate(args: argparse.Namespace) -> None:
    from sdpo.stages.evaluate import evaluate
    from sdpo.stages.records import read_prompts

    _check_model_flags(args, args.out, args.per_prompt)
    runs: dict[str, str | Path] = {}
    for text in args.run:
        name, sep, folder = text.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--run expects NAME=LORA_DIR, got {text!r}")
        if name in runs:
            raise InputError(f"two --run are named {name!r} ({runs[name]} and {folder}): give each run its own name")
        checks.check_run_name(name)
        checks.check_lora_folder(folder, args.family, f"--run {text}")
        runs[name] = folder
    prompts, options = read_prompts(args.prompts), _reward_options(args)
    if len(prompts) * args.per_prompt < 2:
        raise InputError(f"evaluate needs at least two samples for its intervals: {len(prompts)} prompt(s) x "
                         f"--per-prompt {args.per_prompt}; add prompts or raise --per-prompt")
    from pathlib import Path

    from sdpo.stages.evaluate import check_evaluation_out, evaluation_settings

    known = {**evaluation_settings(prompts, runs, args.reward, args.seed, _sampler(args), args.per_prompt, options),
             "family": args.family}  # everything but the model's size: checked again once it is loaded
    check_evaluation_out(Path(args.out), known, args.overwrite)
    rewards = _rewards(args)
    result = evaluate(_load(args), prompts, runs, rewards, args.out, seed=args.seed,
                      sampler=_sampler(args), batch_size=args.batch_size,
                      samples_per_prompt=args.per_prompt, progress=not args.quiet, reward_options=options,
                      overwrite=args.overwrite)
    print(f"report: {result.out / 'report.md'}")


def _model_flags(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument("--family", required=True, help="sd, sdxl, cogvideox, wan (or an embedded world's family)")
    parser.add_argument("--pretrained", required=True, help="model folder or hub id")
    parser.add_argument("--prompts", required=True, help="prompts file: one per line (.txt) or JSONL with 'prompt'")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default: bf16 on cuda)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode large frames tile by tile")
    parser.add_argument("--out", required=out_required, help="output folder")


def _reward_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", action="append", required=True, help="reward registry name (repeatable)")
    parser.add_argument("--reward-option", action="append", metavar="KEY=VALUE",
                        help="option for the rewards' factories: KEY=VALUE for all, or REWARD.KEY=VALUE for one, "
                             "e.g. pickscore.model=/models/PickScore_v1 (repeatable)")


def _media_root_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--media-root", default=None, metavar="DIR",
                        help="media paths in candidates.jsonl may point anywhere inside DIR (default: only inside "
                             "the candidates folder itself)")


def add_stage_commands(commands: Any) -> None:
    """Add generate, score, pairs and evaluate to the `sdpo` subcommands."""
    gen = commands.add_parser("generate", help="sample K candidates per prompt (seeds recorded, resumable)")
    _model_flags(gen, out_required=False)
    gen.add_argument("--lora", default=None, help="a training run folder to sample with")
    gen.add_argument("--per-prompt", type=int, default=None, help="candidates per prompt (default 4; 5 with --vbench)")
    gen.add_argument("--vbench", default=None, metavar="DIR",
                     help="write clips as VBench reads them, DIR/{prompt}-{index}.mp4, and print the vbench commands")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--frame-folders", action="store_true", help="videos: also write a folder of PNG frames")
    gen.add_argument("--no-mp4", action="store_true",
                     help="videos with --frame-folders: no MP4 per clip (for candidates nobody watches)")
    gen.set_defaults(func=_generate)

    sc = commands.add_parser("score", help="score a generate folder's candidates with one or more rewards")
    sc.add_argument("dir", help="generate output folder")
    _reward_flags(sc)
    sc.add_argument("--weight", action="append", type=float, help="weight of each reward in the total")
    sc.add_argument("--normalize", choices=["raw", "zscore"], default="raw",
                    help="each reward enters the total raw, or z-scored over the candidates of its prompt")
    sc.add_argument("--batch-size", type=int, default=8)
    sc.add_argument("--rescore", action="store_true",
                    help="score every candidate again with the named rewards (needed when their options changed)")
    _media_root_flag(sc)
    sc.set_defaults(func=_score)

    pa = commands.add_parser("pairs", help="build preference pairs (JSONL) from scored candidates, or labelled "
                                           "samples for Diffusion-KTO (--strategy threshold / quantile)")
    pa.add_argument("dir", help="scored generate folder")
    pa.add_argument("--strategy", choices=["best-worst", "margin", "threshold", "quantile"], default="best-worst",
                    help="pairs: best-worst, margin; unpaired labelled samples (samples.jsonl): threshold, quantile")
    pa.add_argument("--margin", type=float, default=0.0, help="skip pairs whose score gap is not above this")
    pa.add_argument("--threshold", type=float, default=None,
                    help="threshold: desirable above this score, undesirable below")
    pa.add_argument("--quantile", type=float, default=0.25,
                    help="quantile: per prompt, the top share is desirable and the bottom share undesirable")
    pa.add_argument("--out", default=None, help="manifest to write (default DIR/pairs.jsonl, or DIR/samples.jsonl)")
    pa.add_argument("--from-labels", action="store_true",
                    help="pairs from the answers of `sdpo label DIR` (majority over raters) instead of scores; "
                         "thumbs-up / down answers (`sdpo label --unpaired`) give labelled samples")
    _media_root_flag(pa)
    pa.set_defaults(func=_pairs)

    ev = commands.add_parser("evaluate", help="base vs tuned runs from identical noise: rewards, win rates, report")
    _model_flags(ev)
    ev.add_argument("--run", action="append", required=True, metavar="NAME=LORA_DIR", help="a tuned run (repeatable)")
    _reward_flags(ev)
    ev.add_argument("--per-prompt", type=int, default=1, help="samples per prompt")
    ev.add_argument("--seed", type=int, default=10_000)
    ev.add_argument("--overwrite", action="store_true",
                    help="replace an evaluation made with other settings in --out, whole (no old file is kept)")
    ev.set_defaults(func=_evaluate)

    on = commands.add_parser("online", help="rounds of generate -> score -> pairs -> train from the current policy")
    on.add_argument("config", help="YAML file of an OnlineConfig")
    on.add_argument("--restart", action="store_true",
                    help="in a folder of an online run with other settings: recompute what they change (every "
                         "round; round 0's candidates are kept and rescored when their generation is unchanged)")
    on.set_defaults(func=_online)
