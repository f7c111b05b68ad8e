"""The pages in a real browser (Debian's headless Chromium, by Selenium): ten pairs labelled by keyboard
with the server killed and restarted between two answers, a clip pair that plays, and the blind page
that hides the names until the end. Screenshots of each page go to docs/assets/ (the README shows them).
Skipped, with the reason printed, where Chromium cannot run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from human_world import evaluation, free_port, human_world, start_browser, stop_browser

import sdpo
from sdpo.cli import main
from sdpo.human.answers import effective_answers, read_answers

pytestmark = pytest.mark.beside  # `make test` runs these in its second pytest process

pytest.importorskip("starlette", reason="the labelling pages need the human extra (pip install -e '.[human]')")

ASSETS = Path(__file__).resolve().parents[1] / "docs" / "assets"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return human_world(tmp_path_factory)


@pytest.fixture(scope="module")
def driver():
    browser = start_browser()
    yield browser
    stop_browser(browser)


def _wait(driver, condition, timeout: float = 20.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def _body(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body")


def _ready(driver) -> str:
    """Wait until the page shows an item (or is done); its id."""
    _wait(driver, lambda d: _body(d).get_attribute("data-state") in ("ready", "done"), what="an item")
    return _body(driver).get_attribute("data-item")


def _press(driver, key: str) -> None:
    """Press ``key`` and wait until the server's answer is on the page."""
    before = (_body(driver).get_attribute("data-item"), driver.find_element("id", "progress").text)
    _body(driver).send_keys(key)
    _wait(driver, lambda d: (_body(d).get_attribute("data-item"), d.find_element("id", "progress").text) != before
          and _body(d).get_attribute("data-state") in ("ready", "done"), what=f"the answer to {key!r}")


def _shot(driver, name: str) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ASSETS / name))


def _start_label(gen: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sdpo.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "sdpo.cli", "label", str(gen), "--rater", "ana", "--port",
                                str(port), "--seed", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=1).read()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"sdpo label exited: {process.stderr.read().decode()}") from None
            time.sleep(0.1)
    process.kill()
    raise AssertionError("sdpo label did not start")


def test_ten_pairs_by_keyboard_with_the_server_killed_between_two_answers(driver, world, capsys) -> None:
    from selenium.webdriver.common.keys import Keys

    gen = world.fresh_gen("browser-label")
    port = free_port()
    server = _start_label(gen, port)
    pressed: dict[str, str] = {}
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        for count in range(10):
            if count == 5:  # killed between two answers (no goodbye), then started again on the same port
                _shot(driver, "label-page.png")
                server.send_signal(signal.SIGKILL)
                server.wait()
                server = _start_label(gen, port)
            item = _ready(driver)
            left, right = (card.get_attribute("data-name") for card in driver.find_elements("css selector", ".card"))
            key, choice = {3: ("t", "tie"), 8: ("s", "skip")}.get(count, (
                (Keys.ARROW_LEFT, "left") if left < right else (Keys.ARROW_RIGHT, "right")))
            _press(driver, key)
            pressed[item] = choice
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    header, records = read_answers(gen / "labels" / "ana.jsonl")
    assert len(records) == 10 and len({r.item for r in records}) == 10  # every answer exactly once
    assert {r.item: r.choice for r in records} == pressed
    capsys.readouterr()
    assert main(["pairs", str(gen), "--from-labels"]) == 0
    made = {(p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, (gen / "pairs.jsonl").read_text().splitlines())}
    expected = {(r.prompt, *sorted(r.shown)) for r in records if r.choice in ("left", "right")}
    assert made == expected and len(made) == 8  # the lower candidate index was chosen every time


def test_a_clip_pair_plays_in_sync_and_steps_by_frame(driver, world) -> None:
    from sdpo.human.label import open_label_session
    from sdpo.human.server import BackgroundServer

    session = open_label_session(world.video_gen, "ana")
    with BackgroundServer(session, free_port()) as server:
        driver.get(server.url + "/")
        _ready(driver)
        playing = ("return Array.from(document.querySelectorAll('video')).map("
                   "v => !v.paused && v.readyState >= 2 && v.currentTime > 0 && v.loop)")
        _wait(driver, lambda d: d.execute_script(playing) == [True, True], what="both clips playing")
        _shot(driver, "label-clips.png")
        _body(driver).send_keys(".")  # one frame on: both pause on the same frame
        times = ("return Array.from(document.querySelectorAll('video')).map(v => [v.paused, v.currentTime])")
        _wait(driver, lambda d: all(p for p, _ in d.execute_script(times)), what="both paused")
        (_, first), (_, second) = driver.execute_script(times)
        assert first == pytest.approx(second)


def test_the_blind_page_hides_the_names_until_the_end(driver, world) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from sdpo.human.rate import open_rate_session
    from sdpo.human.server import BackgroundServer

    folder = evaluation(world)
    session = open_rate_session(folder, "ana")
    names = re.compile(r"\b(base|tuned)\b")
    with BackgroundServer(session, free_port()) as server:
        driver.get(server.url + "/")
        keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT, "u", Keys.ARROW_RIGHT,  # the third taken back
                "t", Keys.ARROW_LEFT, "s", Keys.ARROW_RIGHT, Keys.ARROW_LEFT]
        for index, key in enumerate(keys):
            _ready(driver)
            state = urllib.request.urlopen(server.url + "/api/state").read().decode()
            assert not names.search(driver.page_source) and not names.search(state)
            if index == 1:
                _shot(driver, "rate-page.png")
            _press(driver, key)
        assert _ready(driver) == ""  # all answered, still blind
        assert not names.search(driver.page_source)
        driver.find_element(By.XPATH, "//button[contains(., 'End session')]").click()
        _wait(driver, lambda d: _body(d).get_attribute("data-state") == "revealed", what="the reveal")
        revealed = driver.find_element(By.ID, "reveal").text
        assert names.search(revealed)
        _shot(driver, "rate-reveal.png")
    # the win rate on the page and in the folder equals the one counted by hand from the answers file
    _, records = read_answers(folder / "ratings" / "ana.jsonl")
    assert [r.type for r in records].count("undo") == 1
    undone = next(r for r in records if r.type == "undo")
    assert effective_answers(records)[undone.item].choice == "right"  # answered again after the undo
    outcomes = []
    for record in effective_answers(records).values():
        if record.choice != "skip":
            chosen = {"left": record.shown[0], "right": record.shown[1]}.get(record.choice)
            outcomes.append(0.5 if record.choice == "tie" else float(chosen == "tuned"))
    by_hand = sum(outcomes) / len(outcomes)
    results = json.loads((folder / "results.json").read_text())
    pooled = results["human"]["comparisons"]["tuned vs base"]
    assert pooled["n"] == 7 and pooled["ties"] == 1 and pooled["skips"] == 1
    assert pooled["win_rate"]["value"] == pytest.approx(by_hand)
    assert pooled["win_rate"]["low"] <= by_hand <= pooled["win_rate"]["high"]
    assert pooled["per_rater"]["ana"]["n"] == 7 and "digits" in pooled["reward_agreement"]
    report = (folder / "report.md").read_text()
    assert "## digits" in report and "## People (blind A/B" in report and f"{by_hand:.3f}" in report
    assert f"people prefer tuned in {by_hand:.3f}" in revealed  # the page says the same
    assert results["means"] and results["versus_base"]  # the reward's figures are still there, beside
