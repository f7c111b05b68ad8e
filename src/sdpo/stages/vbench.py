"""`sdpo generate --vbench DIR`: clips laid out as VBench reads them, and the commands that evaluate them.

VBench's standard mode looks each prompt of its prompt lists up as ``{prompt}-{index}.mp4`` (index 0..4)
in ``--videos_path``; its custom-input mode takes any mp4 in the folder. So ``DIR`` holds exactly those
files and nothing else that VBench could read; the work folder of the generate stage (its exact pixels,
settings and resume marks) lives in ``DIR/.sdpo-vbench/``, one sub-folder per prompt.

A prompt's clips depend on the prompt text and the seed only, never on its place in the list: each prompt
is generated as a one-prompt list with run seed ``derive_seed(seed, prompt_key(prompt))``.

'/' cannot occur in a file name; VBench's own prompt lists contain none, so such a prompt is a custom one
and its '/' is written as '_' (``vbench_name``); ``prompts.json`` maps every file name to its exact prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdpo.errors import InputError
from sdpo.files import write_atomic
from sdpo.seeding import derive_seed
from sdpo.stages.generate import SamplerSettings, collect_records, generate, load_pixels, write_media

WORK_DIR = ".sdpo-vbench"
"""Hidden work folder inside DIR (batches, settings); VBench reads only DIR's own mp4 files."""
PROMPTS_FILE = "prompts.json"
"""File name -> exact prompt, for prompts whose '/' was replaced."""
STANDARD_DIMENSIONS = (
    "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
    "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
    "human_action", "color", "spatial_relationship", "scene", "temporal_style", "appearance_style",
    "overall_consistency")
"""VBench's 16 dimensions (standard mode: prompts from VBench's own lists)."""
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality")
"""The dimensions VBench evaluates in ``--mode=custom_input`` (any prompts)."""
_MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class VBenchResult:
    """What ``generate_vbench`` wrote."""

    out_dir: Path
    files: list[Path]
    """Every clip, in prompt then index order."""
    generated: int
    """Clips sampled by this call (0 when everything was there already)."""
    commands: list[str]
    """The ``vbench evaluate`` command lines (standard, then custom-input mode)."""


def vbench_name(prompt: str, index: int) -> str:
    """The file VBench looks up for clip ``index`` of ``prompt``: ``{prompt}-{index}.mp4`` ('/' -> '_')."""
    name = f"{prompt.replace('/', '_')}-{index}.mp4"
    if not prompt.strip() or "\0" in prompt:
        raise InputError(f"prompt {prompt!r} cannot be a VBench file name")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise InputError(f"prompt {prompt[:40]!r}... is too long for a VBench file name "
                         f"({len(name.encode('utf-8'))} bytes, at most {_MAX_NAME_BYTES})")
    return name


def prompt_key(prompt: str) -> int:
    """A 63-bit number of the prompt text alone (its seed and work folder do not depend on the list)."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def vbench_commands(out_dir: str | Path) -> list[str]:
    """The ``vbench evaluate`` command lines for ``out_dir``: standard mode, then custom-input mode."""
    path = shlex.quote(str(out_dir))
    return [f"vbench evaluate --videos_path {path} --dimension {' '.join(STANDARD_DIMENSIONS)}",
            f"vbench evaluate --videos_path {path} --dimension {' '.join(CUSTOM_DIMENSIONS)} --mode=custom_input"]


def generate_vbench(spec: Any, prompts: list[str], out_dir: str | Path, *, per_prompt: int = 5, seed: int = 0,
                    sampler: SamplerSettings | None = None, lora: str | Path | None = None, batch_size: int = 5,
                    progress: bool = True, fps: int = 8) -> VBenchResult:
    """``per_prompt`` clips of every prompt into ``out_dir`` as ``{prompt}-{index}.mp4``; resumable.

    Duplicate prompts are written once (VBench's files are keyed by the prompt).
    """
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise InputError("no prompts to generate for")
    names = {prompt: [vbench_name(prompt, k) for k in range(per_prompt)] for prompt in unique}
    by_name: dict[str, str] = {}
    for prompt in unique:
        other = by_name.setdefault(names[prompt][0], prompt)
        if other != prompt:
            raise InputError(f"prompts {other!r} and {prompt!r} map to the same VBench file name")
    out = Path(out_dir)
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    _check_settings(out, {"seed": seed, "per_prompt": per_prompt, "lora": None if lora is None else str(lora),
                          "sampler": asdict(sampler or SamplerSettings()), "family": spec.family,
                          "model": spec.pretrained and str(spec.pretrained), "fps": fps})
    if lora is not None:  # once: the per-prompt generate calls below sample with the loaded LoRA
        spec.load_lora(lora)
    generated = 0
    for prompt in unique:
        generated += _one_prompt(spec, prompt, names[prompt], out, seed, sampler, batch_size, progress, fps)
    mapping = {name: prompt for prompt in unique for name in names[prompt]}
    write_atomic(out / WORK_DIR / PROMPTS_FILE, json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")
    files = [out / name for prompt in unique for name in names[prompt]]
    return VBenchResult(out, files, generated, vbench_commands(out))


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to add clips made with other settings (clips already in DIR would be kept as they are)."""
    path = out / WORK_DIR / "vbench.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key, value in settings.items() if saved.get(key) != value)
        if changed:
            raise InputError(f"{out} holds VBench clips made with other settings ({', '.join(changed)}): "
                             "use a new folder, or the same settings to resume")
        return
    write_atomic(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _one_prompt(spec: Any, prompt: str, names: list[str], out: Path, seed: int, sampler: SamplerSettings | None,
                batch_size: int, progress: bool, fps: int) -> int:
    """Generate one prompt's clips in its work folder, then move each into place; returns clips moved."""
    if all((out / name).is_file() for name in names):
        return 0
    work = out / WORK_DIR / f"{prompt_key(prompt):016x}"
    generate(spec, [prompt], work, per_prompt=len(names), seed=derive_seed(seed, prompt_key(prompt)),
             sampler=sampler, batch_size=batch_size, progress=progress, fps=fps)
    moved = 0
    for record in collect_records(work):
        name = names[record["candidate_index"]]
        source = work / record["path"]
        if not record["path"].endswith(".mp4"):
            raise InputError(f"VBench evaluates videos; family {spec.family!r} generated images")
        if (out / name).is_file():
            continue
        if source.is_file():
            os.replace(source, out / name)  # atomic: a clip is in DIR whole or not at all
        else:  # moved earlier and lost since: rewrite it from the batch's exact pixels
            write_media(load_pixels(work, record), out / name, fps=fps)
        moved += 1
    return moved


__all__ = ["CUSTOM_DIMENSIONS", "STANDARD_DIMENSIONS", "VBenchResult", "generate_vbench", "prompt_key",
           "vbench_commands", "vbench_name"]
