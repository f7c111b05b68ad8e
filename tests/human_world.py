"""Folders and a browser for the tests of the labelling pages (``from human_world import ...``).

The folders are real: made by ``sdpo generate`` on the embedded digits (and moving digits) worlds,
built once per test session (:func:`human_world`). The browser is Debian's headless Chromium driven
by Selenium; when it is missing the browser tests are skipped with the reason (:func:`browser`).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tiny_models import TINY_IMAGE, tiny_video

from sdpo.cli import main

CHROMIUM = os.environ.get("SDPO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SDPO_CHROMEDRIVER", "/usr/bin/chromedriver")
DIGIT_PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 1", "a handwritten digit 8"]


def sdpo(*args: str) -> None:
    """Run the command line as a user types it; it must succeed."""
    assert main(["--quiet", *args]) == 0, args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class HumanWorld:
    root: Path
    base: Path
    """The digits base model."""
    prompts: Path
    gen: Path
    """4 prompts x 3 candidates (12 candidate pairs), never labelled by a test: copy it first."""
    video_base: Path
    video_gen: Path
    """1 prompt x 2 moving-digit clips."""

    def fresh_gen(self, name: str) -> Path:
        """A copy of ``gen`` of its own for one test."""
        target = self.root / name
        shutil.copytree(self.gen, target)
        return target


_WORLDS: dict[Path, HumanWorld] = {}


def human_world(tmp_path_factory: pytest.TempPathFactory) -> HumanWorld:
    """The session's folders, built on first use."""
    key = tmp_path_factory.getbasetemp()
    if key not in _WORLDS:
        from sdpo.toy.pretraining import pretrain_base

        root = tmp_path_factory.mktemp("human-world")
        base = pretrain_base(TINY_IMAGE, cache_root=root / "models", progress=False)
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(DIGIT_PROMPTS) + "\n")
        sdpo("generate", "--family", "toy", "--pretrained", str(base), "--prompts", str(prompts), "--per-prompt", "3",
             "--steps", "2", "--out", str(root / "gen"))
        video_base = pretrain_base(tiny_video("cogvideox"), cache_root=root / "models", progress=False)
        video_prompts = root / "video-prompts.txt"
        video_prompts.write_text("a handwritten digit 3 moving right\n")
        sdpo("generate", "--family", "toy-video", "--pretrained", str(video_base), "--prompts", str(video_prompts),
             "--per-prompt", "2", "--steps", "2", "--out", str(root / "video-gen"))
        _WORLDS[key] = HumanWorld(root, base, prompts, root / "gen", video_base, root / "video-gen")
    return _WORLDS[key]


def label_all(gen: Path, rater: str, choose: Any) -> None:
    """Answer every item of ``gen`` as ``rater`` through the session the page uses: ``choose(item)`` -> choice."""
    from sdpo.human.label import open_label_session

    session = open_label_session(gen, rater)
    while (item := session.current()) is not None:
        session.answer({"rater": rater, "item": item.id, "choice": choose(item)})


def lower_index_wins(item: Any) -> str:
    """The rule the tests label by: the candidate with the lower index is better."""
    left, right = item.shown
    return "left" if left < right else "right"


_EVALS: dict[Path, Path] = {}


def evaluation(world: HumanWorld) -> Path:
    """The human loop up to an evaluation: label (as a rater would), pairs --from-labels, precompute, train,
    evaluate "tuned" against the base on 2 samples per prompt. Built once."""
    if world.root not in _EVALS:
        import yaml

        gen = world.fresh_gen("eval-gen")
        label_all(gen, "ana", lower_index_wins)
        pairs, cache, run, out = (world.root / name for name in ("eval-pairs.jsonl", "eval-cache", "run", "eval"))
        sdpo("pairs", str(gen), "--from-labels", "--out", str(pairs))
        sdpo("precompute", "--family", "toy", "--pretrained", str(world.base), "--pairs", str(pairs), "--out", str(cache))
        config = world.root / "train.yaml"
        config.write_text(yaml.safe_dump({
            "family": "toy", "pretrained": str(world.base), "cache_dir": str(cache), "output_dir": str(run),
            "max_steps": 2, "train_batch_size": 2, "lora_rank": 2, "learning_rate": "1e-3", "report_to": "none"}))
        sdpo("train", str(config))
        sdpo("evaluate", "--family", "toy", "--pretrained", str(world.base), "--prompts", str(world.prompts),
             "--run", f"tuned={run}", "--reward", "digits", "--steps", "2", "--per-prompt", "2", "--out", str(out))
        _EVALS[world.root] = out
    return _EVALS[world.root]


def browser_flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required", "--window-size=1000,700", f"--user-data-dir={profile}"]


def skip_loudly(reason: str) -> None:
    """Skip, and say why in the run's warnings summary too (pytest shows skip reasons only with -rs)."""
    warnings.warn(f"browser tests skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


def start_browser() -> Any:
    """A headless Chromium, or a skip with the reason printed when it cannot start here."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_loudly("selenium is not installed (pip install -e '.[dev]'): the browser tests do not run here")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            skip_loudly(f"{path} is missing (apt-get install chromium chromium-driver; `make test` does it as "
                        "root): the browser tests do not run here")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="sdpo-chromium-")
    for flag in browser_flags(profile):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for a driver on the network
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as error:  # noqa: BLE001 - any failure to start is a reason to skip, printed
        shutil.rmtree(profile, ignore_errors=True)
        skip_loudly(f"headless Chromium does not start here ({' '.join(str(error).split())[:200]})")
    driver.sdpo_profile = profile
    return driver


def stop_browser(driver: Any) -> None:
    driver.quit()
    shutil.rmtree(driver.sdpo_profile, ignore_errors=True)
