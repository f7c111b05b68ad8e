"""Tiny random stand-ins of the learned rewards' real architectures, saved to folders the way their
releases are laid out: PickScore's CLIP (model + processor files) and VideoAlign's VideoReward (a
Qwen2-VL base folder, and the release folder of ``model_config.json`` + ``checkpoint-<step>/``).

Shared by tests/test_reward_plugins.py and tests/test_readme_loop.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "on", "the", "mat", "sky", "tree"]
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                 "<|image_pad|>"]
VR_SPECIALS = [*QWEN_SPECIALS, *REWARD_TOKENS, "<|endoftext|>"]


def save_tokenizer(folder: str | Path) -> int:
    """A CLIP-like word-level tokenizer (<|startoftext|>, <|endoftext|> last in the vocabulary); its size."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(t, vocab[t]) for t in ("<|startoftext|>", "<|endoftext|>")],
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="[UNK]",
    ).save_pretrained(str(folder))
    return len(vocab)


def save_image_processor(folder: str | Path, size: int = 32) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))


def build_tiny_clip(folder: str | Path) -> Path:
    """A random CLIPModel with tiny towers plus its processor files, in one folder (PickScore's layout)."""
    import transformers

    folder = Path(folder)
    vocab = save_tokenizer(folder)
    save_image_processor(folder)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(50.0),
    )
    transformers.CLIPModel(config).save_pretrained(str(folder))
    return folder


def build_tiny_qwen2vl(folder: str | Path, reward_tokens: bool = True) -> Path:
    """A random Qwen2-VL (1 text layer, 1 vision block) and its tokenizer. With ``reward_tokens`` a merged
    VideoReward folder (the tokens in the tokenizer, ``rm_head.safetensors`` beside it); without, a plain
    base model as ``Qwen/Qwen2-VL-2B-Instruct`` is, for VideoAlign's release to be applied to."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS + ["video", "quality", "motion", "text"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = VR_SPECIALS if reward_tokens else [*QWEN_SPECIALS, "<|endoftext|>"]
    tok.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="[UNK]",
                                                padding_side="right")
    fast.save_pretrained(str(folder))
    ids = {t: fast.convert_tokens_to_ids(t) for t in specials}
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(str(folder))
    if reward_tokens:
        save_file({"rm_head.weight": torch.randn(1, 32)}, str(folder / "rm_head.safetensors"))
    return folder


def build_videoalign_release(folder: str | Path, base: str | Path, step: int = 5) -> Path:
    """VideoAlign's release layout (``huggingface-cli download KwaiVGI/VideoReward``) for the tiny ``base``
    (built with ``reward_tokens=False``): ``model_config.json`` with the inference means / stds and
    ``checkpoint-<step>/`` holding a LoRA on one projection plus the head and the embeddings grown by
    the three reward tokens, with VideoAlign's (transformers 4.4x, PEFT-wrapped) key names."""
    from safetensors.torch import load_file, save_file

    folder, base = Path(folder), Path(base)
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    stats = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 1.0, "TA_mean": -1.0, "TA_std": 3.0}
    (folder / "model_config.json").write_text(json.dumps({"inference_config": stats}))
    g = torch.Generator().manual_seed(step)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(2, 32, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(32, 2, generator=g)},
              str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    weights = load_file(str(base / "model.safetensors"))
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    grown = torch.cat([embed, torch.randn(len(REWARD_TOKENS), embed.shape[1], generator=g) * 0.02])
    torch.save({"base_model.model.rm_head.weight": torch.randn(1, 32, generator=g),
                "base_model.model.model.embed_tokens.weight": grown}, checkpoint / "non_lora_state_dict.pth")
    return folder
