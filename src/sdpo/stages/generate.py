"""`sdpo generate`: K candidates per prompt from a model, seeds recorded, written resumably.

Layout of the output folder:

* ``media/p{prompt:05d}-c{candidate:03d}.png`` (images) or ``.mp4`` (videos; with
  ``frame_folders=True`` also a folder of PNG frames of the same stem; with ``mp4=False`` only that folder);
* ``batches/batch-{n:06d}.safetensors``: the exact float pixels of one batch (tensor ``pixels``,
  (n, ...) in [-1, 1]) and, in its metadata ``records``, the candidate records of that batch;
  a batch file is renamed into place only after its media, so its presence marks the batch done;
* ``generate.json``: the settings (prompts, seed, sampler, model, ...), also in the folder's marker
  ``.sdpo.json`` (:mod:`sdpo.folders`); both are written with the first finished batch, so a first run
  that fails binds nothing; a rerun with other settings into the same folder is refused;
* ``candidates.jsonl``: one record per candidate (see :class:`Candidate`), rebuilt atomically from
  the finished batches at the end;
* with ``rollout`` (online RL): ``trajectories/batch-{n:06d}.safetensors``, batch n's recorded
  trajectories (``sdpo.rl.rollout.Trajectories.tensors``: trained steps, x_t, x_s, their
  log-probabilities, the initial noise; rows as in the batch file), written before the batch file lands.

Work is cut into batches over the global (prompt, candidate) order; batch n goes to process
n % world_size, so every batch holds the same candidates whatever the number of processes and the
files equal a single process's. The initial noise of candidate (p, k) is
``spec.initial_latents(1, derive_seed(seed, p, k))``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sdpo.data.video import write_mp4
from sdpo.errors import FolderError, InputError
from sdpo.files import atomic_output, fsync_dir, write_atomic
from sdpo.models.base import ModelSpec
from sdpo.models.lora_check import load_lora_checked
from sdpo.rl.rollout import RolloutSettings
from sdpo.rl.rollout import rollout as sample_trajectories
from sdpo.seeding import derive_seed
from sdpo.stages.processes import barrier, process_rank
from sdpo.stages.records import CANDIDATES_FILE, parse_json_line, write_records

FAIL_AFTER_ENV = "SDPO_GENERATE_FAIL_AFTER"
SETTINGS_BEFORE_RECORDED = {"mp4": True}
"""Settings a folder made before they were recorded was made with (so that such a folder resumes)."""
"""Test hook: raise after this many batches were written by this process (simulates a killed run)."""


@dataclass(frozen=True)
class SamplerSettings:
    """How candidates are sampled."""

    num_inference_steps: int = 50
    """Sampler steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (1 disables guidance)."""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be positive, got {self.num_inference_steps}")


@dataclass
class Candidate:
    """One generated sample, as a line of ``candidates.jsonl``."""

    prompt: str
    """The prompt it was sampled for."""
    prompt_index: int
    """Index of the prompt in the prompts list."""
    candidate_index: int
    """Index k among the prompt's candidates."""
    path: str
    """Media file (PNG or MP4), relative to the folder."""
    seed: int
    """Seed of its initial noise (``derive_seed(run seed, prompt_index, candidate_index)``)."""
    sampler: dict[str, Any]
    """SamplerSettings as a dict."""
    model: str | None
    """The model's ``pretrained`` (folder or hub id)."""
    family: str
    """Model family."""
    lora: str | None
    """LoRA folder sampled with, or None."""
    pixels: str
    """Batch file holding its exact float pixels, relative to the folder."""
    pixels_index: int
    """Row in that batch file."""
    frames: str | None = None
    """Frame folder (videos with ``frame_folders``), relative to the folder."""
    scores: dict[str, float] = field(default_factory=dict)
    """Reward name -> score (filled by ``score``)."""
    total: float | None = None
    """Weighted total of the scores (filled by ``score``)."""


@dataclass(frozen=True)
class GenerateResult:
    """What ``generate`` did."""

    out_dir: Path
    candidates: int
    """Candidates in candidates.jsonl."""
    generated: int
    """Candidates sampled by this call on this process (0 when everything was there already)."""


def load_pixels(folder: str | Path, candidate: dict[str, Any]) -> Tensor:
    """The exact float pixels of one candidate record."""
    with safe_open(str(Path(folder) / candidate["pixels"]), "pt") as handle:
        return handle.get_slice("pixels")[candidate["pixels_index"]]


def write_media(pixels: Tensor, path: Path, frame_folder: Path | None = None, fps: int = 8, *,
                sync_folder: bool = True) -> None:
    """PNG for an image (C, H, W), MP4 for a clip (F, C, H, W) (plus PNG frames in ``frame_folder``).

    ``sync_folder=False``: the caller syncs the folders once for a batch of files (see ``atomic_output``)."""
    array = _channels_last_uint8(pixels)
    if pixels.ndim == 3:
        _write_png(array, path, sync_folder)
        return
    if frame_folder is not None:
        _write_frame_pngs(array, frame_folder, sync_folder)
    with atomic_output(path, sync_folder=sync_folder) as temporary:
        write_mp4(array, temporary, fps)


def write_frames(pixels: Tensor, frame_folder: Path, *, sync_folder: bool = True) -> None:
    """A clip (F, C, H, W) in [-1, 1] as a folder of PNG frames (lossless, unlike the MP4)."""
    _write_frame_pngs(_channels_last_uint8(pixels), frame_folder, sync_folder)


def _channels_last_uint8(pixels: Tensor) -> np.ndarray:
    """[-1, 1] floats, channels first -> 8-bit values, channels last (what PIL and the encoder take)."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.movedim(-3, -1).numpy()


def _write_png(image: np.ndarray, path: Path, sync_folder: bool = True) -> None:
    from PIL import Image

    with atomic_output(path, sync_folder=sync_folder) as temporary:  # grey (one channel): an 8-bit grey PNG
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(temporary, format="PNG")


def _write_frame_pngs(frames: np.ndarray, frame_folder: Path, sync_folder: bool = True) -> None:
    frame_folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        _write_png(frame, frame_folder / f"{index:04d}.png", sync_folder=False)
    if sync_folder:
        fsync_dir(frame_folder)


def sample_with_seeds(spec: ModelSpec, prompts: list[str], latents: Tensor, seeds: list[int],
                      sampler: SamplerSettings, progress: bool = False) -> Tensor:
    """``spec.sample`` with the sampler's settings and per-sample ``seeds`` (for stochastic schedulers)."""
    return spec.sample(prompts, latents, num_inference_steps=sampler.num_inference_steps,
                       guidance_scale=sampler.guidance_scale, progress=progress, seeds=seeds)


TRAJECTORIES_DIR = "trajectories"
"""Where a rollout's per-batch trajectory files live in a generate folder."""


def trajectories_file(batch: int) -> str:
    """Batch ``batch``'s trajectories file, relative to the generate folder."""
    return f"{TRAJECTORIES_DIR}/batch-{batch:06d}.safetensors"


SETTINGS_FILE = "generate.json"
"""What a generate folder was made with; a resumed run must ask for exactly the same."""


def generate_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse (FolderError) a rerun in ``out`` with other settings than the batches already there were
    made with, or into another stage's folder; only the keys of ``settings`` are compared. A folder
    whose first run produced nothing (it failed before its first batch) binds no settings."""
    from sdpo.folders import check_kind, check_reuse, saved_settings

    check_kind(out, "generate")
    if not any((out / "batches").glob("batch-*.safetensors")):
        return
    saved = saved_settings(out, "generate", legacy=SETTINGS_FILE)
    if saved is not None:
        saved = {**SETTINGS_BEFORE_RECORDED, **saved}
    check_reuse(out, "generate", settings, saved=saved)


def _record_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write generate.json and the folder's marker: called once the first batch is made, before it lands."""
    from sdpo.folders import write_marker

    write_atomic(out / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    write_marker(out, "generate", settings)


def plan_batches(prompts: list[str], per_prompt: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The (prompt, candidate) items of each batch, in the order generate samples and numbers them."""
    items = [(p, k) for p in range(len(prompts)) for k in range(per_prompt)]
    return [items[start:start + batch_size] for start in range(0, len(items), batch_size)]


def generate(
    spec: Any,
    prompts: list[str],
    out_dir: str | Path,
    *,
    per_prompt: int,
    seed: int = 0,
    sampler: SamplerSettings | None = None,
    lora: str | Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
    frame_folders: bool = False,
    fps: int = 8,
    mp4: bool = True,
    rollout: RolloutSettings | None = None,
) -> GenerateResult:
    """Sample ``per_prompt`` candidates for each prompt with ``spec`` into ``out_dir`` (see the module doc).

    ``lora``: a training run folder loaded onto the spec first. Resumable: finished batches are kept.
    ``mp4=False`` (videos with ``frame_folders``): no MP4 per clip, the record's ``path`` is its frame
    folder; for folders nobody watches (a demo's or a benchmark's candidates, scored from ``batches/``).
    """
    from tqdm.auto import tqdm

    sampler = sampler or SamplerSettings()
    if per_prompt < 1 or batch_size < 1:
        raise InputError(f"per_prompt and batch_size must be positive, got {per_prompt} and {batch_size}")
    if not prompts:
        raise InputError("no prompts to generate for")
    if rollout is not None and (rollout.num_inference_steps, rollout.guidance_scale) != (
            sampler.num_inference_steps, sampler.guidance_scale):
        raise InputError("the rollout's num_inference_steps and guidance_scale must be the sampler's")
    if not mp4 and spec.media_format.frames is not None and not frame_folders:
        raise InputError("mp4=False keeps no viewable clip unless frame_folders=True")
    out = Path(out_dir)
    rank, world = process_rank()
    settings = {"prompts": list(prompts), "per_prompt": per_prompt, "seed": seed, "sampler": asdict(sampler),
                "batch_size": batch_size, "family": spec.family,
                "model": spec.pretrained and str(spec.pretrained),
                "media_format": asdict(spec.media_format), "lora": None if lora is None else str(lora),
                "frame_folders": frame_folders, "fps": fps, "mp4": mp4}
    if rollout is not None:  # only then: a plain folder's settings stay what they always were
        settings["rollout"] = asdict(rollout)
    generate_settings(out, settings)
    if lora is not None:
        load_lora_checked(spec, lora)
    batches = plan_batches(prompts, per_prompt, batch_size)
    mine = [n for n in range(len(batches)) if n % world == rank]
    todo = [n for n in mine if not (out / "batches" / f"batch-{n:06d}.safetensors").is_file()]
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    done = 0
    bar = tqdm(total=sum(len(batches[n]) for n in todo), desc="generate", unit="sample",
               disable=not progress or rank != 0)
    for count, n in enumerate(todo):
        if fail_after and count >= fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: stopping after {count} batches (test hook)")
        _generate_batch(spec, prompts, batches[n], n, out, seed, sampler, lora, frame_folders, fps, mp4,
                        record=None if count else lambda: _record_settings(out, settings), rollout=rollout)
        done += len(batches[n])
        bar.update(len(batches[n]))
    bar.close()
    barrier(world)
    records = collect_records(out, len(batches))
    if rank == 0 and (done or not (out / CANDIDATES_FILE).is_file()):  # a finished, scored folder is kept
        write_records(out, records)
    barrier(world)
    return GenerateResult(out, len(records), done)


def _generate_batch(spec: Any, prompts: list[str], items: list[tuple[int, int]], n: int, out: Path, seed: int,
                    sampler: SamplerSettings, lora: str | Path | None, frame_folders: bool, fps: int,
                    mp4: bool = True, record: Callable[[], None] | None = None,
                    rollout: RolloutSettings | None = None) -> None:
    (out / "media").mkdir(parents=True, exist_ok=True)
    (out / "batches").mkdir(parents=True, exist_ok=True)
    seeds = [derive_seed(seed, p, k) for p, k in items]
    latents = torch.cat([spec.initial_latents(1, s) for s in seeds])
    batch_name = f"batches/batch-{n:06d}.safetensors"
    if rollout is None:
        pixels = sample_with_seeds(spec, [prompts[p] for p, _ in items], latents, seeds, sampler)
    else:
        trajectories = sample_trajectories(spec, [prompts[p] for p, _ in items], latents, seeds, rollout)
        pixels = trajectories.media
        (out / TRAJECTORIES_DIR).mkdir(exist_ok=True)
        with atomic_output(out / trajectories_file(n)) as temporary:  # before the batch file: it marks both done
            save_file({k: v.contiguous() for k, v in trajectories.tensors().items()}, str(temporary))
    records = []
    for row, ((p, k), candidate_seed) in enumerate(zip(items, seeds, strict=True)):
        stem = f"p{p:05d}-c{k:03d}"
        path = f"media/{stem}.{'png' if pixels.ndim == 4 else 'mp4'}"
        frames = f"media/{stem}" if frame_folders and pixels.ndim == 5 else None
        # Each file's rename is made durable with its folder's, once for the batch, below.
        if frames is not None and not mp4:
            path = frames
            write_frames(pixels[row], out / frames, sync_folder=False)
        else:
            write_media(pixels[row], out / path, out / frames if frames else None, fps, sync_folder=False)
        records.append(asdict(Candidate(
            prompt=prompts[p], prompt_index=p, candidate_index=k, path=path, seed=candidate_seed,
            sampler=asdict(sampler), model=spec.pretrained and str(spec.pretrained),
            family=spec.family, lora=str(lora) if lora is not None else None, pixels=batch_name,
            pixels_index=row, frames=frames)))
    for folder in {out / "media", *(out / record["frames"] for record in records if record["frames"])}:
        fsync_dir(folder)
    with atomic_output(out / batch_name) as temporary:  # the batch counts as done only once renamed into place
        save_file({"pixels": pixels.contiguous()}, str(temporary), metadata={"records": json.dumps(records)})
        if record is not None:  # the settings bind the folder from its first finished batch on
            record()


def collect_records(out: Path, expected: int | None = None) -> list[dict[str, Any]]:
    """The candidate records of every finished batch file, in batch order."""
    files = sorted((out / "batches").glob("batch-*.safetensors"))
    if expected is not None and len(files) != expected:
        raise FolderError(f"{out}: {len(files)} of {expected} batches are finished; run generate again")
    records = []
    for file in files:
        records.extend(_batch_records(file))
    return records


def _batch_records(file: Path) -> list[dict[str, Any]]:
    """The records a batch file carries in its metadata; a damaged file is one line naming it."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(file), "pt") as handle:
            text = (handle.metadata() or {}).get("records")
    except (SafetensorError, OSError) as error:
        raise InputError(f"{file}: not a readable batch file ({' '.join(str(error).split())[:120]}); move it "
                         "away and run generate again to remake it") from None
    records = parse_json_line(str(file), text) if isinstance(text, str) else None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise InputError(f"{file}: its metadata holds no candidate records; move it away and run generate "
                         "again to remake it")
    return records


__all__ = ["CANDIDATES_FILE", "Candidate", "GenerateResult", "SamplerSettings", "generate", "load_pixels"]
