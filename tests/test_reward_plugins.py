"""Reward plug-ins on tiny random stand-ins of their real architectures, built offline and saved to folders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from stand_ins import WORDS, build_tiny_clip, build_tiny_qwen2vl, save_image_processor, save_tokenizer

from sdpo.rewards import as_reward, known_rewards, load_reward
from sdpo.rewards.combine import CombinedReward, combine_scores, zscore_by_group
from sdpo.rewards.hps import clip_from_openclip, map_openclip_state_dict
from sdpo.rewards.loading import ClipPreprocess, RewardWeightsNotFoundError, pooled
from sdpo.rewards.video import FramesReward, frame_indices

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "a red dog on the mat", "blue sky", "the tree"]


# ----------------------------------------------------------------------------------------- stand-ins
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel with tiny towers plus its processor files, in one folder."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def quantised_images(count: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] that are exactly u8/255 values, so the PIL processor sees the same pixels."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (count, 3, height, width), generator=g)
    return u8.float() / 255 * 2 - 1


def reference_clip_cosine(folder, media: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, object]:
    """Cosine via the transformers processor (PIL path) and CLIPModel's own feature functions."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    arrays = [((m + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for m in media]
    pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        image = pooled(model.get_image_features(pixel_values=pixels))
        text = pooled(model.get_text_features(**tokens))
    return F.cosine_similarity(image, text, dim=-1), model


# ----------------------------------------------------------------------------------- registry, errors
def test_plugins_are_registered():
    for name in ("pickscore", "clip-score", "hpsv2", "aesthetic", "frames", "videoreward", "combine"):
        assert name in known_rewards()


@pytest.mark.parametrize("name, hint", [
    ("pickscore", "huggingface-cli download yuvalkirstain/PickScore_v1"),
    ("clip-score", "huggingface-cli download openai/clip-vit-large-patch14"),
    ("hpsv2", "huggingface-cli download xswu/HPSv2"),
    ("aesthetic", "improved-aesthetic-predictor"),
])
def test_missing_weights_fail_at_once_with_one_line(name, hint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # An empty cache, so the test holds on a machine that has the real weights cached.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RewardWeightsNotFoundError) as error:
        load_reward(name)
    message = str(error.value)
    assert "\n" not in message and hint in message and 'pip install -e ".[rewards]"' in message
    assert isinstance(error.value, FileNotFoundError)


def test_missing_local_folder_names_it(tmp_path):
    with pytest.raises(RewardWeightsNotFoundError, match="pickscore: model"):
        load_reward("pickscore", model=str(tmp_path / "nope"), processor=str(tmp_path))


# ---------------------------------------------------------------------------------- CLIP rewards
def test_pickscore_matches_clipmodel_on_processor_output(tiny_clip):
    media = quantised_images(4)
    reward = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip), batch_size=3)
    cosine, model = reference_clip_cosine(tiny_clip, media, PROMPTS)
    expected = model.logit_scale.exp() * cosine
    got = reward.score(media, PROMPTS)
    assert reward.media == "image" and got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert abs(float(model.logit_scale.detach().exp()) - 50.0) < 1e-3  # the logit scale is really applied


def test_clip_score_is_100_times_clamped_cosine(tiny_clip):
    media = quantised_images(4, seed=1)
    reward = load_reward("clip-score", model=str(tiny_clip))
    cosine, _ = reference_clip_cosine(tiny_clip, media, PROMPTS)
    torch.testing.assert_close(reward.score(media, PROMPTS), 100 * cosine.clamp(min=0), atol=1e-3, rtol=1e-5)


def test_bf16_scores_close_to_fp32(tiny_clip):
    media = quantised_images(2, seed=2)
    full = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip)).score(media, PROMPTS[:2])
    half = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip), dtype="bf16")
    assert half.model.dtype == torch.bfloat16
    torch.testing.assert_close(half.score(media, PROMPTS[:2]), full, atol=1.5, rtol=0.05)


def test_preprocess_resizes_like_the_processor(tiny_clip):
    """Non-square, larger input: shortest side to 32 bicubic, center crop; close to the PIL processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 80), indexing="ij")
    smooth = torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(4 * yy), xx * yy * 2 - 1])[None] * 0.9
    smooth = ((smooth + 1) / 2 * 255).round() / 255 * 2 - 1
    ours = ClipPreprocess.from_folder(tiny_clip)(smooth)
    array = ((smooth[0] + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    theirs = CLIPImageProcessorPil.from_pretrained(str(tiny_clip))(images=[array], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.03


def test_image_reward_refuses_videos(tiny_clip):
    reward = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip))
    with pytest.raises(ValueError, match="RGB images"):
        reward.score(torch.zeros(1, 2, 3, 32, 32), ["a cat"])


# ------------------------------------------------------------------------------------------- HPSv2
WIDTH, LAYERS, PATCH, GRID, CONTEXT, EMBED, HEADS = 128, 2, 8, 4, 12, 16, 2


def tiny_openclip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip ViT state dict (open_clip names and shapes) for a tiny config."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix):
        return {f"{prefix}.weight": 1 + rand(WIDTH), f"{prefix}.bias": rand(WIDTH)}

    def blocks(prefix):
        state = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}"
            state |= ln(f"{p}.ln_1") | ln(f"{p}.ln_2")
            state |= {f"{p}.attn.in_proj_weight": rand(3 * WIDTH, WIDTH, scale=0.1),
                      f"{p}.attn.in_proj_bias": rand(3 * WIDTH),
                      f"{p}.attn.out_proj.weight": rand(WIDTH, WIDTH, scale=0.1), f"{p}.attn.out_proj.bias": rand(WIDTH),
                      f"{p}.mlp.c_fc.weight": rand(4 * WIDTH, WIDTH, scale=0.1), f"{p}.mlp.c_fc.bias": rand(4 * WIDTH),
                      f"{p}.mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH, scale=0.1), f"{p}.mlp.c_proj.bias": rand(WIDTH)}
        return state

    state = {"visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.1), "visual.class_embedding": rand(WIDTH),
             "visual.positional_embedding": rand(GRID * GRID + 1, WIDTH), "visual.proj": rand(WIDTH, EMBED, scale=0.1),
             "token_embedding.weight": rand(vocab, WIDTH, scale=0.5), "positional_embedding": rand(CONTEXT, WIDTH),
             "text_projection": rand(WIDTH, EMBED, scale=0.1), "logit_scale": torch.tensor(math.log(100.0)),
             "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)}
    return state | ln("visual.ln_pre") | ln("visual.ln_post") | ln("ln_final") | blocks("visual.") | blocks("")


def _reference_tower(x: torch.Tensor, state, prefix: str, causal: bool, act) -> torch.Tensor:
    """open_clip's residual attention blocks written out: pre-norm attention and MLP, plain torch."""
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else torch.zeros(n, n)
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}"
        h = F.layer_norm(x, (WIDTH,), state[f"{p}.ln_1.weight"], state[f"{p}.ln_1.bias"])
        q, k, v = (h @ state[f"{p}.attn.in_proj_weight"].T + state[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.view(len(x), n, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS) + mask, dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(len(x), n, WIDTH)
        x = x + attn @ state[f"{p}.attn.out_proj.weight"].T + state[f"{p}.attn.out_proj.bias"]
        h = F.layer_norm(x, (WIDTH,), state[f"{p}.ln_2.weight"], state[f"{p}.ln_2.bias"])
        h = act(h @ state[f"{p}.mlp.c_fc.weight"].T + state[f"{p}.mlp.c_fc.bias"])
        x = x + h @ state[f"{p}.mlp.c_proj.weight"].T + state[f"{p}.mlp.c_proj.bias"]
    return x


def reference_openclip(state, pixels, ids, act=F.gelu) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's encode_image / encode_text (unnormalised) from the formulas."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, WIDTH), x], dim=1)
    x = F.layer_norm(x + state["visual.positional_embedding"], (WIDTH,), state["visual.ln_pre.weight"],
                     state["visual.ln_pre.bias"])
    x = _reference_tower(x, state, "visual.", causal=False, act=act)
    image = F.layer_norm(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    t = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    t = _reference_tower(t, state, "", causal=True, act=act)
    t = F.layer_norm(t, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    text = t[torch.arange(len(ids)), ids.argmax(dim=-1)]  # the eot token has the largest id
    return image @ state["visual.proj"], text @ state["text_projection"]


def test_openclip_mapping_matches_the_open_clip_formulas():
    vocab = len(WORDS) + 3
    state = tiny_openclip_state(vocab)
    model = clip_from_openclip(state).eval()
    assert model.config.vision_config.hidden_act == "gelu"
    pixels = torch.randn(3, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    eot, sot = vocab - 1, vocab - 2
    ids = torch.tensor([[sot, 1, 2, eot] + [eot] * 8, [sot, 3, 4, 5, 6, eot] + [eot] * 6,
                        [sot] + [7] * 10 + [eot]])
    with torch.no_grad():
        image = pooled(model.get_image_features(pixel_values=pixels))
        text = pooled(model.get_text_features(input_ids=ids))
    ref_image, ref_text = reference_openclip(state, pixels, ids)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=1e-5)
    # The check can fail: quick_gelu (OpenAI CLIP's activation) gives different embeddings.
    quick_image, _ = reference_openclip(state, pixels, ids, act=lambda h: h * torch.sigmoid(1.702 * h))
    assert (quick_image - image).abs().max() > 1e-4
    assert float(model.logit_scale) == pytest.approx(math.log(100.0))


def test_openclip_mapping_refuses_unknown_keys():
    state = tiny_openclip_state(len(WORDS) + 3)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(ValueError, match="ls_1"):
        map_openclip_state_dict(state)


def test_hpsv2_scores_cosine_of_the_checkpoint(tmp_path):
    processor = tmp_path / "processor"
    vocab = save_tokenizer(processor)
    save_image_processor(processor, size=GRID * PATCH)
    state = tiny_openclip_state(vocab, seed=3)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    media = quantised_images(3, seed=4)
    reward = load_reward("hpsv2", checkpoint=str(tmp_path), processor=str(processor), batch_size=2)
    got = reward.score(media, PROMPTS[:3])
    pixels = ClipPreprocess.from_folder(processor)(media)
    tokens = reward.tokenizer(PROMPTS[:3], padding="max_length", max_length=CONTEXT, return_tensors="pt")
    image, text = reference_openclip(state, pixels, tokens["input_ids"])
    torch.testing.assert_close(got, F.cosine_similarity(image, text, dim=-1), atol=1e-5, rtol=1e-5)
    scaled = load_reward("hpsv2", checkpoint=str(checkpoint), processor=str(processor), scale=100.0)
    torch.testing.assert_close(scaled.score(media, PROMPTS[:3]), 100 * got, atol=1e-3, rtol=1e-5)


# --------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_is_the_mlp_on_the_normalised_embedding(tiny_clip, tmp_path):
    g = torch.Generator().manual_seed(5)
    sizes = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    head = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, head)
    media = quantised_images(3, seed=6)
    reward = load_reward("aesthetic", head=str(head), model=str(tiny_clip))
    _, model = reference_clip_cosine(tiny_clip, media, PROMPTS[:3])
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    arrays = [((m + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for m in media]
    pixels = CLIPImageProcessorPil.from_pretrained(str(tiny_clip))(images=arrays, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = pooled(model.get_image_features(pixel_values=pixels))
    x = x / x.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # linear layers only: the published head has no activations
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(reward.score(media, PROMPTS[:3]), x.squeeze(-1), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ frames
def test_frame_indices_are_even_and_include_both_ends():
    assert frame_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert frame_indices(3, 8).tolist() == [0, 1, 2]
    assert frame_indices(9, 1).tolist() == [0]
    with pytest.raises(ValueError):
        frame_indices(0, 2)


def test_frames_wrapper_means_an_image_reward_over_chosen_frames():
    seen = []

    def brightness(media, prompts):
        seen.append(len(media))
        return media.mean(dim=(1, 2, 3))

    inner = as_reward(brightness, name="brightness")
    clips = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1, 1, 1).expand(2, 10, 3, 4, 4) / 20
    reward = FramesReward(inner, frames=4)
    expected = clips[:, [0, 3, 6, 9]].mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(reward.score(clips, ["x", "y"]), expected)
    assert reward.media == "video" and reward.name == "frames:brightness" and seen == [8]
    with pytest.raises(ValueError, match="videos"):
        reward.score(torch.zeros(2, 3, 4, 4), ["x", "y"])


def test_frames_of_pickscore_through_the_registry(tiny_clip):
    clips = quantised_images(2 * 5, seed=7).view(2, 5, 3, 32, 32)
    reward = load_reward("frames", reward="pickscore", frames=3, model=str(tiny_clip), processor=str(tiny_clip))
    image = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip))
    per_frame = torch.stack([image.score(clips[:, i], PROMPTS[:2]) for i in (0, 2, 4)], dim=1)
    torch.testing.assert_close(reward.score(clips, PROMPTS[:2]), per_frame.mean(dim=1), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------- combine
def _constant(name: str, values: list[float]):
    table = torch.tensor(values)
    return as_reward(lambda media, prompts: table[media[:, 0, 0, 0].long()], name=name)


def test_zscore_by_group_and_degenerate_groups():
    values = torch.tensor([1.0, 3.0, 10.0, 10.0, 5.0])
    out = zscore_by_group(values, ["a", "a", "b", "b", "c"])
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]))


def test_combine_weights_and_normalises_per_prompt():
    index = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    big, small = _constant("big", [100.0, 300.0, 7.0, 9.0]), _constant("small", [0.1, 0.2, 0.4, 0.3])
    prompts = ["p", "p", "q", "q"]
    raw = CombinedReward([big, small], weights=[1.0, 2.0], normalize="raw").score(index, prompts)
    torch.testing.assert_close(raw, torch.tensor([100.2, 300.4, 7.8, 9.6]))
    z = CombinedReward([big, small], weights=[1.0, 2.0], normalize="zscore")
    torch.testing.assert_close(z.score(index, prompts), torch.tensor([-3.0, 3.0, 1.0, -1.0]))
    # Scoring in batches that split a prompt's candidates, then combining once, gives the same totals.
    parts = [z.score_parts(index[i:i + 1], prompts[i:i + 1]) for i in range(4)]
    joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    torch.testing.assert_close(z.combine(joined, prompts), z.score(index, prompts))
    mixed = combine_scores(joined, {"big": 1.0, "small": 10.0}, prompts, {"big": "zscore", "small": "raw"})
    torch.testing.assert_close(mixed, torch.tensor([0.0, 3.0, 3.0, 4.0]))


def test_combine_through_the_registry_and_bad_input(tiny_clip):
    media = quantised_images(2, seed=8)
    combined = load_reward("combine", rewards=[
        {"name": "pickscore", "model": str(tiny_clip), "processor": str(tiny_clip)},
        {"name": "clip-score", "model": str(tiny_clip)},
    ], weights=[1.0, 0.5])
    single = load_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip)).score(media, PROMPTS[:2])
    clip = load_reward("clip-score", model=str(tiny_clip)).score(media, PROMPTS[:2])
    torch.testing.assert_close(combined.score(media, PROMPTS[:2]), single + 0.5 * clip, atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        CombinedReward([_constant("a", [1.0])], normalize="rank")
    with pytest.raises(ValueError, match="media kind"):
        CombinedReward([_constant("a", [1.0]), as_reward(lambda m, p: m, name="v", media="video")])
    with pytest.raises(ValueError, match="weights"):
        CombinedReward([_constant("a", [1.0])], weights=[1.0, 2.0])


# ------------------------------------------------------------------------------------- videoreward
@pytest.fixture(scope="module")
def tiny_videoreward(tmp_path_factory):
    """A random Qwen2-VL (1 text layer, 1 vision block), a tokenizer with the reward tokens, a head."""
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-videoreward"))


def test_videoreward_patches_match_the_qwen2vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdpo.rewards.videoreward import CLIP_MEAN, CLIP_STD, patchify

    frame = quantised_images(1, 56, 84, seed=9)[0]
    array = ((frame + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = Qwen2VLImageProcessorPil(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))(
        images=[array], return_tensors="pt")
    normalised = ((frame + 1) / 2 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    # An image is a clip of one frame: the processor repeats it over the temporal patch, patchify pads.
    flat, grid = patchify(normalised[None], patch=14, merge=2, temporal=2)
    assert grid.tolist() == expected["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(flat, expected["pixel_values"], atol=1e-5, rtol=1e-5)


def test_videoreward_reads_the_head_at_its_reward_tokens(tiny_videoreward):
    from sdpo.rewards.videoreward import REWARD_TOKENS

    clips = quantised_images(2 * 5, 56, 56, seed=10).view(2, 5, 3, 56, 56)
    prompts = ["a cat on the mat", "a red dog"]
    reward = load_reward("videoreward", model=str(tiny_videoreward), frames=4, dtype="fp32", batch_size=2)
    dims = reward.score_dimensions(clips, prompts)
    # Independently: the model's own forward, its last hidden states at the three tokens, the head.
    batch = reward.inputs(clips, prompts)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    assert (batch["input_ids"] == reward.model.config.video_token_id).sum(dim=1).tolist() == [8, 8]
    with torch.no_grad():
        out = reward.model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    weight = reward.head.weight[0]
    for row in range(2):
        positions = [int((batch["input_ids"][row] == reward.tokenizer.convert_tokens_to_ids(t)).nonzero()) for t in
                     REWARD_TOKENS]
        expected = hidden[row, positions] @ weight
        got = torch.stack([dims["VQ"][row], dims["MQ"][row], dims["TA"][row]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dims["Overall"], dims["VQ"] + dims["MQ"] + dims["TA"])
    torch.testing.assert_close(reward.score(clips, prompts), dims["Overall"])
    # Batching (right padding) does not change a clip's scores.
    one = load_reward("videoreward", model=str(tiny_videoreward), frames=4, dtype="fp32", batch_size=1)
    torch.testing.assert_close(one.score(clips, prompts), dims["Overall"], atol=1e-4, rtol=1e-4)


def test_videoreward_standardises_with_the_checkpoint_statistics(tiny_videoreward, tmp_path):
    import json
    import shutil

    folder = tmp_path / "with-norm"
    shutil.copytree(tiny_videoreward, folder)
    stats = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
    (folder / "model_config.json").write_text(json.dumps({"inference_config": stats}))
    clips = quantised_images(5, 56, 56, seed=11).view(1, 5, 3, 56, 56)
    raw = load_reward("videoreward", model=str(folder), frames=2, dtype="fp32", normalize=False)
    normed = load_reward("videoreward", model=str(folder), frames=2, dtype="fp32")
    r, n = raw.score_dimensions(clips, ["a cat"]), normed.score_dimensions(clips, ["a cat"])
    for key in ("VQ", "MQ", "TA"):
        torch.testing.assert_close(n[key], (r[key] - stats[f"{key}_mean"]) / stats[f"{key}_std"], atol=1e-4, rtol=1e-4)


def test_videoreward_missing_head_and_bad_media(tiny_videoreward, tmp_path):
    with pytest.raises(RewardWeightsNotFoundError, match="head"):
        load_reward("videoreward", model=str(tiny_videoreward), head=str(tmp_path / "none.safetensors"))
    reward = load_reward("videoreward", model=str(tiny_videoreward), frames=2, dtype="fp32")
    with pytest.raises(ValueError, match="videos"):
        reward.score(torch.zeros(1, 3, 56, 56), ["a cat"])


def test_videoreward_loads_videoalign_release_layout(tiny_videoreward, tmp_path):
    """model_config.json + checkpoint-<step>/ (LoRA + non-LoRA weights, 4.4x key names) over a base model."""
    import json

    from safetensors.torch import save_file

    release = tmp_path / "VideoReward"
    stats = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 1.0, "TA_mean": -1.0, "TA_std": 3.0}
    (release / "checkpoint-7").mkdir(parents=True)
    (release / "checkpoint-12").mkdir()
    (release / "model_config.json").write_text(json.dumps({"inference_config": stats}))
    g = torch.Generator().manual_seed(12)
    down, up, head = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), torch.randn(1, 32, generator=g)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up},
              str(release / "checkpoint-12" / "adapter_model.safetensors"))
    (release / "checkpoint-12" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_videoreward))
    embed = torch.randn_like(base.model.language_model.embed_tokens.weight)
    torch.save({"base_model.model.rm_head.weight": head, "base_model.model.model.embed_tokens.weight": embed},
               release / "checkpoint-12" / "non_lora_state_dict.pth")
    reward = load_reward("videoreward", model=str(release), base=str(tiny_videoreward), frames=2, dtype="fp32")
    merged = reward.model.model.language_model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged, base.model.language_model.layers[0].self_attn.q_proj.weight + 2 * up @ down)
    torch.testing.assert_close(reward.model.model.language_model.embed_tokens.weight, embed)
    torch.testing.assert_close(reward.head.weight, head)
    assert reward.norm == {k: (stats[f"{k}_mean"], stats[f"{k}_std"]) for k in ("VQ", "MQ", "TA")}
    clips = quantised_images(4, 56, 56, seed=13).view(1, 4, 3, 56, 56)
    assert torch.isfinite(reward.score(clips, ["a cat"])).all()
