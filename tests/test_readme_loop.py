"""README's "whole loop for a real model" block, run as a user types it, at tiny size.

The ```bash block is read from README.md and each command goes through ``sdpo.cli.main`` with every flag
the README shows, except what the tables below change to run offline on a CPU in seconds: the hub
ids and /models/ folders become tiny random models and reward stand-ins (tests/stand_ins.py), the
sizes, candidate count and step counts shrink, cuda becomes cpu. A flag the CLI no longer accepts, a
reward option that changed name, or commands that no longer fit together fail here.

The image variant is the section's own image block (a second ```bash block with ``--family sd``) when it
has one; otherwise the video block with the substitutions the sentence above it names (``--family sd
... --reward pickscore``) plus the ones it leaves implied (IMPLIED_FOR_IMAGES). ``sdpo generate --vbench``
lines run too (their clips are checked); ``vbench`` itself is not installed, and its lines are skipped.
The python "use it" line is checked for syntax and paths, and its logic runs in-process on the tiny model.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from stand_ins import build_tiny_clip, build_tiny_qwen2vl, build_videoalign_release

from sdpo.cli import main
from sdpo.models import tiny

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SECTION = "### The whole loop for a real model (prompts to evaluated LoRA)"

# ---------------------------------------------------------------- what differs from the README, and why
TINY_SIZES = {"cogvideox": {"--frames": "9", "--height": "32", "--width": "32"},
              "sd": {"--height": "16", "--width": "16"}}
"""--frames/--height/--width: the tiny pipelines' sizes (README: 49x480x720 and 512x512)."""
FLAG_VALUES = {"--per-prompt": "2", "--steps": "2", "--dtype": "fp32"}
"""2 candidates, 2 sampler steps (README: 4 and 50); fp32 on the CPU (README: bf16 on a GPU).
--pretrained becomes the tiny model's folder."""
REWARD_OPTIONS = {"videoreward.model=/models/VideoReward": "videoreward.model={videoreward}",
                  "videoreward.base=/models/Qwen2-VL-2B-Instruct": "videoreward.base={qwen2vl}",
                  "device=cuda": "device=cpu"}
"""The reward weights' folders become the stand-ins (VideoAlign's release layout over a plain Qwen2-VL)."""
ADDED = {
    "evaluate": ["--steps", "2"],  # when the README's evaluate samples with the default 50 steps
    "train": ["--set", "pretrained={pretrained}", "max_steps=2", "lora_rank=4", "train_batch_size=1",
              "gradient_accumulation_steps=1", "learning_rate=0.01", "lr_warmup_steps=0", "mixed_precision=no",
              "gradient_checkpointing=false", "checkpoint_every=0", "report_to=none", "log_every=1"],
}
"""Flags added after the README's own: tiny training (2 steps at a learning rate that moves a rank-4 LoRA)."""
ADDED_REWARD_OPTIONS = {"pickscore": ["pickscore.model={clip}", "pickscore.processor={clip}"]}
"""The README's pickscore loads the cached hub weights; here the tiny CLIP stand-in folder."""
PROMPTS = {"prompts.txt": "a red cat\na blue dog on the mat\n", "heldout.txt": "a cat on a hill\nthe blue sky\n",
           "vbench_prompts.txt": "a dog on a hill\nthe red sky\n"}
"""The block's prompt files (2 prompts each)."""
STAGES = ["generate", "score", "pairs", "precompute", "train", "evaluate"]
"""The stages the block runs, in this order; `sdpo generate --vbench` and `vbench` lines may follow."""


# ---------------------------------------------------------------------------------- reading the block
def section() -> str:
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    return re.split(r"\n#{2,3} ", body, maxsplit=1)[0]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands: ``\\`` continuations joined, comments and blank lines dropped, shlex-split."""
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return [shlex.split(line, comments=True) for line in lines]


def sdpo_argv(command: list[str]) -> list[str] | None:
    """The argv of ``sdpo ...`` or ``accelerate launch [opts] -m sdpo.cli ...``; None for other commands."""
    if command[0] == "sdpo":
        return command[1:]
    if command[:2] == ["accelerate", "launch"]:
        at = command.index("-m")
        assert command[at + 1] == "sdpo.cli", command
        options = command[2:at]
        if "--config_file" in options:  # the accelerate config the README names ships with the repo
            assert (REPO / options[options.index("--config_file") + 1]).is_file()
        return command[at + 2:]
    return None


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ----------------------------------------------------------------------------------- the substitutions
def tiny_argv(argv: list[str], family: str, folders: dict[str, str], used: set[str]) -> list[str]:
    """The README's argv with only the tables' substitutions; ``used`` collects the entries applied."""
    values = {**FLAG_VALUES, **TINY_SIZES[family], "--pretrained": folders["pretrained"]}
    out = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word in values:
            out[i + 1] = values[word]
            used.add(word)
        elif word == "--reward-option":
            out[i + 1] = reward_option(argv[i + 1], folders, used)
    if argv[0] == "train":
        out += [word.format(**folders) for word in ADDED["train"]]
    elif argv[0] == "evaluate" and "--steps" not in argv:
        out += ADDED["evaluate"]
    if argv[0] in ("score", "evaluate"):
        for reward in [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "--reward"]:
            for option in ADDED_REWARD_OPTIONS.get(reward, []):
                out += ["--reward-option", option.format(**folders)]
    return out


def reward_option(text: str, folders: dict[str, str], used: set[str]) -> str:
    key = text.split("=", 1)[0]
    if text in REWARD_OPTIONS:
        used.add(text)
        return REWARD_OPTIONS[text].format(**folders)
    # A weights path the table does not know would reach for /models/ or the hub: the table must name it.
    assert not key.endswith((".model", ".base", ".processor", ".head", ".checkpoint")), f"unmapped {text!r}"
    return text


IMPLIED_FOR_IMAGES = """\
--frames dropped (images have none; the CLI refuses it); the videoreward.* reward options dropped (they
name a reward not among --reward); the cogvideox training config -> the configs/ file of family sd, and
precompute's --out and evaluate's --run folder -> that config's cache_dir and output_dir; --pretrained
-> that config's model (the sentence's runwayml/stable-diffusion-v1-5 is gone from the hub; the config
trains its mirror stable-diffusion-v1-5/stable-diffusion-v1-5); CogVideoXPipeline ->
StableDiffusionPipeline and .frames -> .images in the python line."""


def image_variant(video: list[list[str]], text: str) -> list[list[str]]:
    """The image loop: the README's own image block if the section has one, else the video block with
    the substitutions its sentence names plus IMPLIED_FOR_IMAGES."""
    for block in bash_blocks(text)[1:]:
        found = commands(block)
        if any(sdpo_argv(c) and "--family" in c and flag(c, "--family") == "sd" for c in found):
            return found
    sentence = re.search(r"for images,\s+use\s+`([^`]+)`\s+and\s+`([^`]+)`", text)
    assert sentence, "the section no longer says how to run the loop for images"
    model_flags, reward_flags = (shlex.split(part) for part in sentence.groups())
    sd_config = next(p for p in sorted((REPO / "configs").glob("*.yaml")) if yaml.safe_load(p.read_text())["family"]
                     == "sd")
    config = yaml.safe_load(sd_config.read_text())
    out = []
    for command in video:
        argv = sdpo_argv(command)
        if argv is None:  # the python line
            if command[0] != "python":
                continue  # vbench's own commands score videos
            code = command[2].replace("CogVideoXPipeline", "StableDiffusionPipeline").replace(".frames", ".images")
            code = re.sub(r"load_lora_weights\('[^']*'\)", f"load_lora_weights('{config['output_dir']}')", code)
            code = re.sub(r"from_pretrained\('[^']*'", f"from_pretrained('{config['pretrained']}'", code)
            out.append([*command[:2], code])
            continue
        if "--vbench" in argv:
            continue  # VBench scores videos
        prefix = command[: len(command) - len(argv)]
        argv = _set_flags(_drop_video_flags(argv), [*model_flags, *reward_flags, "--pretrained", config["pretrained"]])
        if argv[0] == "train":
            argv[1] = str(sd_config.relative_to(REPO))
        if argv[0] == "precompute":
            argv[argv.index("--out") + 1] = config["cache_dir"]
        if argv[0] == "evaluate":
            name = flag(argv, "--run").split("=", 1)[0]
            argv[argv.index("--run") + 1] = f"{name}={config['output_dir']}"
        out.append([*prefix, *argv])
    return out


def _drop_video_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--frames" or (word == "--reward-option" and argv[i + 1].startswith("videoreward.")):
            skip = True
            continue
        out.append(word)
    return out


def _set_flags(argv: list[str], pairs: list[str]) -> list[str]:
    """``--flag value`` pairs replace the same flag's value where the command has that flag."""
    argv = list(argv)
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        if name in argv:
            argv[argv.index(name) + 1] = value
    return argv


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("readme-loop-models")
    qwen2vl = build_tiny_qwen2vl(root / "Qwen2-VL-2B-Instruct", reward_tokens=False)
    return {"cogvideox": str(tiny.build_tiny_cogvideox(root / "CogVideoX-2b")),
            "sd": str(tiny.build_tiny_sd(root / "stable-diffusion-v1-5")),
            "qwen2vl": str(qwen2vl), "videoreward": str(build_videoalign_release(root / "VideoReward", qwen2vl)),
            "clip": str(build_tiny_clip(root / "PickScore_v1"))}


def readme_loop(family: str) -> list[list[str]]:
    text = section()
    blocks = bash_blocks(text)
    assert blocks, "the section has no ```bash block"
    video = commands(blocks[0])
    return video if family == "cogvideox" else image_variant(video, text)


def stages(loop: list[list[str]]) -> dict[str, list[str]]:
    """The argv of each of STAGES (each once; `generate --vbench` apart)."""
    found = [a for a in map(sdpo_argv, loop) if a and "--vbench" not in a]
    assert [a[0] for a in found] == STAGES, "the block's stages changed"
    return {a[0]: a for a in found}


def vbench_runs(loop: list[list[str]]) -> list[list[str]]:
    return [a for a in map(sdpo_argv, loop) if a and "--vbench" in a]


# ---------------------------------------------------------------------------------------------- tests
def test_the_block_is_read_as_typed() -> None:
    """The parser sees the commands the README shows (so the loop test below runs them all)."""
    video = readme_loop("cogvideox")
    argvs = stages(video)
    assert video[STAGES.index("train")][:2] == ["accelerate", "launch"]
    assert flag(argvs["score"], "--reward") == "videoreward"
    assert "device=cuda" in argvs["score"]  # a continued line's words are kept
    assert video[-1][:2] == ["python", "-c"]
    others = [c[0] for c in video[len(STAGES):-1] if not (sdpo_argv(c) and "--vbench" in c)]
    assert set(others) <= {"vbench"}, f"commands the test does not know: {others}"


@pytest.mark.parametrize("family", ["cogvideox", "sd"])
def test_the_block_fits_together(family: str) -> None:
    """One model throughout, the config reads what precompute writes, evaluate and the python line use
    what training writes."""
    loop = readme_loop(family)
    argvs = stages(loop)
    config = yaml.safe_load((REPO / argvs["train"][1]).read_text())
    assert config["family"] == family
    assert flag(argvs["precompute"], "--out") == config["cache_dir"]
    lora = flag(argvs["evaluate"], "--run").split("=", 1)[1]
    assert lora == config["output_dir"]
    assert flag(argvs["pairs"], "--out") == flag(argvs["precompute"], "--pairs")
    assert argvs["score"][1] == argvs["pairs"][1] == flag(argvs["generate"], "--out")
    hub_ids = {flag(a, "--pretrained") for a in [*argvs.values(), *vbench_runs(loop)] if "--pretrained" in a}
    assert hub_ids == {config["pretrained"]}, f"{family}: the commands load different models {hub_ids}"
    assert all(flag(a, "--lora") == lora for a in vbench_runs(loop) if "--lora" in a)
    code = loop[-1][2]
    compile(code, "README python line", "exec")
    assert f"from_pretrained('{config['pretrained']}'" in code and f"load_lora_weights('{lora}')" in code


def test_the_block_has_the_proposed_fixes() -> None:
    """A hub id that still exists; evaluate samples and scores as generate and score do."""
    text = section()
    assert "runwayml/" not in text  # removed from the hub in 2024; configs/sd15-lora.yaml uses its mirror
    argvs = stages(commands(bash_blocks(text)[0]))
    assert "device=cuda" in argvs["evaluate"]  # else the 2B reward model scores on the CPU
    assert flag(argvs["evaluate"], "--guidance") == flag(argvs["generate"], "--guidance")
    assert "--vae-tiling" in argvs["evaluate"]
    assert vbench_runs(commands(bash_blocks(text)[0])), "the loop ends without its VBench commands"


@pytest.mark.parametrize("family", ["cogvideox", "sd"])
def test_the_readme_loop_runs_at_tiny_size(family: str, stand_ins: dict[str, str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    loop = readme_loop(family)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # the README runs from the repository's root
    for name, lines in PROMPTS.items():
        Path(name).write_text(lines)
    folders = {**stand_ins, "pretrained": stand_ins[family]}
    used: set[str] = set()
    for command in loop:
        argv = sdpo_argv(command)
        if argv is not None:
            tiny = tiny_argv(argv, family, folders, used)
            assert main(["--quiet", *tiny]) == 0, f"README command failed: sdpo {shlex.join(tiny)}"
    expected = {*FLAG_VALUES, *TINY_SIZES[family], "--pretrained", "device=cuda"}
    if family == "cogvideox":
        expected |= {k for k in REWARD_OPTIONS if k.startswith("videoreward.")}
    assert used == expected, "a substitution in the tables no longer matches the README"

    argvs = stages(loop)
    reward = flag(argvs["score"], "--reward")
    assert reward == {"cogvideox": "videoreward", "sd": "pickscore"}[family]
    gen = Path(flag(argvs["generate"], "--out"))
    records = [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(isinstance(r["scores"][reward], float) for r in records)
    assert len({r["scores"][reward] for r in records}) == 4  # a learned reward tells the candidates apart
    pairs = Path(flag(argvs["pairs"], "--out")).read_text().splitlines()
    assert len(pairs) == 2 and all(json.loads(p)["gap"] > 0 for p in pairs)
    name, lora = flag(argvs["evaluate"], "--run").split("=", 1)
    assert (Path(lora) / "pytorch_lora_weights.safetensors").is_file()
    results = json.loads((Path(flag(argvs["evaluate"], "--out")) / "results.json").read_text())
    assert results["models"] == ["base", name]
    assert set(results["versus_base"][reward][name]) >= {"gain", "win_rate", "n"}
    assert results["versus_base"][reward][name]["n"] == 2
    for run in vbench_runs(loop):
        clips = sorted(p.name for p in Path(flag(run, "--vbench")).glob("*.mp4"))
        per_prompt = int(flag(run, "--per-prompt")) if "--per-prompt" in run else 5
        prompts = Path(flag(run, "--prompts")).read_text().splitlines()
        assert clips == sorted(f"{p}-{i}.mp4" for p in prompts for i in range(per_prompt))
    use_it(loop[-1][2], folders["pretrained"], Path(lora), family)


def use_it(code: str, pretrained: str, lora: Path, family: str) -> None:
    """The README's python line in-process: its pipeline class loads the trained LoRA with
    ``load_lora_weights`` (on the tiny model, on the CPU), and the LoRA changes what it samples."""
    import diffusers

    pipeline = getattr(diffusers, re.search(r"from diffusers import (\w+)", code).group(1))
    size = {k.lstrip("-").replace("frames", "num_frames"): int(v) for k, v in TINY_SIZES[family].items()}

    def sample(pipe: object) -> torch.Tensor:
        out = pipe("a cat surfing", num_inference_steps=2, output_type="pt", **size, **extra,
                   generator=torch.Generator().manual_seed(0))
        return out.frames[0] if family == "cogvideox" else out.images[0]

    pipe = pipeline.from_pretrained(pretrained, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # The tiny transformer reads 16 text tokens; the pipeline's default is CogVideoX-2B's 226.
    extra = {"max_sequence_length": pipe.transformer.config.max_text_seq_length} if family == "cogvideox" else {}
    base = sample(pipe)
    pipe.load_lora_weights(str(lora))
    assert not torch.equal(sample(pipe), base)
