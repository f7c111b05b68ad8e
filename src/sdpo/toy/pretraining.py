"""A world's pretrained base model as a cached folder, keyed by a hash of its config, trained on first use.

``pretrain_base`` reuses a complete cached folder (``sdpo.toy.model_folder``) or builds and trains the
models of the config's world and writes them through ``pretrain_into_cache``, which puts the marker in
last and renames the folder into place, so an interrupted run never leaves a folder that looks finished.
``PretrainedWorld`` is what both worlds share: their base model is this cached pretraining of their config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpo.toy.model_folder import MARKER_FILE, base_folder, check_folder
from sdpo.toy.pretrain_settings import PretrainSettings


def pretrain_into_cache(
    final: Path,
    settings: PretrainSettings,
    train_and_save: Callable[[Path], list[float]],
    check: Callable[[Path], Any],
) -> Path:
    """``final``, trained on first use and reused afterwards (``check`` validates it either way).

    ``train_and_save(folder)`` trains the model, writes it to ``folder`` and returns its loss
    history. It writes into a temporary sibling; the marker goes in last and the folder is renamed
    into place, so an interrupted run leaves nothing that could be mistaken for a finished model.
    """
    if final.exists():
        check(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        history = train_and_save(temporary)
        tail = history[-100:]
        size = max(1, math.ceil(len(history) / 10))
        marker = {
            **settings.hash_header(),
            "complete": True,
            "config": settings.to_dict(),
            "config_hash": settings.short_hash(),
            "train_seconds": round(time.perf_counter() - start, 2),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 2),
            "final_loss": sum(tail) / len(tail),
            # Mean loss over each tenth of training, to judge whether more steps would still help.
            "loss_by_tenth": [round(sum(history[i : i + size]) / len(history[i : i + size]), 4)
                              for i in range(0, len(history), size)],
            "torch_threads": torch.get_num_threads(),
        }
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(temporary, final)
        except OSError:
            # Another process finished the same config first (the target is a non-empty folder):
            # its copy is as good as ours.
            if not final.exists():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary)
    check(final)
    return final


def pretrain_base(
    config: PretrainSettings | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the pretrained base model of ``config`` (default: the digits world's), trained on first use.

    A complete cached folder is reused as it is (after ``check_folder``); otherwise the model is
    built and trained by the config's world and written through ``pretrain_into_cache``. Raises
    ToyCacheError when the folder exists but is damaged.
    """
    if config is None:
        from sdpo.toy.digits.model import ToyModelConfig

        config = ToyModelConfig()

    def train_and_save(target: Path) -> list[float]:
        models = config.pretrained_models(progress)
        models.save(target)
        return models.history

    return pretrain_into_cache(base_folder(config, cache_root), config, train_and_save,
                               lambda found: check_folder(found, type(config), config))


@dataclass(frozen=True)
class PretrainedWorld:
    """What both worlds do alike (a base for ``sdpo.toy.world.World``): their base model is the cached
    pretraining of their config."""

    config: PretrainSettings
    """The base model's size and pretraining recipe."""

    def pretrain(self, cache_root: str | Path | None = None, progress: bool = True) -> Path:
        """The cached base-model folder, pretrained on first use."""
        return pretrain_base(self.config, cache_root, progress)
