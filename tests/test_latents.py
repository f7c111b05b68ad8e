"""What a step trains on: the posterior std in the cache, a fresh latent drawn from it, and flips.

Precompute stores each latent's posterior mean and std (the VAE families); ``latent_sampling`` draws
``mean + std * eps`` per step and ``flip`` mirrors latents, every draw keyed on (seed, step, pair).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torchrun import two_processes

from sdpo.cli import main
from sdpo.data import CachedPairs, PreferencePair, load_media, precompute, read_pairs, write_pairs_jsonl
from sdpo.data.batch import Pair, PairBatch
from sdpo.data.cache import file_sha256
from sdpo.models import tiny
from sdpo.models.base import MediaFormat
from sdpo.models.registry import load_spec
from sdpo.objectives import MethodConfig
from sdpo.toy import ToySpec
from sdpo.train.augment import augment_batch, flip_coins, samples_latents
from sdpo.train.config import TrainConfig
from sdpo.train.trainer import latest_checkpoint, train

SIZE = MediaFormat(height=16, width=16)


def _sd_pairs(folder: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(count):
        names = {}
        for role in ("chosen", "rejected"):
            names[role] = f"{index}-{role}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / names[role])
        pairs.append(PreferencePair(prompt=f"a test prompt number {index}", **names))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(tiny SD folder, its pairs file, a cache of 4 pairs with stds), built once."""
    root = tmp_path_factory.mktemp("sd")
    model = tiny.build_tiny_sd(root / "model")
    pairs = _sd_pairs(root / "media")
    spec = load_spec("sd", model, media_format=SIZE)
    cache = precompute(read_pairs(pairs), spec, root / "cache", batch_size=3, progress=False, num_workers=0)
    return model, pairs, cache


class _PosteriorToy(ToySpec):
    """The toy world with a made-up posterior, so the trainer's sampling runs on the cheap toy model."""

    def encode_media_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.encode_media(pixels)
        return mean, 0.05 + 0.2 * mean.abs()  # positive and varying per element


@pytest.fixture(scope="module")
def toy_posterior(world, tmp_path_factory):
    """(toy base, a cache of the world's pairs that stores stds)."""
    base, cache = world
    pairs = read_pairs(Path(cache).parent / "candidates" / "pairs.jsonl")
    out = tmp_path_factory.mktemp("toy-posterior") / "cache"
    return base, precompute(pairs, _PosteriorToy.from_pretrained(base), out, progress=False, num_workers=0)


# ---------------------------------------------------------------------- the cache
def test_precompute_stores_the_posterior_std_scaled_like_the_latents(sd):
    """Against diffusers' own encode: mean and std times scaling_factor, per pair, in the shards."""
    from diffusers import AutoencoderKL

    model, pairs, cache = sd
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["latent_std"] is True
    assert manifest["tensors"]["latents_chosen_std"] == manifest["tensors"]["latents_chosen"]
    vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae").eval()
    scale = vae.config.scaling_factor
    assert scale != 1.0  # so that a missing scaling shows
    listed = read_pairs(pairs)
    pixels = torch.stack([load_media(pair.rejected, SIZE) for pair in listed])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    stored = load_file(cache / "shard-00000.safetensors")
    dataset = CachedPairs(cache)
    assert dataset.has_latent_std
    std = torch.stack([dataset[i].rejected_std for i in range(len(listed))])
    mean = torch.stack([dataset[i].rejected for i in range(len(listed))])
    torch.testing.assert_close(std, posterior.std * scale)
    torch.testing.assert_close(mean, posterior.mean * scale)
    torch.testing.assert_close(stored["latents_rejected_std"], posterior.std * scale)  # one shard holds all 4


def test_no_latent_std_and_deterministic_encoders_store_the_mean_only(sd, world, tmp_path):
    model, pairs, cache = sd
    out = tmp_path / "mean-only"
    assert main(["--quiet", "precompute", "--family", "sd", "--pretrained", str(model), "--pairs", str(pairs),
                 "--out", str(out), "--height", "16", "--width", "16", "--device", "cpu", "--no-latent-std"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_std"] is False and "latents_chosen_std" not in manifest["tensors"]
    torch.testing.assert_close(CachedPairs(out)[1].chosen, CachedPairs(cache)[1].chosen)  # the same posterior mean
    assert CachedPairs(out)[1].chosen_std is None
    toy = json.loads((Path(world[1]) / "manifest.json").read_text())
    assert toy["latent_std"] is False  # the toy encoder is deterministic: "auto" trains on the mean, as before


def _old_cache(cache: Path, out: Path) -> Path:
    """A copy of ``cache`` as sdpo wrote it before stds were stored: no std tensors, no 'latent_std' key."""
    shutil.copytree(cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["latent_std"]
    for shard in manifest["shards"]:
        tensors = {k: v for k, v in load_file(out / shard["file"]).items() if not k.endswith("_std")}
        from safetensors.torch import save_file

        save_file(tensors, str(out / shard["file"]))

        shard.update(bytes=(out / shard["file"]).stat().st_size, sha256=file_sha256(out / shard["file"]))
    manifest["tensors"] = {k: v for k, v in manifest["tensors"].items() if not k.endswith("_std")}
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".verified.json").unlink(missing_ok=True)
    return out


def test_an_old_cache_trains_on_the_mean_and_refuses_sample_in_one_line(sd, tmp_path):
    old = CachedPairs(_old_cache(sd[2], tmp_path / "old"))
    assert not old.has_latent_std and old[0].chosen_std is None
    assert samples_latents("auto", old) is False
    assert samples_latents("mean", CachedPairs(sd[2])) is False
    assert samples_latents("auto", CachedPairs(sd[2])) is True
    with pytest.raises(ValueError, match=r"^latent_sampling=sample needs a cache that stores the posterior std") as error:
        samples_latents("sample", old)
    assert "\n" not in str(error.value) and str(old.cache_dir) in str(error.value)


# ---------------------------------------------------------------------- the draws
def _batch(pairs: int = 4, shape: tuple[int, ...] = (2, 3, 5), std: float = 0.5) -> PairBatch:
    generator = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(pairs, *shape, generator=generator), torch.randn(pairs, *shape, generator=generator)
    return PairBatch(chosen, rejected, {"c": torch.zeros(pairs, 1)},
                     chosen_std=torch.full_like(chosen, std), rejected_std=torch.full_like(rejected, std * 2))


def test_sampled_latents_differ_per_step_and_member_and_repeat_exactly():
    batch, rows = _batch(), torch.arange(4)
    first = augment_batch(batch, rows, 7, 1, sample=True, flip="none")
    again = augment_batch(batch, rows, 7, 1, sample=True, flip="none")
    later = augment_batch(batch, rows, 8, 1, sample=True, flip="none")
    other_seed = augment_batch(batch, rows, 7, 2, sample=True, flip="none")
    assert torch.equal(first.chosen, again.chosen) and torch.equal(first.rejected, again.rejected)
    assert not torch.allclose(first.chosen, later.chosen) and not torch.allclose(first.chosen, other_seed.chosen)
    eps_chosen = (first.chosen - batch.chosen) / batch.chosen_std
    eps_rejected = (first.rejected - batch.rejected) / batch.rejected_std
    assert not torch.allclose(eps_chosen, eps_rejected)  # each member draws its own eps
    # A process holding only global rows 2 and 3 draws what one process draws for them.
    part = PairBatch(batch.chosen[2:], batch.rejected[2:], {"c": torch.zeros(2, 1)},
                     chosen_std=batch.chosen_std[2:], rejected_std=batch.rejected_std[2:])
    torch.testing.assert_close(augment_batch(part, rows[2:], 7, 1, sample=True, flip="none").chosen, first.chosen[2:],
                               rtol=0, atol=0)
    mean_only = augment_batch(batch, rows, 7, 1, sample=False, flip="none")
    assert mean_only is batch


def test_the_mean_of_many_draws_is_the_stored_mean_and_their_spread_the_stored_std():
    batch, rows = _batch(pairs=2, std=0.5), torch.arange(2)
    draws = torch.stack([augment_batch(batch, rows, step, 0, sample=True, flip="none").chosen for step in range(2000)])
    # 2000 draws of sd 0.5: the mean's standard error is 0.011; 5 of them bound every one of the 60 elements.
    assert (draws.mean(0) - batch.chosen).abs().max() < 0.056
    assert (draws.std(0) - 0.5).abs().max() < 0.05


def test_pair_flips_mirror_winner_and_loser_together_and_independent_ones_apart():
    rows = torch.arange(64)
    chosen_pair, rejected_pair = flip_coins(rows, 5, 0, "pair")
    chosen_own, rejected_own = flip_coins(rows, 5, 0, "independent")
    assert torch.equal(chosen_pair, rejected_pair) and 10 < int(chosen_pair.sum()) < 54
    assert torch.equal(chosen_own, chosen_pair)  # the winner's coin is the same under both
    assert 10 < int((chosen_own != rejected_own).sum()) < 54
    none = flip_coins(rows, 5, 0, "none")
    assert not none[0].any() and not none[1].any()
    assert not torch.equal(flip_coins(rows, 6, 0, "pair")[0], chosen_pair)  # redrawn each step
    assert torch.equal(flip_coins(rows[40:], 5, 0, "independent")[1], rejected_own[40:])  # keyed per global row

    batch = _batch(pairs=64, shape=(3, 2, 4, 6))  # a video layout: the last axis is every frame's width
    flipped = augment_batch(batch, rows, 5, 0, sample=False, flip="independent")
    for index in range(64):
        expect = batch.rejected[index].flip(-1) if rejected_own[index] else batch.rejected[index]
        assert torch.equal(flipped.rejected[index], expect)
    assert torch.equal(flipped.chosen[chosen_own], batch.chosen[chosen_own].flip(-1))


def test_collating_needs_every_pair_or_none_to_carry_stds():
    with_std = Pair(torch.zeros(2), torch.zeros(2), {}, chosen_std=torch.ones(2), rejected_std=torch.ones(2))
    without = Pair(torch.zeros(2), torch.zeros(2), {})
    assert PairBatch.collate([with_std, with_std]).chosen_std.shape == (2, 2)
    assert PairBatch.collate([without]).chosen_std is None
    with pytest.raises(ValueError, match="with and without latent std"):
        PairBatch.collate([with_std, without])


# ---------------------------------------------------------------------- training
def _toy_config(base, cache, out: Path, **overrides) -> TrainConfig:
    settings = dict(family="toy", pretrained=str(base), cache_dir=str(cache), output_dir=str(out),
                    method=MethodConfig.preset("sdpo", beta=500.0), lora_rank=4, learning_rate=1e-2, max_steps=4,
                    train_batch_size=4, log_every=1, report_to="none", seed=1, latent_sampling="sample",
                    flip="independent")
    settings.update(overrides)
    return TrainConfig(**settings)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_sampling_and_flips_continues_exactly(toy_posterior, tmp_path):
    base, cache = toy_posterior
    whole, plain = tmp_path / "whole", tmp_path / "plain"
    train(_toy_config(base, cache, whole, checkpoint_every=2), spec=ToySpec.from_pretrained(base),
          dataset=CachedPairs(cache), progress=False)
    train(_toy_config(base, cache, plain, latent_sampling="mean", flip="none"), spec=ToySpec.from_pretrained(base),
          dataset=CachedPairs(cache), progress=False)
    assert _losses(whole)[1:] != _losses(plain)[1:]  # the augmentation changed what was trained on
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole / "checkpoint-2", interrupted / "checkpoint-2")
    rows = (whole / "metrics.jsonl").read_text().splitlines()
    (interrupted / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    assert latest_checkpoint(interrupted).name == "checkpoint-2"
    train(_toy_config(base, cache, interrupted), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache),
          resume="latest", progress=False)
    torch.testing.assert_close(torch.tensor(_losses(interrupted)), torch.tensor(_losses(whole)), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch checked on linux")
def test_two_processes_with_sampling_and_flips_match_one_process(toy_posterior, tmp_path):
    base, cache = toy_posterior
    runs = {}
    for processes, per_process in [(1, 4), (2, 2)]:
        out = tmp_path / f"p{processes}"
        path = tmp_path / f"p{processes}.yaml"
        path.write_text(yaml.safe_dump(_toy_config(base, cache, out, max_steps=3, train_batch_size=per_process)
                                       .to_dict()))
        if processes == 1:  # the reference, through the same command in this process
            assert main(["--quiet", "train", str(path)]) == 0
        else:
            two_processes(["-m", "sdpo.cli", "--quiet", "train", str(path)], port=29602)
        runs[processes] = _losses(out)
    torch.testing.assert_close(torch.tensor(runs[2]), torch.tensor(runs[1]), rtol=1e-4, atol=1e-6)


def test_sample_on_a_deterministic_cache_is_one_line_before_the_model_loads(world, tmp_path, capsys):
    base, cache = world
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"family": "toy", "pretrained": str(base), "cache_dir": str(cache),
                                      "output_dir": str(tmp_path / "run"), "report_to": "none", "max_steps": 1}))
    assert main(["--quiet", "train", str(config), "--set", "latent_sampling=sample"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sdpo: error: latent_sampling=sample needs a cache")
    assert main(["--quiet", "train", str(config), "--set", "flip=sideways"]) == 2
    assert "flip must be one of none, pair, independent, got 'sideways'" in capsys.readouterr().err


def test_sd_trains_on_sampled_flipped_latents_through_the_cli(sd, tmp_path):
    model, _, cache = sd
    config = tmp_path / "train.yaml"
    settings = {"family": "sd", "pretrained": str(model), "cache_dir": str(cache), "lora_rank": 2, "log_every": 1,
                "train_batch_size": 2, "report_to": "none", "learning_rate": 0.05, "seed": 3}
    losses = {}
    for name, flags in {"mean": ["latent_sampling=mean"], "sample": ["latent_sampling=sample", "flip=pair"]}.items():
        config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / name)}))
        assert main(["--quiet", "train", str(config), "--set", *flags, "max_steps=2"]) == 0
        losses[name] = _losses(tmp_path / name)
        saved = json.loads((tmp_path / name / "train_config.json").read_text())
        assert saved["latent_sampling"] == flags[0].split("=")[1]
    assert len(losses["sample"]) == 2 and (tmp_path / "sample" / "pytorch_lora_weights.safetensors").is_file()
    assert losses["sample"][1] != losses["mean"][1]
