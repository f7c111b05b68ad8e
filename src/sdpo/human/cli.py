"""The `sdpo label` and `sdpo rate` commands: parsing, then one library call each.

``add_human_commands(commands)`` is called by ``sdpo.cli.build_parser``; ``pairs --from-labels`` is a
flag of ``sdpo pairs`` (:func:`pairs_from_labels_command`).
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import Any

from sdpo.errors import InputError


def default_rater() -> str:
    """The login name when it can name a rater, else "rater"."""
    from sdpo.human.answers import RATER_NAME

    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "rater"
    return name if RATER_NAME.fullmatch(name) else "rater"


def _check_port(args: argparse.Namespace) -> None:
    """Before any file is written: a port that can be listened on."""
    from sdpo.human.server import check_port_free

    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    check_port_free(args.host, args.port)


def _label(args: argparse.Namespace) -> None:
    from sdpo.human.label import open_label_session
    from sdpo.human.server import serve

    _check_port(args)
    session = open_label_session(args.dir, args.rater, unpaired=args.unpaired,
                                 pairs_per_prompt=args.pairs_per_prompt, seed=args.seed)
    print(f"label: {len(session.items)} items for rater {session.rater} ({session.state()['done']} answered); "
          f"answers in {session.answers.path}")
    print(f"open http://{args.host}:{args.port}/ (Ctrl-C stops; every answer is saved as it is given)", flush=True)
    serve(session, args.host, args.port)


def _rate(args: argparse.Namespace) -> None:
    from sdpo.human.rate import open_rate_session, write_human_results
    from sdpo.human.server import serve

    if args.report:
        result = write_human_results(args.dir)
        print("\n".join(result["summary"]))
        return
    _check_port(args)
    session = open_rate_session(args.dir, args.rater, seed=args.seed, compare=args.compare)
    print(f"rate: {len(session.items)} blind comparisons for rater {session.rater} ({session.state()['done']} "
          f"answered); answers in {session.answers.path}")
    print(f"open http://{args.host}:{args.port}/ (end the session on the page to see the names and write the "
          "results; Ctrl-C stops)", flush=True)
    serve(session, args.host, args.port)


def pairs_from_labels_command(args: argparse.Namespace) -> None:
    """``sdpo pairs DIR --from-labels``: pairs from paired answers, labelled samples from thumbs-up / down ones
    (only those: to ``--out``; both kinds: the samples go to ``samples.jsonl`` beside the pairs)."""
    from sdpo.human.answers import answers_files, read_answers
    from sdpo.human.label import labels_folder
    from sdpo.human.label_samples import has_unpaired_answers, samples_from_labels

    paired = any(read_answers(p)[0]["mode"] == "paired" for p in answers_files(labels_folder(Path(args.dir))))
    if has_unpaired_answers(args.dir):
        where = args.out if not paired else Path(args.out or Path(args.dir) / "pairs.jsonl").with_name("samples.jsonl")
        found = samples_from_labels(args.dir, where)
        left = ", ".join(f"{v} {k}" for k, v in found.counts.items()) or "none"
        print(f"samples: {found.out} ({found.desirable} desirable, {found.undesirable} undesirable from thumbs-up / "
              f"down answers by {len(found.raters)} rater(s), unpaired; left out {left})")
        if not paired:
            return
    _pairs_from_paired_labels(args)


def _pairs_from_paired_labels(args: argparse.Namespace) -> None:
    from sdpo.human.label_pairs import pairs_from_labels, summary_path

    summary = pairs_from_labels(args.dir, args.out)
    counts = ", ".join(f"{v} {k}" for k, v in summary.counts.items() if v) or "none"
    print(f"pairs: {summary.out} ({summary.pairs} from {summary.items} labelled pairs by {len(summary.raters)} "
          f"rater(s); {counts})")
    found = summary.agreement
    if found is not None and found.items_labelled_twice:
        kappa = found.cohen_kappa if found.cohen_kappa is not None else found.fleiss_kappa
        name = "Cohen's" if found.cohen_kappa is not None else "Fleiss'"
        print(f"agreement: {found.raw:.3f} raw, {name} kappa {_number(kappa)} on {found.items_labelled_twice} "
              f"pairs labelled twice or more; summary in {summary_path(summary.out)}")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _server_flags(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; another one is warned about)")
    parser.add_argument("--rater", default=default_rater(),
                        help="who is answering (default: the login name); each rater has an answers file")
    parser.add_argument("--seed", type=int, default=0, help="fixes the order of the items and their left/right placement")


def add_human_commands(commands: Any) -> None:
    """Add label and rate to the `sdpo` subcommands."""
    label = commands.add_parser("label", help="a local page to label a generate folder's candidates by hand")
    label.add_argument("dir", help="generate output folder")
    _server_flags(label, 7860)
    label.add_argument("--pairs-per-prompt", type=int, default=None,
                       help="label this many candidate pairs per prompt, drawn by --seed (default: every pair)")
    label.add_argument("--unpaired", action="store_true",
                       help="one candidate at a time, thumbs up / down (for objectives that take unpaired labels)")
    label.set_defaults(func=_label)

    rate = commands.add_parser("rate", help="a blind A/B page over an `sdpo evaluate` folder: win rates from people")
    rate.add_argument("dir", help="evaluation folder (`sdpo evaluate --out`)")
    _server_flags(rate, 7861)
    rate.add_argument("--compare", action="append", metavar="A:B", default=None,
                      help="compare model A against model B (repeatable; run against run, e.g. sdpo:dpo); "
                           "default: every run against the base")
    rate.add_argument("--report", action="store_true",
                      help="serve nothing: write the people's results of every rater's answers into report.md and "
                           "results.json")
    rate.set_defaults(func=_rate)


__all__ = ["add_human_commands", "default_rater", "pairs_from_labels_command"]
