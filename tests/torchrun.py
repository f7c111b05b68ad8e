"""Two CPU processes of a command under torchrun, as the multi-process tests launch them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def two_processes(args: list[str], port: int, timeout: float = 300) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` in accelerate's MULTI_CPU (gloo) mode
    (``accelerate launch --cpu`` needs mpirun for several processes); fails with the end of its stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
