"""Which settings a resumed run may change: the checkpoint's config against the resuming one.

A resume continues the same optimisation, so anything that shapes it (model, cache, method, LoRA,
optimizer, schedule, batch geometry, precision, timesteps, seed, ...) must stay; what only decides how
long, how often or where to write (and the memory-only switches) may change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdpo.errors import ConfigError
from sdpo.train.config import TrainConfig

SAFE_RESUME_FIELDS = frozenset({
    "max_steps", "log_every", "checkpoint_every", "checkpoints_total_limit", "report_to", "output_dir",
    "max_bad_steps",
    # Memory-only switches: they change where or when values are computed, not what is trained.
    "gradient_checkpointing", "offload_reference",
})
"""Settings a resumed run may change (plus every ``validation_*``); any other change is refused."""


@dataclass(frozen=True)
class ConfigChange:
    """A setting that differs between a checkpoint's config and the resuming one (a dotted name for method keys)."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r}"


class ConfigMismatchError(ConfigError):
    """Resuming with a changed setting that would corrupt the run (one line: the field, both values)."""


def is_resume_safe(name: str) -> bool:
    """Whether setting ``name`` (dotted for method keys) may change between a checkpoint and its resume."""
    return name in SAFE_RESUME_FIELDS or name.startswith("validation_")


def check_resume(saved: TrainConfig, current: TrainConfig) -> list[ConfigChange]:
    """The safe changes from ``saved`` (the checkpoint's config) to ``current``, in field order.

    Raises ConfigMismatchError naming the first unsafe change (model, cache, method, LoRA, optimizer,
    schedule, batch geometry, precision, timesteps, seed, ...) with both values.
    """
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    changes = []
    for name in [*new, *(key for key in old if key not in new)]:
        before, after = old.get(name), new.get(name)
        if before == after and (name in old) == (name in new):
            continue
        if not is_resume_safe(name):
            raise ConfigMismatchError(
                f"cannot resume: {name} was {before!r} in the checkpoint and is {after!r} now; set it back "
                f"to {before!r}, or start a new run in another output_dir"
            )
        changes.append(ConfigChange(name, before, after))
    return changes


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if key == "method":
            flat.update({f"method.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
