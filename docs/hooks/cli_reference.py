"""mkdocs hook: renders the command-line reference from ``sdpo.cli.build_parser()`` at build time.

A page holding the marker ``<!-- cli-reference -->`` gets one section per command (and per
sub-command: ``sdpo bench methods``), each the parser's own ``--help`` text, so the page cannot drift
from the CLI. Importing the CLI takes about two seconds (torch); nothing else is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
SRC = Path(__file__).resolve().parents[2] / "src"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every sub-command, depth first, in the order the CLI declares them."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:  # argparse has no public accessor for sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found += [(f"{name} {child}", p) for child, p in _subcommands(sub)]
    return found


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal width
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from sdpo.cli import build_parser

    parser = build_parser()
    parts = ["## sdpo", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser):
        parts += [f"## sdpo {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
