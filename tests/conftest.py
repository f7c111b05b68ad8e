"""Test-wide settings: nothing may reach a model hub, and torch stays on one thread."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread beats two, and far more so on a busy machine
