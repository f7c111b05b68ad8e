"""Checkpoint sizes: what a resumable checkpoint costs on disk, before and after trainable-only checkpoints.

Two parts:

1. Measured: a tiny SD pipeline (``sdpo.models.tiny``) with LoRA, saved by ``accelerator.save_state``
   as the trainer did before (every denoiser weight) and as it does now (``register_trainable_hooks``:
   the trainable weights only), after one AdamW step so the optimizer state exists.
2. Counted: the full-size denoisers (benchmarks/architectures.py's configs, built on the meta device: no
   memory) at LoRA rank 64 and for full fine-tuning. Bytes = weights + AdamW state:
   - trainable weights are float32 (the trainer keeps them so), 4 bytes each; AdamW keeps two float32
     moments per trainable weight, 8 bytes;
   - the frozen base (what the old LoRA checkpoint also stored) in bf16, 2 bytes each: the trainer
     casts it to the mixed-precision dtype, and bf16 is the paper's setting.
   Full fine-tuning stores every weight either way (all of them train).

    python -m benchmarks.checkpoint_size            # both parts, a markdown table
    python -m benchmarks.checkpoint_size --rank 16  # another LoRA rank
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import architectures

GB = 1e9


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measured_tiny_sd(rank: int = 4) -> dict[str, Any]:
    """On-disk bytes of a tiny SD LoRA checkpoint with all weights (before) and trainable only (after)."""
    from accelerate import Accelerator
    from peft import LoraConfig

    from sdpo.models import tiny
    from sdpo.models.registry import load_spec
    from sdpo.train.checkpoint import register_trainable_hooks

    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        folder = tiny.build_tiny_sd(Path(root) / "model")
        for label, hooks in (("before", False), ("after", True)):
            spec = load_spec("sd", folder, load_vae=False, load_text_encoder=False)
            model = spec.denoiser.requires_grad_(False)
            model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=spec.lora_target_modules()))
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            accelerator = Accelerator(cpu=True)
            model, optimizer = accelerator.prepare(model, optimizer)
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # the AdamW moments exist from the first step on
            if hooks:
                register_trainable_hooks(accelerator, model)
            out = Path(root) / label
            accelerator.save_state(str(out))
            sizes[label] = folder_bytes(out)
            sizes["base_params"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            sizes["lora_params"] = sum(p.numel() for p in params)
    return sizes


def counted(rank: int) -> list[dict[str, Any]]:
    """Parameter counts of the real architectures on the meta device and the bytes they imply."""

    rows = []
    for arch in architectures.ARCHS.values():
        model = architectures.build_denoiser(arch, False, "meta", torch.bfloat16)
        total = architectures.count_parameters(model)
        spec = architectures.make_spec(arch, model)
        with torch.device("meta"):
            lora = architectures.add_lora(spec, model, rank)
        rows.append({
            "model": arch.name, "params": total, "lora_params": lora,
            "lora_before": 2 * total + 4 * lora + 8 * lora,  # frozen base (bf16) + adapters + AdamW
            "lora_after": 4 * lora + 8 * lora,
            "full": 4 * total + 8 * total,
        })
        del model
    return rows


def markdown(tiny_sizes: dict[str, Any], rows: list[dict[str, Any]], rank: int) -> str:
    lines = [
        f"Tiny SD, LoRA rank 4 ({tiny_sizes['lora_params']:,} LoRA weights beside {tiny_sizes['base_params']:,} "
        f"frozen ones), measured on disk: {tiny_sizes['before'] / 1e3:,.0f} kB before, "
        f"{tiny_sizes['after'] / 1e3:,.0f} kB after.",
        "",
        f"| model | parameters | LoRA r={rank} | LoRA checkpoint before | after | full fine-tuning checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['params'] / 1e9:.2f}B | {row['lora_params'] / 1e6:.1f}M | "
                     f"{row['lora_before'] / GB:.2f} GB | {row['lora_after'] / GB:.2f} GB | {row['full'] / GB:.1f} GB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the counted rows (the paper's: 64)")
    parser.add_argument("--no-measure", action="store_true", help="skip the tiny on-disk measurement")
    args = parser.parse_args(argv)
    tiny_sizes = measured_tiny_sd() if not args.no_measure else {"before": 0, "after": 0, "lora_params": 0,
                                                                 "base_params": 0}
    table = markdown(tiny_sizes, counted(args.rank), args.rank)
    print(table)
    return table


if __name__ == "__main__":
    main()
