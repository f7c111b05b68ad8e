"""The model card (``README.md``) of an exported model folder, as the Hub and diffusers' training scripts
write them: YAML metadata (base model, library, tags, licence), then what was trained, how and on what.

The card is written through ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` and carries its own
facts under the ``sdpo`` metadata key, so ``sdpo evaluate`` can add its figures later by reading the
card back and writing it again; a folder whose card was not written here is never touched.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpo.files import write_atomic

CARD_NAME = "README.md"

KNOWN_LICENSES = {
    "THUDM/CogVideoX-2b": "apache-2.0",
    "THUDM/CogVideoX-5b": "other",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "apache-2.0",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}
"""Licences of the published bases, for when the base folder carries no card of its own to read it from."""


@dataclass
class TrainingFacts:
    """What a card says about the training run that made the weights."""

    family: str
    """Model family (``sd``, ``sdxl``, ``cogvideox``, ``wan`` or an embedded world's)."""
    base_model: str
    """The ``pretrained`` the run started from: a hub id or a local folder."""
    media_kind: str
    """``image`` or ``video``: decides the pipeline tag."""
    weights: str
    """``LoRA (rank N)`` or ``full``."""
    method: dict[str, Any]
    """The objective's settings (``MethodConfig`` as a dict: name, beta, clipping, masking, ...)."""
    training: dict[str, Any]
    """Steps, batch, learning rate and the other optimiser settings that decide the result."""
    pairs: int | None = None
    """Number of preference pairs (for kto: labelled samples) in the cache the run trained on (None: unknown)."""
    pairs_source: str | None = None
    """The pairs file the cache was encoded from, where the cache recorded it."""
    cache_dir: str = ""
    """The precompute cache the run read."""
    command: str | None = None
    """The command line that trained it (None: called from Python)."""
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Evaluation folder -> {reward -> figures against the base}, added by ``sdpo evaluate``."""


def command_line(argv: Sequence[str] | None = None) -> str | None:
    """The command that is running (default ``sys.argv``), as a user would type it again; None when it is
    not the sdpo CLI."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else ""
    if program == "sdpo":
        return shlex.join(["sdpo", *argv[1:]])
    if program == "cli.py" and Path(argv[0]).parent.name == "sdpo":  # accelerate launch / torchrun -m sdpo.cli
        return shlex.join(["python", "-m", "sdpo.cli", *argv[1:]])
    return None


def _subcommand(command: str | None) -> str | None:
    """The sdpo subcommand of a ``command_line`` (global flags such as ``--quiet`` come before it)."""
    words = shlex.split(command) if command else []
    words = words[3:] if words[:3] == ["python", "-m", "sdpo.cli"] else words[1:]
    return next((word for word in words if not word.startswith("-")), None)


def training_facts(config: Any, media_kind: str, command: str | None = None) -> TrainingFacts:
    """The facts of a ``TrainConfig``; the pair count and source come from its cache's manifest."""
    manifest = _read_json(Path(config.cache_dir) / "manifest.json") if config.cache_dir else {}
    found = manifest.get("extra")
    extra: dict[str, Any] = found if isinstance(found, dict) else {}
    pairs = manifest.get("num_pairs")
    return TrainingFacts(
        family=config.family, base_model=str(config.pretrained), media_kind=media_kind,
        weights=f"LoRA (rank {config.lora_rank})" if config.lora_rank > 0 else "full",
        method=json.loads(json.dumps(asdict(config.method))),  # tuples as lists: the card is YAML
        training={"max_steps": config.max_steps, "train_batch_size": config.train_batch_size,
                  "gradient_accumulation_steps": config.gradient_accumulation_steps,
                  "learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule,
                  "mixed_precision": config.mixed_precision, "ema_decay": config.ema_decay,
                  "seed": config.seed},
        pairs=pairs if isinstance(pairs, int) else None,
        pairs_source=next((extra[k] for k in ("pairs_file", "samples_file") if isinstance(extra.get(k), str)), None),
        cache_dir=str(config.cache_dir), command=command)


def render_card(facts: TrainingFacts) -> str:
    """The card's text: Hub metadata, then the method, the data, the command and any evaluation."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = _hub_id(facts.base_model)
    data = ModelCardData(
        base_model=hub_base, library_name="diffusers", license=_license(facts.base_model),
        pipeline_tag="text-to-video" if facts.media_kind == "video" else "text-to-image",
        tags=["diffusers", "sdpo", facts.method.get("name", "dpo"), "lora" if facts.weights != "full" else "full",
              "text-to-video" if facts.media_kind == "video" else "text-to-image"],
        sdpo=asdict(facts))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(facts)}"))


def export_card(staging: Path, config: Any, media_kind: str, previous_folder: Path) -> Path:
    """The card of weights being exported into ``staging``. ``sdpo export`` re-exports a run: the card then
    keeps the command that trained it (from the card in ``previous_folder``); evaluations never carry
    over to new weights."""
    command = command_line()
    if _subcommand(command) == "export":
        previous = read_card_facts(previous_folder)
        command = previous.command if previous is not None else None
    return write_model_card(staging, training_facts(config, media_kind, command))


def write_model_card(folder: str | Path, facts: TrainingFacts) -> Path:
    """Write ``folder/README.md`` for ``facts`` atomically; returns its path."""
    path = Path(folder) / CARD_NAME
    write_atomic(path, render_card(facts))
    return path


def read_card_facts(folder: str | Path) -> TrainingFacts | None:
    """The facts of a card this module wrote, or None (no card, or somebody else's)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        stored = ModelCard.load(path).data.to_dict().get("sdpo")
        return TrainingFacts(**stored) if isinstance(stored, dict) else None
    except (ValueError, TypeError, OSError):  # unparsable metadata or fields of another version
        return None


def record_evaluation(folder: str | Path, evaluation: str, figures: dict[str, dict[str, Any]]) -> bool:
    """Add one evaluation's figures (reward -> figures) to ``folder``'s card; False when the folder has
    no card written by sdpo (a LoRA from elsewhere is not ours to edit)."""
    facts = read_card_facts(folder)
    if facts is None:
        return False
    facts.evaluations[evaluation] = figures
    write_model_card(folder, facts)
    return True


def _body(facts: TrainingFacts) -> str:
    method = facts.method.get("name", "?")
    settings = ", ".join(f"{key}={value}" for key, value in facts.method.items() if key != "name")
    training = ", ".join(f"{key}={value}" for key, value in facts.training.items() if value is not None)
    what = "labelled samples (unpaired)" if method == "kto" else "preference pairs"
    data = f"{facts.pairs} {what}" if facts.pairs is not None else what
    source = f" from `{facts.pairs_source}`" if facts.pairs_source else ""
    lines = [
        f"# {method} fine-tune of {facts.base_model}", "",
        f"{facts.weights[0].upper()}{facts.weights[1:]} weights for `{facts.base_model}` ({facts.family}), trained with "
        f"`sdpo` on {data}{source} (cache `{facts.cache_dir}`).", "",
        "## Method", "", f"`{method}`: {settings}.", "",
        "## Training", "", f"{training}.", "",
    ]
    if facts.command:
        lines += ["## Command", "", "```bash", facts.command, "```", ""]
    lines += _usage(facts) + _evaluation_lines(facts.evaluations)
    return "\n".join(lines)


def _usage(facts: TrainingFacts) -> list[str]:
    if facts.weights == "full":
        return ["## Use", "", "The fine-tuned denoiser is a `from_pretrained` folder beside this card.", ""]
    return ["## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
            f"pipe = DiffusionPipeline.from_pretrained({facts.base_model!r})",
            "pipe.load_lora_weights('path/to/this/folder')", "```", ""]


def _evaluation_lines(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    if not evaluations:
        return []
    lines = ["## Evaluation", "", "Against the base model from identical initial noise (`sdpo evaluate`).", "",
             "| evaluation | reward | mean (base -> tuned) | gain [95% CI] | win rate [95% CI] |", "|---|---|---|---|---|"]
    for folder, rewards in evaluations.items():
        for reward, f in rewards.items():
            lines.append(f"| `{folder}` | {reward} | {f['base_mean']:.3f} -> {f['tuned_mean']:.3f} | "
                         f"{f['gain']['value']:+.3f} [{f['gain']['low']:+.3f}, {f['gain']['high']:+.3f}] | "
                         f"{f['win_rate']['value']:.3f} [{f['win_rate']['low']:.3f}, {f['win_rate']['high']:.3f}] |")
    return lines + [""]


def _hub_id(name: str) -> str | None:
    """``name`` when it reads as a hub id (``org/model``, not a folder on this machine), else None."""
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not Path(name).exists() else None


def _license(base: str) -> str | None:
    """The base's licence: from its own card when the base is a local folder with one, else the known table."""
    card = Path(base) / CARD_NAME
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            license_ = ModelCard.load(card).data.to_dict().get("license")
            if isinstance(license_, str):
                return license_
        except (ValueError, OSError):
            pass
    return KNOWN_LICENSES.get(base)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
