"""``sdpo rate EVAL``: blind A/B over an evaluation folder, and the people's results beside the reward's.

Every run is compared with the base on every evaluation sample (the same prompt and seed, so the same
initial noise). The samples of ``eval_samples.safetensors`` are written once as media into
``EVAL/rate-media/``; the page gets them under opaque tokens, with the left/right placement drawn per
item (seeded) and recorded in ``EVAL/ratings/<rater>.jsonl`` (mode ``blind``). No model name reaches
the page before the rater ends the session (:meth:`sdpo.human.session.Session.end`), which reveals
their answers with the names and writes the results of every rater's answers:

* ``results.json``: key ``human``, per comparison ("tuned vs base"): pooled and per rater, the win rate
  of the first model with its Wilson 95% interval (ties count half, skips left out), the ties, the
  per-prompt breakdown, and per reward the share of answers where the reward picked the same sample
  (from ``sample_scores``);
* ``report.md``: the same as a section between ``<!-- sdpo rate -->`` markers, rewritten each time.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from sdpo.errors import FolderError, InputError, MissingFileError
from sdpo.files import write_atomic
from sdpo.human.answers import (
    Answer,
    AnswersFile,
    answers_files,
    check_rater,
    effective_answers,
    read_answers,
)
from sdpo.human.queue import rate_items
from sdpo.human.session import Session
from sdpo.stats import wilson_interval

RATINGS_DIR = "ratings"
MEDIA_DIR = "rate-media"
BEGIN, END = "<!-- sdpo rate: begin -->", "<!-- sdpo rate: end -->"


def _results(folder: Path) -> dict[str, Any]:
    from sdpo.folders import folder_kind
    from sdpo.stages.records import read_json_file

    if not (folder / "results.json").is_file():
        raise MissingFileError(f"no results.json in {folder}: run `sdpo evaluate --out {folder}` first")
    if folder_kind(folder) != "evaluation":
        raise FolderError(f"{folder} is not an evaluation folder: rate a folder that `sdpo evaluate --out` wrote")
    results = read_json_file(folder / "results.json", "evaluation results")
    if not isinstance(results.get("models"), list) or len(results["models"]) < 2:
        raise InputError(f"{folder}/results.json names fewer than two models: nothing to compare")
    return results


def comparisons(results: dict[str, Any], requested: list[str] | None = None) -> list[tuple[str, str]]:
    """(A, B) pairs of models to compare, A being the side whose win rate is reported: ``requested``
    ("A:B" each, e.g. "sdpo:dpo" for run against run), by default every run against the base."""
    models = list(results["models"])
    if not requested:
        return [(run, models[0]) for run in models[1:]]
    found = []
    for text in requested:
        first, sep, second = text.partition(":")
        if not sep or first not in models or second not in models or first == second:
            raise InputError(f"--compare expects A:B, two different models of this evaluation ({', '.join(models)}), "
                             f"got {text!r:.80}")
        if (first, second) not in found:
            found.append((first, second))
    return found


def render_media(folder: Path) -> tuple[list[str], dict[tuple[str, int], str]]:
    """(prompt of each sample, (model, sample) -> media path) of the evaluation, writing the media once."""
    from sdpo.stages.evaluate import load_eval_samples
    from sdpo.stages.generate import write_media

    try:
        prompts, _, samples = load_eval_samples(folder)
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"{folder}/eval_samples.safetensors cannot be read ({' '.join(str(error).split())[:100]}): "
                         "run `sdpo evaluate` again") from None
    files = {}
    for model, media in samples.items():
        for index in range(media.shape[0]):
            relative = f"{MEDIA_DIR}/{model}/{index:05d}.{'mp4' if media.ndim == 5 else 'png'}"
            if not (folder / relative).is_file():
                write_media(media[index], folder / relative)
            files[(model, index)] = relative
    return prompts, files


def open_rate_session(eval_dir: str | os.PathLike[str], rater: str, seed: int = 0,
                      compare: list[str] | None = None) -> Session:
    """The blind session of ``rater`` on the evaluation folder ``eval_dir`` (``compare``: see :func:`comparisons`)."""
    folder = Path(eval_dir)
    check_rater(rater)
    results = _results(folder)
    pairs = comparisons(results, compare)
    prompts, files = render_media(folder)
    missing = [model for model in results["models"] if (model, 0) not in files]
    if missing:
        raise InputError(f"{folder}/eval_samples.safetensors has no samples of {', '.join(missing)}")
    items = rate_items(prompts, pairs, files, seed)
    settings = {"seed": seed, "comparisons": [list(pair) for pair in pairs], "samples": len(prompts)}
    answers = AnswersFile(folder / RATINGS_DIR / f"{rater}.jsonl", rater, "blind", settings)
    fps = int(results.get("fps", 8) or 8)

    def end(session: Session) -> dict[str, Any]:
        found = write_human_results(folder)
        reveal = [{"prompt": a.prompt, "left": a.shown[0], "right": a.shown[1], "choice": a.choice}
                  for a in session.answers.effective().values()]
        return {**found, "reveal": reveal}

    return Session(folder, items, answers, title=f"{folder.name}: which is better? (blind)", fps=fps, on_end=end)


def _outcome(answer: Answer, first: str) -> float | None:
    """1 when ``first`` was chosen, 0 when the other one was, 0.5 for a tie, None for a skip."""
    if answer.choice == "skip":
        return None
    if answer.choice == "tie":
        return 0.5
    chosen = answer.shown[0] if answer.choice == "left" else answer.shown[1]
    return 1.0 if chosen == first else 0.0


def _rate(outcomes: list[float]) -> dict[str, Any]:
    n = len(outcomes)
    if not n:
        return {"n": 0, "win_rate": None, "ties": 0}
    interval = wilson_interval(sum(outcomes), n)
    return {"n": n, "win_rate": {"value": interval.value, "low": interval.low, "high": interval.high},
            "ties": sum(1 for o in outcomes if o == 0.5)}


def human_results(eval_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The people's results of every rater's answers in ``eval_dir`` (see the module docstring)."""
    folder = Path(eval_dir)
    results = _results(folder)
    by_rater: dict[str, list[Answer]] = {}
    pairs: list[tuple[str, str]] = []
    for path in answers_files(folder / RATINGS_DIR):
        header, records = read_answers(path)
        if header.get("mode") == "blind":
            by_rater[str(header["rater"])] = list(effective_answers(records).values())
            pairs += [(a, b) for a, b in header.get("settings", {}).get("comparisons", [])
                      if (a, b) not in pairs and (b, a) not in pairs]
    scores = results.get("sample_scores", {})
    found: dict[str, Any] = {"raters": sorted(by_rater), "comparisons": {}}
    for first, second in pairs or comparisons(results):
        mine = {rater: [a for a in answers if set(a.shown) == {first, second}] for rater, answers in by_rater.items()}
        pooled = [a for answers in mine.values() for a in answers]
        outcomes = [o for a in pooled if (o := _outcome(a, first)) is not None]
        per_prompt: dict[str, list[float]] = defaultdict(list)
        for a in pooled:
            if (o := _outcome(a, first)) is not None:
                per_prompt[a.prompt].append(o)
        entry = {**_rate(outcomes), "skips": sum(1 for a in pooled if a.choice == "skip"),
                 "per_rater": {r: _rate([o for a in v if (o := _outcome(a, first)) is not None]) for r, v in mine.items()},
                 "per_prompt": {p: _rate(v) for p, v in per_prompt.items()},
                 "reward_agreement": _reward_agreement(pooled, first, second, scores),
                 "reward_win_rate": _reward_win_rate(results, first, second)}
        found["comparisons"][f"{first} vs {second}"] = entry
    return found


def _reward_win_rate(results: dict[str, Any], first: str, second: str) -> dict[str, Any]:
    """reward -> the reward's own win rate of ``first`` over ``second`` (evaluate's versus_base or head_to_head)."""
    found = {}
    for reward, table in results.get("versus_base", {}).items():
        if second == results["models"][0] and first in table:
            found[reward] = table[first]["win_rate"]
    for reward, table in results.get("head_to_head", {}).items():
        if reward not in found and f"{first} vs {second}" in table:
            found[reward] = table[f"{first} vs {second}"]["win_rate"]
    return found


def _reward_agreement(answers: list[Answer], first: str, second: str,
                      scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """reward -> {"n", "agreement"}: of the answers with a winner, where the reward also had one, the share
    where the reward scored the people's choice higher."""
    agreement = {}
    for reward, table in scores.items():
        if first not in table or second not in table:
            continue
        same = n = 0
        for answer in answers:
            outcome = _outcome(answer, first)
            if outcome in (None, 0.5) or answer.sample is None:
                continue
            gap = table[first][answer.sample] - table[second][answer.sample]
            if gap == 0:
                continue
            n += 1
            same += (gap > 0) == (outcome == 1.0)
        agreement[reward] = {"n": n, "agreement": same / n if n else None}
    return agreement


def _interval(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "n/a"
    return f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"


def report_section(found: dict[str, Any]) -> list[str]:
    """The people's results as markdown lines (the section of report.md, without its markers)."""
    lines = ["## People (blind A/B, `sdpo rate`)", "",
             f"Raters: {', '.join(found['raters']) or 'none yet'}. Ties count half; skips are left out.", "",
             "| A vs B | rater | answers | A wins (95% CI) | ties | reward's win rate for A | reward agrees with people |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in found["comparisons"].items():
        reward_rate = "; ".join(f"{r}: {_interval(v)}" for r, v in entry["reward_win_rate"].items()) or "n/a"
        agrees = "; ".join(f"{r}: {v['agreement']:.3f} of {v['n']}" if v["agreement"] is not None else f"{r}: n/a"
                           for r, v in entry["reward_agreement"].items()) or "n/a"
        lines.append(f"| {name} | pooled | {entry['n']} | {_interval(entry['win_rate'])} | {entry['ties']} | "
                     f"{reward_rate} | {agrees} |")
        for rater, rate in entry["per_rater"].items():
            lines.append(f"| {name} | {rater} | {rate['n']} | {_interval(rate['win_rate'])} | {rate['ties']} | | |")
    for name, entry in found["comparisons"].items():
        lines += ["", f"Per prompt, {name} (pooled):", "", "| prompt | answers | A wins (95% CI) | ties |",
                  "|---|---|---|---|"]
        lines += [f"| {prompt} | {rate['n']} | {_interval(rate['win_rate'])} | {rate['ties']} |"
                  for prompt, rate in sorted(entry["per_prompt"].items())]
    return lines


def summary_lines(found: dict[str, Any]) -> list[str]:
    """One line per comparison, for the terminal and the page."""
    lines = []
    for name, entry in found["comparisons"].items():
        agrees = ", ".join(f"{r} agrees on {v['agreement']:.0%}" for r, v in entry["reward_agreement"].items()
                           if v["agreement"] is not None)
        lines.append(f"{name}: people prefer {name.split(' vs ')[0]} in {_interval(entry['win_rate'])} of "
                     f"{entry['n']} answers (ties: {entry['ties']}, skips: {entry['skips']})"
                     + (f"; {agrees}" if agrees else ""))
    return lines


def write_human_results(eval_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the people's results into ``eval_dir``'s results.json (key ``human``) and report.md; returns
    ``{"human": results, "summary": lines}``."""
    folder = Path(eval_dir)
    found = human_results(folder)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    results["human"] = found
    write_atomic(folder / "results.json", json.dumps(results, indent=2))
    report = (folder / "report.md").read_text(encoding="utf-8") if (folder / "report.md").is_file() else ""
    if BEGIN in report and END in report:
        report = report[:report.index(BEGIN)] + report[report.index(END) + len(END):].lstrip("\n")
    section = "\n".join([BEGIN, *report_section(found), END]) + "\n"
    write_atomic(folder / "report.md", report.rstrip("\n") + "\n\n" + section)
    return {"human": found, "summary": summary_lines(found)}


__all__ = ["human_results", "open_rate_session", "report_section", "write_human_results"]
