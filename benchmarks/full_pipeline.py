"""A CogVideoX-2B pipeline folder with random weights at full size, for timing `sdpo generate` against
the diffusers pipeline called directly (``benchmarks.generate_speed``) where nothing can be downloaded.

The transformer has the published config (``benchmarks.architectures``) and the VAE diffusers'
``AutoencoderKLCogVideoX`` defaults (CogVideoX's VAE); both cost what the published ones cost. The text
encoder is a one-layer T5 of the published width (4096) over a character tokenizer: it runs once per
prompt, identically on both paths, so it does not move the ratio, and a 4.7B-parameter T5-XXL of random
weights would only add build time.

    python -m benchmarks.full_pipeline OUT_DIR [--device cuda] [--tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.architectures import ARCHS, build_denoiser


def build_cogvideox_2b(folder: Path, device: str, tiny: bool) -> Path:
    """Save the pipeline to ``folder`` (bf16 on a GPU, float32 on a CPU) and return it."""
    if tiny:
        from sdpo.models.tiny import build_tiny_cogvideox

        return build_tiny_cogvideox(folder)
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel

    from sdpo.models.tiny import tiny_t5_tokenizer

    arch = ARCHS["cogvideox-2b"]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokens, width = arch.text
    tokenizer = tiny_t5_tokenizer(tokens)
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=256,
                                               num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                                               pad_token_id=0, eos_token_id=1)).to(dtype)
        vae = AutoencoderKLCogVideoX().to(dtype)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=build_denoiser(arch, False, device, dtype), scheduler=arch.scheduler())
    pipe.save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the pipeline to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny CogVideoX instead (CPU checks)")
    args = parser.parse_args(argv)
    print(build_cogvideox_2b(Path(args.out), args.device, args.tiny), flush=True)


if __name__ == "__main__":
    main()
