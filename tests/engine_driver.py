"""Train several tiny configs in one launch of two processes, one after another, as separate `sdpo train`s would.

Launched by tests/test_engines.py with torchrun; one launch serves every cell of every engine, because
starting the processes costs far more than a tiny run. ``argv[1]`` is a JSON list of cells, each
``{"config": YAML, "mode": ..., "set": ["key=value", ...], "env": {...}}``, where ``env`` is the
environment that ``accelerate launch --config_file ENGINE.yaml`` gives its processes (its ACCELERATE_* and
FSDP_* variables, computed by accelerate's own launcher code): the cell runs under it, the previous cell's
removed. Modes:

- ``train``: ``sdpo train CONFIG --set ...``, through ``sdpo.cli.main`` as typed;
- ``stop``: the same run, sent SIGTERM (what a cluster sends before pre-empting a job) after step 2;
- ``resume``: ``sdpo train CONFIG --resume latest``;
- ``poison``: a ``train`` whose loss on process 1 only is NaN at step 2 (the non-finite guard's case).

Each cell starts from accelerate's state as a fresh launch has it: accelerate keeps one process-wide state
(which a run changes: FSDP's wrap policy and checkpointing switch, DeepSpeed's filled-in config), dropped
between cells. The gloo process group stays up from cell to cell, as in any process that trains more than
once (``sdpo.train.sharding.end_run``): accelerate and DeepSpeed find it started and use it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import torch


def enter(env: dict[str, str]) -> None:
    """A fresh accelerate state under ``env`` (the previous cell's launcher variables removed)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    for name in [name for name in os.environ if name.startswith(("ACCELERATE_", "FSDP_"))]:
        del os.environ[name]
    os.environ.update(env)


def stop_after_step_2(step: int, row: dict, model: torch.nn.Module) -> None:
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)


def poison_process_1() -> None:
    """NaN the loss of process 1's second forward of the next run."""
    import sdpo.train.optimize as optimize

    real, calls = optimize.preference_step, [0]

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if os.environ["RANK"] == "1" and calls[0] == 1:
            result.output.loss = result.output.loss * math.nan
        calls[0] += 1
        return result

    optimize.preference_step = poisoned  # restored by the caller


def run(cell: dict) -> None:
    from sdpo.cli import main
    from sdpo.train.config import TrainConfig, parse_override
    from sdpo.train.trainer import train

    args = ["--quiet", "train", cell["config"], "--set", *cell.get("set", [])]
    mode = cell.get("mode", "train")
    if mode == "stop":
        config = TrainConfig.from_file(cell["config"], overrides=[parse_override(s) for s in cell.get("set", [])])
        result = train(config, progress=False, on_log=stop_after_step_2)
        assert result.stopped_at == 2, result.stopped_at
        return
    if mode == "resume":
        args += ["--resume", "latest"]
    if mode == "poison":
        import sdpo.train.optimize as optimize

        real = optimize.preference_step
        poison_process_1()
        try:
            assert main(args) == 0
        finally:
            optimize.preference_step = real
        return
    assert main(args) == 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    import time

    for cell in json.loads(Path(sys.argv[1]).read_text()):
        enter(cell["env"])
        began = time.perf_counter()
        run(cell)
        print(f"cell {cell.get('mode', 'train')} {cell['set'][0]}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    torch.distributed.destroy_process_group()  # what the sdpo command does at exit
