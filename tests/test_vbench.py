"""`sdpo generate --vbench DIR`: VBench's file names, count and layout, per-prompt seeds, resume, commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import tiny_video

from sdpo.cli import main
from sdpo.stages.vbench import WORK_DIR, vbench_commands, vbench_name
from sdpo.toy.pretraining import pretrain_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_WAN_VIDEO = tiny_video("wan")
PROMPTS = ["a handwritten digit 3 moving right", "A digit, 7: moving up (fast)!", "digit 1/2 moving left"]


def test_names_are_prompt_dash_index_and_slashes_become_underscores() -> None:
    assert vbench_name("A digit, 7: moving up (fast)!", 4) == "A digit, 7: moving up (fast)!-4.mp4"
    assert vbench_name("digit 1/2", 0) == "digit 1_2-0.mp4"
    with pytest.raises(ValueError, match="too long"):
        vbench_name("x" * 300, 0)
    standard, custom = vbench_commands("/tmp/my videos")
    assert standard.startswith("vbench evaluate --videos_path '/tmp/my videos' --dimension subject_consistency")
    assert "--mode" not in standard and custom.endswith("imaging_quality --mode=custom_input")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(pretrain_base(TINY_WAN_VIDEO, cache_root=tmp_path_factory.mktemp("cache"), progress=False))


def _vbench(base: str, prompts: list[str], folder: Path, tmp: Path, *extra: str) -> int:
    file = tmp / f"prompts-{len(list(tmp.iterdir()))}.txt"
    file.write_text("\n".join(prompts) + "\n")
    return main(["--quiet", "generate", "--family", "toy-video", "--pretrained", base, "--prompts", str(file),
                 "--steps", "1", "--vbench", str(folder), *extra])


def test_generate_vbench_writes_five_clips_per_prompt_seeded_per_prompt(base: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vbench"
    assert _vbench(base, PROMPTS, out, tmp_path) == 0
    printed = capsys.readouterr().out
    expected = {vbench_name(p, k) for p in PROMPTS for k in range(5)}
    assert {f.name for f in out.iterdir() if f.is_file()} == expected  # nothing else VBench could read
    assert {f.name for f in out.iterdir() if f.is_dir()} == {WORK_DIR}
    assert "A digit, 7: moving up (fast)!-0.mp4" in expected and "digit 1_2 moving left-4.mp4" in expected
    mapping = json.loads((out / WORK_DIR / "prompts.json").read_text())
    assert mapping["digit 1_2 moving left-3.mp4"] == "digit 1/2 moving left"
    assert f"vbench evaluate --videos_path {out} --dimension" in printed and "--mode=custom_input" in printed

    # the clips of a prompt depend on its text, not its place in the list
    other = tmp_path / "reordered"
    assert _vbench(base, [PROMPTS[2], PROMPTS[0]], other, tmp_path) == 0
    for prompt in (PROMPTS[0], PROMPTS[2]):
        for k in range(5):
            assert (other / vbench_name(prompt, k)).read_bytes() == (out / vbench_name(prompt, k)).read_bytes()
    assert (out / vbench_name(PROMPTS[0], 0)).read_bytes() != (out / vbench_name(PROMPTS[0], 1)).read_bytes()

    # a rerun finds everything in place; a lost clip is made again, identical
    lost = out / vbench_name(PROMPTS[1], 2)
    kept = lost.read_bytes()
    lost.unlink()
    assert _vbench(base, PROMPTS, out, tmp_path) == 0
    assert lost.read_bytes() == kept
    assert _vbench(base, PROMPTS, out, tmp_path, "--seed", "1") == 2  # other settings: refused, one line
    assert "other settings (seed)" in capsys.readouterr().err


def test_generate_needs_out_or_vbench(base: str, tmp_path: Path, capsys) -> None:
    file = tmp_path / "p.txt"
    file.write_text("a digit\n")
    assert main(["--quiet", "generate", "--family", "toy-video", "--pretrained", base, "--prompts", str(file)]) == 2
    assert "--out" in capsys.readouterr().err
