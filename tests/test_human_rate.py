"""`sdpo rate` without a browser: blind items that name no model, results per rater and pooled written
beside the reward's figures (by the page's end step or `sdpo rate EVAL --report`), and a rerun of
`sdpo evaluate` with the same settings that keeps the people's answers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from human_world import evaluation, free_port, human_world, sdpo

from sdpo.cli import main
from sdpo.human.rate import open_rate_session
from sdpo.human.session import Refused

pytest.importorskip("starlette", reason="the labelling pages need the human extra (pip install -e '.[human]')")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    world = human_world(tmp_path_factory)
    target = world.root / "rate-copy"
    shutil.copytree(evaluation(world), target, ignore=shutil.ignore_patterns("ratings"))  # not the browser test's answers
    return world, target


def _answer_all(session, pick) -> None:
    while (item := session.current()) is not None:
        session.answer({"rater": session.rater, "item": item.id, "choice": pick(item)})


def test_two_raters_results_per_rater_and_pooled(folder, capsys) -> None:
    world, eval_dir = folder
    ana = open_rate_session(eval_dir, "ana")
    view = json.dumps(ana.state())
    assert not re.search(r"\b(base|tuned)\b", view)  # nothing the page gets names a model
    assert len(ana.items) == 8  # 4 prompts x 2 samples, tuned against base
    _answer_all(ana, lambda item: "left" if item.shown[0] == "tuned" else "right")  # always tuned
    bo = open_rate_session(eval_dir, "bo", seed=5)
    _answer_all(bo, lambda item: "tie" if item.sample == 0 else "left" if item.shown[0] == "base" else "right")
    capsys.readouterr()
    assert main(["rate", str(eval_dir), "--report"]) == 0
    assert "tuned vs base: people prefer tuned in" in capsys.readouterr().out
    human = json.loads((eval_dir / "results.json").read_text())["human"]
    entry = human["comparisons"]["tuned vs base"]
    assert human["raters"] == ["ana", "bo"] and entry["n"] == 16 and entry["ties"] == 1
    assert entry["per_rater"]["ana"]["win_rate"]["value"] == 1.0
    assert entry["per_rater"]["bo"]["win_rate"]["value"] == pytest.approx(0.5 / 8)
    assert entry["win_rate"]["value"] == pytest.approx((8 + 0.5) / 16)
    assert sum(p["n"] for p in entry["per_prompt"].values()) == 16 and len(entry["per_prompt"]) == 4
    assert entry["reward_agreement"]["digits"]["n"] <= 15 and entry["reward_win_rate"]["digits"]["value"] >= 0
    report = (eval_dir / "report.md").read_text()
    assert report.count("## People (blind A/B") == 1 and "| tuned vs base | bo | 8 |" in report
    main(["rate", str(eval_dir), "--report"])  # rewritten in place, not appended twice
    assert (eval_dir / "report.md").read_text().count("## People (blind A/B") == 1

    # ending the session reveals and closes it: no answer after the names were shown
    session = open_rate_session(eval_dir, "cy")
    item = session.current()
    revealed = session.end({"rater": "cy"})
    assert revealed["reveal"] == [] and revealed["summary"]
    with pytest.raises(Refused, match="ended"):
        session.answer({"rater": "cy", "item": item.id, "choice": "left"})

    # a rerun of evaluate with the same settings keeps the answers (same seeds, same samples)
    before = (eval_dir / "ratings" / "ana.jsonl").read_bytes()
    run = world.root / "run"
    sdpo("evaluate", "--family", "toy", "--pretrained", str(world.base), "--prompts", str(world.prompts),
         "--run", f"tuned={run}", "--reward", "digits", "--steps", "2", "--per-prompt", "2", "--out", str(eval_dir))
    assert (eval_dir / "ratings" / "ana.jsonl").read_bytes() == before
    assert len(json.loads((eval_dir / "results.json").read_text())["sample_scores"]["digits"]["base"]) == 8
    assert open_rate_session(eval_dir, "ana").current() is None  # resumed: all answered


def test_rate_refuses_what_is_not_an_evaluation(folder, capsys) -> None:
    world, _ = folder
    assert main(["rate", str(world.gen), "--port", str(free_port())]) == 2
    assert "sdpo evaluate" in capsys.readouterr().err
    assert main(["rate", str(world.root / "nowhere"), "--report"]) == 2


def test_rate_as_a_user_types_it(folder, monkeypatch, capsys) -> None:
    _, eval_dir = folder
    served = []
    monkeypatch.setattr("sdpo.human.server.serve", lambda session, host, port: served.append((session, host, port)))
    port = free_port()
    assert main(["rate", str(eval_dir), "--rater", "dee", "--compare", "tuned:base", "--seed", "2", "--port",
                 str(port)]) == 0
    session, host, served_port = served[0]
    assert (host, served_port, session.mode, len(session.items)) == ("127.0.0.1", port, "blind", 8)
    assert "rate: 8 blind comparisons for rater dee" in capsys.readouterr().out
    assert main(["rate", str(eval_dir), "--rater", "dee", "--compare", "tuned:nobody", "--port", str(port)]) == 2
    assert "--compare expects A:B" in capsys.readouterr().err
    assert main(["rate", str(eval_dir), "--rater", "dee", "--seed", "3", "--port", str(port)]) == 2  # was seed 2
    assert "other settings" in capsys.readouterr().err
