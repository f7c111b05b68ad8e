"""Which layers LoRA adapts: the config's ``lora_target_modules`` checked on its own when the config is
built, and against the live denoiser when it loads (a name or pattern that matches no adaptable layer
is refused, naming the layers there are)."""

from __future__ import annotations

import re

import torch.nn as nn

from sdpo.errors import InputError


def resolve_lora_targets(requested: list[str] | str | None, default: list[str] | str,
                         model: nn.Module) -> list[str] | str:
    """peft's ``target_modules`` for ``model``: ``requested`` (checked to match a Linear / Conv /
    Embedding layer of ``model``) or, when None, the family ``default``."""
    if requested is None:
        return default
    adaptable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    names = [name for name, module in model.named_modules() if name and isinstance(module, adaptable)]
    if isinstance(requested, str):
        pattern = re.compile(requested)
        missing = [] if any(pattern.fullmatch(name) for name in names) else [requested]
    else:
        missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        what = "no layer's full name matches" if isinstance(requested, str) else "no adaptable layer is named"
        raise InputError(f"lora_target_modules: {what} {', '.join(map(repr, missing))}; the denoiser's "
                         f"Linear/Conv layers are named: {', '.join(_short_names(names))}")
    return list(requested) if not isinstance(requested, str) else requested


def _short_names(names: list[str]) -> list[str]:
    """Distinct trailing names ("to_k", "to_out.0": an index keeps its parent) of module paths."""
    short = set()
    for name in names:
        parts = name.split(".")
        short.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(short)


def check_lora_targets(targets: list[str] | str | None) -> None:
    """A one-line InputError unless ``targets`` (the config's ``lora_target_modules``) is None, a valid
    regular expression, or a non-empty list of non-empty names; whether they match comes at load."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise InputError(f"lora_target_modules is not a valid regular expression: {error}") from error
        if not targets:
            raise InputError("lora_target_modules must not be empty (null: the family default)")
    elif targets is not None and (not targets or not all(targets)):
        raise InputError(f"lora_target_modules must be non-empty module names (null: the family default), "
                         f"got {targets!r}")
