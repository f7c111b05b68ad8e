"""The FLOP counter of sdpo.bench.flops against the closed form, and the peak table behind the MFU.

A stack of transformer-like blocks (bias-free linear layers around SDPA): forward FLOPs are exactly
2 x weights x tokens for the linear layers plus 4 x tokens^2 x width per attention layer (QK^T and AV,
2 x T^2 x width each); backward is exactly twice the forward when every weight trains (dX and dW of
each linear layer; dQ, dK, dV and the score gradient of attention), and gradient checkpointing adds one
forward of the checkpointed blocks (hardware FLOPs against model FLOPs).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from sdpo.bench.flops import attention_kernels, count_flops, flop_counter, mfu, peak_tflops, tflops

WIDTH, HEADS, TOKENS, BATCH, LAYERS = 16, 2, 12, 3, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.out = nn.Linear(WIDTH, WIDTH, bias=False)
        self.up = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
        self.down = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, WIDTH // HEADS)).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.down(F.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def closed_form_forward(model: nn.Module) -> int:
    weights = sum(p.numel() for p in model.parameters())
    return 2 * weights * BATCH * TOKENS + LAYERS * BATCH * 4 * TOKENS**2 * WIDTH


def _inputs(device: str = "cpu") -> torch.Tensor:
    return torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()


def _forward_and_backward(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    forward = count_flops(lambda: model(x))
    both = count_flops(lambda: model(x).sum().backward())
    return forward, both - forward


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
def test_forward_and_backward_match_the_closed_form_whichever_kernel_runs(backend):
    torch.manual_seed(0)
    model = Stack()
    with sdpa_kernel(backend):
        forward, backward = _forward_and_backward(model, _inputs())
        counter = flop_counter()
        with counter:
            model(_inputs())
    assert forward == closed_form_forward(model)
    assert backward == 2 * forward
    assert attention_kernels(counter) == (["flash (CPU)"] if backend == SDPBackend.FLASH_ATTENTION else ["math"])


def test_the_meta_device_counts_what_the_cpu_computes():
    torch.manual_seed(0)
    cpu = Stack()
    with torch.device("meta"):
        meta = Stack()
    assert _forward_and_backward(meta, _inputs("meta")) == _forward_and_backward(cpu, _inputs())


def test_frozen_weights_halve_the_linear_backward():
    """A LoRA step's base layers: their backward computes only the input gradient (1x forward), while
    attention keeps its 2x."""
    torch.manual_seed(0)
    model = Stack().requires_grad_(False)
    forward, backward = _forward_and_backward(model, _inputs())
    attention = LAYERS * BATCH * 4 * TOKENS**2 * WIDTH
    assert backward == (forward - attention) + 2 * attention


def test_checkpointing_recompute_is_one_more_forward():
    """Hardware FLOPs = model FLOPs + one forward of the checkpointed blocks; torch's default early stop
    ends each block's recomputation at the last activation backward needs, so the block's final
    projection (whose output nothing saves) is not rerun."""
    torch.manual_seed(0)
    plain, checkpointed = Stack(), Stack(checkpointed=True)
    checkpointed.load_state_dict(plain.state_dict())
    model_flops = count_flops(lambda: plain(_inputs()).sum().backward())
    with set_checkpoint_early_stop(False):
        hardware_flops = count_flops(lambda: checkpointed(_inputs()).sum().backward())
    early_stopped = count_flops(lambda: checkpointed(_inputs()).sum().backward())
    assert model_flops == 3 * closed_form_forward(plain)
    assert hardware_flops == model_flops + closed_form_forward(plain)
    last_projections = LAYERS * 2 * (4 * WIDTH * WIDTH) * BATCH * TOKENS
    assert early_stopped == hardware_flops - last_projections


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA A10G", None), ("Tesla T4", None), ("cpu", None),
])
def test_peak_table_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_tflops_and_mfu_formula():
    assert tflops(3e12, 0.5) == pytest.approx(6.0)
    assert mfu(3e12, 0.5, 12.0) == pytest.approx(0.5)
    assert mfu(3e12, 0.5, None) is None
    with pytest.raises(ValueError):
        tflops(1.0, 0.0)
