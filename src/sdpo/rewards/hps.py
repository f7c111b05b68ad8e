"""HPSv2.1 (registered as "hpsv2"): an open_clip ViT-H-14 checkpoint run as a transformers ``CLIPModel``.

open_clip imports torchvision, which does not import beside the CPU torch here, so the checkpoint's
state dict is renamed into transformers' CLIP layout (``openclip_to_transformers``) and the config is
read off the tensor shapes. The score is HPSv2's own: the cosine of the L2-normalised image and text
embeddings (``hpsv2.score`` / its ``score.py`` print it raw, about 0.2-0.35; the HPSv2 benchmark tables
print 100x that, so ``scale=100`` gives the table convention). The text tokenizer and image
preprocessing are ViT-H-14's (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor folder).

open_clip -> transformers names (N = block index; ``attn.in_proj_*`` is q, k, v stacked on dim 0):

================================================  ==========================================================
``visual.conv1.weight``                           ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                        ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                   ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre``                                 ``vision_model.pre_layrnorm``
``visual.transformer.resblocks.N.ln_1`` / ``ln_2``  ``vision_model.encoder.layers.N.layer_norm1`` / ``2``
``...attn.in_proj_weight`` / ``_bias``            ``...self_attn.{q,k,v}_proj.weight`` / ``.bias``
``...attn.out_proj``                              ``...self_attn.out_proj``
``...mlp.c_fc`` / ``mlp.c_proj``                  ``...mlp.fc1`` / ``mlp.fc2``
``visual.ln_post``                                ``vision_model.post_layernorm``
``visual.proj`` (width, dim), ``x @ proj``        ``visual_projection.weight`` (transposed)
``token_embedding`` / ``positional_embedding``    ``text_model.embeddings.token_embedding`` / ``position_embedding``
``transformer.resblocks.N...``                    ``text_model.encoder.layers.N...`` (as above)
``ln_final``                                      ``text_model.final_layer_norm``
``text_projection`` (width, dim)                  ``text_projection.weight`` (transposed)
``logit_scale``                                   ``logit_scale``
================================================  ==========================================================
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from sdpo.errors import InputError, MissingFileError
from sdpo.rewards.clip import PICKSCORE_PROCESSOR, ClipReward
from sdpo.rewards.loading import ClipPreprocess, load_tokenizer, locate, parse_dtype

HPS_HUB = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"
HEAD_WIDTH = 64
"""open_clip's head width for ViT-H-14 (both towers): heads = width / 64."""

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "ln_final": "text_model.final_layer_norm"}


def _map_block(tower: str, index: str, rest: str, value: Tensor) -> dict[str, Tensor]:
    prefix = f"{tower}.encoder.layers.{index}."
    if rest.startswith("attn.in_proj_"):
        kind = rest.removeprefix("attn.in_proj_")  # "weight" or "bias"
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{name}_proj.{kind}": part.clone() for name, part in zip("qkv", (q, k, v), strict=True)}
    for source, target in _BLOCK_PARTS.items():
        if rest.startswith(source + "."):
            return {prefix + target + rest[len(source):]: value}
    raise InputError(f"unexpected open_clip key in a transformer block: {rest!r} (layer scale is not supported)")


def map_openclip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP parameter names -> transformers ``CLIPModel`` names (see the module table)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block:
            tower = "vision_model" if block.group(1) else "text_model"
            out.update(_map_block(tower, block.group(2), block.group(3), value))
        elif key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key.rsplit(".", 1)[0] in _NORMS:
            norm, kind = key.rsplit(".", 1)
            out[f"{_NORMS[norm]}.{kind}"] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key != "attn_mask":  # open_clip's causal-mask buffer; transformers builds its own
            raise InputError(f"unexpected open_clip key {key!r} (not a plain ViT CLIP checkpoint?)")
    return out


def _layers(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(2)) for key in state if (m := _BLOCK.match(key)) and key.startswith(prefix)}
    return max(found) + 1


def openclip_config(state: dict[str, Tensor], hidden_act: str = "gelu"):  # noqa: ANN201 - a CLIPConfig
    """The transformers ``CLIPConfig`` of an open_clip ViT state dict, read off its tensor shapes.

    ``hidden_act``: ViT-H-14 (HPSv2) uses exact GELU; OpenAI checkpoints use "quick_gelu".
    """
    from transformers import CLIPConfig

    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text_width = state["token_embedding.weight"].shape[1]
    vocab = state["token_embedding.weight"].shape[0]
    vision = dict(hidden_size=vision_width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layers(state, "visual."), num_attention_heads=vision_width // HEAD_WIDTH,
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, layer_norm_eps=1e-5)
    text = dict(hidden_size=text_width, intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layers(state, "transformer."), num_attention_heads=text_width // HEAD_WIDTH,
                vocab_size=vocab, max_position_embeddings=state["positional_embedding"].shape[0],
                hidden_act=hidden_act, layer_norm_eps=1e-5,
                # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|>; the text is pooled at the first eot.
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])


def clip_from_openclip(state: dict[str, Tensor], hidden_act: str = "gelu"):  # noqa: ANN201 - a CLIPModel
    """A transformers ``CLIPModel`` holding an open_clip state dict (strict: every weight must map)."""
    from transformers import CLIPModel

    model = CLIPModel(openclip_config(state, hidden_act))
    missing, unexpected = model.load_state_dict(map_openclip_state_dict(state), strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"open_clip checkpoint does not fill the CLIP model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model


def read_openclip_checkpoint(path: Path) -> dict[str, Tensor]:
    """The state dict of an open_clip checkpoint file (HPS keeps it under "state_dict", DDP-prefixed or not)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {key.removeprefix("module."): value for key, value in state.items()}


def hpsv2(checkpoint: str | os.PathLike[str] = HPS_HUB, processor: str | os.PathLike[str] = PICKSCORE_PROCESSOR,
          device: str = "cpu", dtype: str | torch.dtype = "fp32", batch_size: int = 16,
          scale: float = 1.0) -> ClipReward:
    """HPSv2.1: ``scale * cosine`` (default 1, HPSv2's own score). ``checkpoint``: the .pt file, or a folder
    (or cached hub id) holding ``HPS_v2.1_compressed.pt``; ``processor``: ViT-H-14's tokenizer + preprocessing."""
    path = locate(checkpoint, reward="hpsv2", what="checkpoint", hub_id=HPS_HUB)
    if path.is_dir():
        path = path / HPS_FILE
        if not path.is_file():
            raise MissingFileError(f"hpsv2: no {HPS_FILE} in {path.parent}; pass the checkpoint file itself")
    processor_dir = locate(processor, reward="hpsv2", what="processor", hub_id=PICKSCORE_PROCESSOR)
    model = clip_from_openclip(read_openclip_checkpoint(path))
    return ClipReward("hpsv2", model, load_tokenizer(processor_dir, "hpsv2"), ClipPreprocess.from_folder(processor_dir),
                      kind="cosine", scale=scale, device=device, dtype=parse_dtype(dtype), batch_size=batch_size)
