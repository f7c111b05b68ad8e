"""Train several tiny configs in one launch of processes, one after another, as separate `sdpo train`s would.

Launched by tests/test_engines.py as a user launches the trainer (``accelerate launch --config_file
configs/accelerate/<engine>-cpu.yaml``, or torchrun for the DDP baseline); one launch serves every cell of
an engine, because starting the processes costs far more than a tiny run. ``argv[1]`` is a JSON list of
cells, each ``{"config": YAML, "mode": ..., "set": ["key=value", ...]}``:

- ``train``: ``sdpo train CONFIG --set ...``, through ``sdpo.cli.main`` as typed;
- ``stop``: the same run, sent SIGTERM (what a cluster sends before pre-empting a job) after step 2;
- ``resume``: ``sdpo train CONFIG --resume latest``;
- ``poison``: a ``train`` whose loss on process 1 only is NaN at step 2 (the non-finite guard's case).

Each cell starts from accelerate's state as a fresh launch has it: accelerate keeps one process-wide state
that a run changes (FSDP's wrap policy and checkpointing switch, DeepSpeed's filled-in config), so it is
dropped between cells. The process group is kept: a run ends by destroying it (``end_training``), and a
group started again over the launcher's store hangs now and then in its first barrier, so the driver
makes that destruction wait for the last cell.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import torch


def fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:
        return
    kind = PartialState._shared_state.get("distributed_type")
    AcceleratorState._reset_state(reset_partial_state=False)
    if kind == DistributedType.FSDP:  # as sdpo.train.sharding.start_cpu_process_group left it at the launch
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def keep_the_process_group() -> None:
    from accelerate.state import PartialState

    PartialState.destroy_process_group = lambda self, group=None: None


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

    keep_the_process_group()
    for cell in json.loads(open(sys.argv[1]).read()):
        fresh_accelerate_state()
        began = time.perf_counter()
        run(cell)
        print(f"cell {cell.get('mode', 'train')} {cell['set'][0]}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    torch.distributed.destroy_process_group()
