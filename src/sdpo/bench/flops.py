"""FLOPs of a training step counted as it runs, and the fraction of the hardware's peak they reach (MFU).

``count_flops(fn)`` runs ``fn`` under torch's ``FlopCounterMode`` and returns the FLOPs of the matrix
products, convolutions and attention it dispatched: the forward passes and, when ``fn`` calls
``backward``, the gradients, counted as they run. Elementwise work (norms, activations, the optimizer)
is not counted, as is usual for MFU. On the meta device nothing is computed (shapes only), so a
step of a 5B-parameter model at full size is counted in seconds on a CPU.

Model FLOPs against hardware FLOPs: the count of a step with gradient checkpointing includes the
recomputed forward of every checkpointed block (hardware FLOPs: what the chip does); the same step
without it gives the model FLOPs (what the model needs), the numerator of MFU. One more convention:
torch counts the backward of its fused attention kernels (flash, memory-efficient, cuDNN) as five
products, recomputing the scores; here attention backward is counted as four (dQ, dK, dV and the
score gradient: twice the forward, as the math path counts it on the meta device), so the model
count does not depend on which kernel ran. The kernels' own recomputation is left out of both counts.

``peak_tflops(name)`` is the dense (no 2:4 sparsity) bf16 tensor-core peak of a GPU by its device name,
from the vendor's datasheet; an unknown name gives None (then TFLOP/s are reported without an MFU).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from sdpo.data.batch import PairBatch
    from sdpo.models.base import ModelSpec
    from sdpo.objectives import MethodConfig

__all__ = ["PEAK_DENSE_BF16_TFLOPS", "attention_kernels", "count_flops", "device_peak_tflops", "flop_counter",
           "mfu", "peak_tflops", "preference_step_flops", "tflops"]

PEAK_DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H200.*NVL", 835.0),
    (r"GH200", 989.0),
    (r"H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200", 989.0),  # SXM
    (r"B200", 2250.0),
    (r"A100", 312.0),  # SXM and PCIe alike
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not the A10G (AWS), whose tensor peak NVIDIA does not publish
    (r"RTX 4090", 165.0),  # with float32 accumulation, what torch's bf16 matmuls use
)
"""(regular expression searched in the device name, dense bf16 tensor-core TFLOP/s), first match wins:
the specific variants (PCIe, NVL) come before the family name. Datasheet figures without sparsity
(NVIDIA lists twice these "with sparsity")."""


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak TFLOP/s of the GPU called ``device_name`` (None: not in the table)."""
    for pattern, peak in PEAK_DENSE_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` (None on a CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def _attention_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    """Twice the forward: the four products of the gradients, not the fused kernels' score recomputation."""
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _attention_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _attention_mapping() -> dict[Any, Callable[..., int]]:
    """Formulas for every SDPA kernel this torch has, the CPU's flash kernel included (torch counts
    nothing for it)."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _attention_forward
        if hasattr(aten, f"{name}_backward"):
            mapping[getattr(aten, f"{name}_backward")] = _attention_backward
    return mapping


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` with this module's attention convention (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=_attention_mapping())


def count_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs ``fn()`` dispatches (forward, and backward if it calls it)."""
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


_KERNELS = (("cudnn", "cudnn"), ("efficient", "efficient"), ("for_cpu", "flash (CPU)"), ("flash", "flash"))
"""(part of the aten op's name, the kernel it names), tested in order ("for_cpu" before "flash")."""


def attention_kernels(counter: FlopCounterMode) -> list[str]:
    """Which SDPA kernels a counted run dispatched (flash, efficient, cudnn, flash (CPU)); "math" when
    attention FLOPs came only as batched products (SDPA's math path, or attention written by hand)."""
    names = [str(op) for op in counter.get_flop_counts().get("Global", {})]
    found = set()
    for name in (n for n in names if "scaled_dot_product" in n):
        found.add(next((label for key, label in _KERNELS if key in name), name))
    if not found and any(name.endswith("bmm") for name in names):
        return ["math"]
    return sorted(found)


def preference_step_flops(spec: ModelSpec, model: nn.Module, batch: PairBatch, method: MethodConfig) -> int:
    """FLOPs of one LoRA preference step on ``batch`` as the trainer runs it (``preference_step``): the
    policy forward on both members, the reference forward (adapters off, no grad) and the backward
    through the policy. With the model's gradient checkpointing on, the recomputation is counted too."""
    from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step

    pairs = batch.chosen.shape[0]
    draws = draw_for_pairs(torch.arange(pairs), 0, 0, tuple(batch.chosen.shape[1:]), spec.schedule.num_timesteps,
                           with_weight_noise=method.estimator == "sampled")

    def step() -> None:
        result = preference_step(spec, model, batch, draws, method, lambda: adapters_disabled(model))
        result.output.loss.backward()

    return count_flops(step)


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s of ``flops`` done in ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved TFLOP/s over the peak (None without a peak)."""
    return None if peak is None else tflops(flops, seconds) / peak
