"""Diffusion-KTO on a samples cache and MaPO with no reference pass, end to end on the tiny toy world,
through the commands a user types (`sdpo pairs --strategy quantile`, `sdpo precompute`)."""

import contextlib
import json
import math

import pytest
import torch

from sdpo.cli import main
from sdpo.data import CachedPairs, CachedSamples, CacheError, read_samples
from sdpo.data.cache import collate_pairs
from sdpo.errors import InputError
from sdpo.objectives import MethodConfig
from sdpo.toy import ToySpec
from sdpo.train.config import TrainConfig
from sdpo.train.step import draw_for_pairs, preference_step
from sdpo.train.trainer import train


def _config(out, method, cache, **method_settings):
    return TrainConfig(family="toy", output_dir=str(out), cache_dir=str(cache),
                       method=MethodConfig.preset(method, **method_settings), lora_rank=4, learning_rate=1e-2,
                       max_steps=4, train_batch_size=4, log_every=1, report_to="none", seed=1)


@pytest.fixture(scope="module")
def samples_cache(world, tmp_path_factory):
    """The world's candidates labelled one by one (top / bottom half per prompt) and precomputed, by the CLI."""
    base, cache = world
    root = tmp_path_factory.mktemp("samples")
    manifest = root / "samples.jsonl"
    assert main(["--quiet", "pairs", str(cache.parent / "candidates"), "--strategy", "quantile", "--quantile", "0.5",
                 "--out", str(manifest)]) == 0
    assert main(["--quiet", "precompute", "--family", "toy", "--pretrained", str(base), "--pairs", str(manifest),
                 "--out", str(root / "cache")]) == 0
    return root / "cache", manifest


def test_samples_manifest_and_cache_hold_unpaired_labelled_samples(samples_cache, world):
    cache, manifest = samples_cache
    samples = read_samples(manifest)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert set(lines[0]) == {"prompt", "media", "desirable", "score"}
    assert sum(s.desirable for s in samples) == sum(not s.desirable for s in samples) == len(samples) // 2
    # Every desirable sample outscores the undesirable one of its prompt (2 candidates per prompt).
    by_prompt = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt, []).append(sample)
    assert all(max(s.score for s in g if s.desirable) > min(s.score for s in g if not s.desirable)
               for g in by_prompt.values() if len(g) == 2)
    dataset = CachedSamples(cache)
    assert dataset.manifest["kind"] == "samples" and len(dataset) == len(samples)
    assert dataset[0].latents.shape == CachedPairs(world[1])[0].chosen.shape  # one latent a row, not two
    assert dataset.labels().tolist() == [s.desirable for s in samples]
    with pytest.raises(CacheError, match="holds samples"):
        CachedPairs(cache)


def test_kto_trains_on_labelled_samples(samples_cache, world, tmp_path):
    cache, _ = samples_cache
    spec = ToySpec.from_pretrained(world[0])
    result = train(_config(tmp_path, "kto", cache, beta=500.0), spec=spec, dataset=CachedSamples(cache),
                   progress=False)
    losses = [row["loss"] for row in result.history]
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # LoRA B = 0: policy == reference, v = 1/2 for every sample
    assert all(math.isfinite(v) for v in losses) and losses[-1] != losses[0]
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_method_and_data_kinds_must_agree(samples_cache, world, tmp_path):
    cache, _ = samples_cache
    spec = ToySpec.from_pretrained(world[0])
    with pytest.raises(InputError, match="only method kto"):
        train(_config(tmp_path / "a", "sdpo", cache), spec=spec, dataset=CachedSamples(cache), progress=False)
    with pytest.raises(InputError, match="kto trains on labelled samples"):
        train(_config(tmp_path / "b", "kto", world[1]), spec=spec, dataset=CachedPairs(world[1]), progress=False)


def test_mapo_trains_on_pairs_and_never_calls_the_reference(world, tmp_path):
    base, cache = world
    spec = ToySpec.from_pretrained(base)
    result = train(_config(tmp_path, "mapo", cache), spec=spec, dataset=CachedPairs(cache), progress=False)
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert {"sft_loss", "margin_loss"} <= set(result.history[0])

    @contextlib.contextmanager
    def no_reference():
        raise AssertionError("mapo ran the reference")
        yield

    batch = collate_pairs([CachedPairs(cache)[i] for i in range(4)])
    method = MethodConfig.preset("mapo")
    draws = draw_for_pairs(torch.arange(4), 0, 0, tuple(batch.chosen.shape[1:]), spec.schedule.num_timesteps)
    out = preference_step(spec, spec.denoiser, batch, draws, method, no_reference)
    err = out.output.metrics["sft_loss"]
    assert torch.isfinite(out.output.loss) and out.output.loss > err  # SFT term plus a positive margin term


def test_threshold_strategy_labels_each_candidate_against_the_threshold(world, tmp_path, capsys):
    candidates = world[1].parent / "candidates"
    scores = [json.loads(line)["total"] for line in (candidates / "candidates.jsonl").read_text().splitlines()]
    threshold = sorted(scores)[len(scores) // 2]
    out = tmp_path / "samples.jsonl"
    assert main(["pairs", str(candidates), "--strategy", "threshold", "--threshold", str(threshold),
                 "--out", str(out)]) == 0
    samples = read_samples(out)
    assert all(s.desirable == (s.score > threshold) for s in samples)
    assert len(samples) == sum(score != threshold for score in scores)
    assert "unpaired" in capsys.readouterr().out
    assert main(["pairs", str(candidates), "--strategy", "threshold", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_manifest_kind_is_written_for_samples_only_and_checked(samples_cache, world, tmp_path):
    import shutil

    from sdpo.data import read_manifest

    assert "kind" not in read_manifest(world[1])  # a pair cache's manifest is as before
    broken = tmp_path / "cache"
    shutil.copytree(samples_cache[0], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for change, message in (({"kind": "triples"}, "'kind' must be one of"),
                            ({"latent_std": True}, "stores no latent std")):
        (broken / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(CacheError, match=message):
            read_manifest(broken)
