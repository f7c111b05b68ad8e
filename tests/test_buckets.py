"""Aspect-ratio buckets: precompute groups pairs by the bucket closest to their shape, training never
mixes buckets in a batch, and a cache without buckets trains exactly as before."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdpo.cli import main
from sdpo.data import (
    CachedPairs,
    CacheError,
    PreferencePair,
    bucket_for,
    check_buckets,
    load_media,
    parse_bucket,
    read_manifest,
    write_pairs_jsonl,
)
from sdpo.models import tiny
from sdpo.models.base import MediaFormat
from sdpo.models.registry import load_spec
from sdpo.train import optimize as optimize_module
from sdpo.train.trainer import GlobalBatchOrder, latest_checkpoint

BUCKETS = ["16x16", "12x20", "20x12"]
"""Square, landscape and portrait; multiples of the tiny SD VAE's factor 2 (latents 8x8, 6x10, 10x6)."""
SIZES = [(16, 16), (32, 32), (15, 17), (40, 40), (10, 20), (30, 60), (9, 16), (20, 10), (64, 30), (17, 9)]
"""(height, width) of each pair's chosen image: 4 square-ish, 3 landscape, 3 portrait."""
EXPECTED = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
"""The bucket of each pair in SIZES (in BUCKETS)."""


def _pairs(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index, (height, width) in enumerate(SIZES):
        names = {}
        for role, (h, w) in (("chosen", (height, width)), ("rejected", (width + 3, height))):  # another shape
            names[role] = f"{index}-{role}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / names[role])
        pairs.append(PreferencePair(prompt=f"a test prompt number {index}", **names))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


def _precompute_args(model: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "precompute", "--family", "sd", "--pretrained", str(model), "--pairs", str(pairs),
            "--out", str(out), "--height", "16", "--width", "16", "--device", "cpu", "--no-latent-std", *extra]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(tiny SD folder, its mixed-size pairs file, a bucketed cache made through the CLI)."""
    root = tmp_path_factory.mktemp("buckets")
    model = tiny.build_tiny_sd(root / "model")
    pairs = _pairs(root / "media")
    cache = root / "cache"
    assert main(_precompute_args(model, pairs, cache, "--batch-size", "3", "--buckets", *BUCKETS)) == 0
    return model, pairs, cache


# ---------------------------------------------------------------------- assignment and checks
def test_each_size_goes_to_the_bucket_closest_in_aspect_ratio():
    buckets = [parse_bucket(text) for text in BUCKETS]
    assert buckets == [(16, 16), (12, 20), (20, 12)]  # HEIGHTxWIDTH
    assert [bucket_for(size, buckets) for size in SIZES] == [buckets[i] for i in EXPECTED]
    assert bucket_for((1000, 100), buckets) == (20, 12)  # far portrait: still the most portrait bucket
    assert bucket_for((7, 8), buckets) == (16, 16)
    assert check_buckets([" 448 x 576", (512, 512)], 8) == [(448, 576), (512, 512)]


@pytest.mark.parametrize("buckets, multiple, message", [
    (["512x"], None, "bucket '512x' is not HEIGHTxWIDTH"),
    (["0x512"], None, "bucket 0x512: height and width must be positive"),
    (["512x500"], 8, "bucket 512x500: height and width must be multiples of 8"),
    (["512x512", (512, 512)], None, "bucket 512x512 is listed twice"),
    ([], None, "at least one"),
])
def test_bad_buckets_are_one_line_naming_the_bucket(buckets, multiple, message):
    with pytest.raises(ValueError, match=message):
        check_buckets(buckets, multiple)


def test_a_bad_bucket_on_the_command_line_is_one_line(sd, tmp_path, capsys):
    model, pairs, _ = sd
    assert main(_precompute_args(model, pairs, tmp_path / "a", "--buckets", "16x16", "12by20")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sdpo: error: --buckets: bucket '12by20' is not HEIGHTxWIDTH in pixels (such as 448x576)"
    # Known only once the model is loaded: the tiny VAE halves each side, so an odd side is refused.
    assert main(_precompute_args(model, pairs, tmp_path / "b", "--buckets", "16x16", "13x20")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress lines
    assert last == "sdpo: error: bucket 13x20: height and width must be multiples of 2 (the model's spatial factor)"
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- the cache
def test_precompute_stores_each_pair_at_its_buckets_shape_and_the_manifest_lists_them(sd):
    model, pairs, cache = sd
    manifest = read_manifest(cache)
    assert manifest["version"] == 2 and manifest["media_format"]["height"] == 16
    assert [(b["height"], b["width"], b["num_pairs"]) for b in manifest["buckets"]] == [
        (16, 16, 4), (12, 20, 3), (20, 12, 3)]
    assert [b["tensors"]["latents_chosen"]["shape"] for b in manifest["buckets"]] == [[4, 8, 8], [4, 6, 10], [4, 10, 6]]
    assert [s["bucket"] for s in manifest["shards"]] == [0, 1, 2]  # a shard never spans two buckets
    dataset = CachedPairs(cache)
    assert dataset.buckets == [(16, 16), (12, 20), (20, 12)]
    assert dataset.bucket_ids().tolist() == sorted(EXPECTED)  # grouped by bucket, input order within
    shapes = [tuple(dataset[i].chosen.shape) for i in range(len(dataset))]
    assert shapes == [(4, 8, 8)] * 4 + [(4, 6, 10)] * 3 + [(4, 10, 6)] * 3
    assert all(dataset[i].rejected.shape == dataset[i].chosen.shape for i in range(len(dataset)))
    # Pair 5 (a 30x60 chosen) is cache row 5 (the second landscape pair); both members cover-and-crop to 12x20.
    spec = load_spec("sd", model, media_format=MediaFormat(height=16, width=16))
    pixels = [load_media(pairs.parent / f"5-{role}.png", spec.media_format, size=(12, 20)) for role in ("chosen", "rejected")]
    with torch.no_grad():
        expected = spec.encode_media(torch.stack(pixels))
    torch.testing.assert_close(dataset[5].chosen, expected[0])
    torch.testing.assert_close(dataset[5].rejected, expected[1])


def test_without_buckets_the_cache_is_todays_single_bucket(sd, tmp_path):
    model, pairs, _ = sd
    out = tmp_path / "plain"
    assert main(_precompute_args(model, pairs, out)) == 0
    manifest = read_manifest(out)
    assert manifest["version"] == 1 and "buckets" not in manifest and "bucket" not in manifest["shards"][0]
    dataset = CachedPairs(out)
    assert dataset.buckets == [(16, 16)] and dataset.bucket_ids().tolist() == [0] * len(SIZES)
    assert tuple(dataset[4].chosen.shape) == (4, 8, 8)  # the landscape pair cropped to the one square


def test_a_bucketed_manifest_without_its_buckets_is_refused(sd, tmp_path):
    _, _, cache = sd
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["buckets"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="a version 2 cache must list its 'buckets'"):
        read_manifest(broken)


# ---------------------------------------------------------------------- the batch order
def _todays_order(num_pairs: int, per_process: int, world: int, rank: int, seed: int, micro_step: int):
    """The batch order before buckets existed, written out: one permutation per epoch, cut in order."""
    size = per_process * world
    epoch, position = divmod(micro_step, num_pairs // size)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = position * size + rank * per_process
    return order[start : start + per_process]


@pytest.mark.parametrize("per_process, world", [(4, 1), (2, 2), (3, 1)])
def test_a_one_bucket_order_is_exactly_todays(per_process, world):
    for rank in range(world):
        order = GlobalBatchOrder(22, per_process, world, rank, seed=5, buckets=torch.zeros(22, dtype=torch.long))
        plain = GlobalBatchOrder(22, per_process, world, rank, seed=5)
        for micro_step in range(20):  # several epochs
            expected = _todays_order(22, per_process, world, rank, 5, micro_step)
            assert torch.equal(order.indices(micro_step)[0], expected)
            assert torch.equal(plain.indices(micro_step)[0], expected)


def test_bucketed_batches_stay_in_one_bucket_and_cover_each_bucket_once_per_epoch():
    buckets = torch.tensor([0] * 9 + [1] * 5 + [2] * 2 + [1] * 3)  # 9, 8 and 2 pairs
    single = GlobalBatchOrder(19, 4, 1, 0, seed=2, buckets=buckets)
    assert single.batches_per_epoch == 2 + 2 + 1 and single.padded == [2]  # bucket 2 is padded to one batch
    split = [GlobalBatchOrder(19, 2, 2, rank, seed=2, buckets=buckets) for rank in range(2)]
    epochs = []
    for epoch in range(3):
        seen = []
        for micro_step in range(epoch * 5, epoch * 5 + 5):
            rows, positions = single.indices(micro_step)
            assert len(set(buckets[rows].tolist())) == 1  # never two buckets in a batch
            assert positions.tolist() == [0, 1, 2, 3]
            halves = [order.indices(micro_step) for order in split]
            assert torch.equal(torch.cat([h[0] for h in halves]), rows)  # the process count changes nothing
            seen.append(rows)
        seen = torch.cat(seen)
        assert sorted(set(seen[buckets[seen] == 2].tolist())) == [14, 15]  # the small bucket, every epoch
        big = seen[buckets[seen] != 2].tolist()
        assert len(big) == len(set(big)) == 16  # bucket 0 drops 1 pair, bucket 1 none; no repeats
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order each epoch
    resumed = GlobalBatchOrder(19, 4, 1, 0, seed=2, buckets=buckets)  # a new process, as after a resume
    assert torch.equal(resumed.indices(12)[0], single.indices(12)[0])


def test_a_bucket_smaller_than_a_batch_is_padded_with_a_warning_naming_it():
    from types import SimpleNamespace

    from sdpo.train.config import TrainConfig
    from sdpo.train.order import batch_order

    class Buckets(list):
        buckets = [(16, 16), (20, 12)]

        def bucket_ids(self):
            return torch.tensor([0] * 6 + [1])

    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)
    config = TrainConfig(family="toy", cache_dir="unused", output_dir="unused", train_batch_size=3, report_to="none")
    with pytest.warns(UserWarning, match=r"bucket\(s\) 20x12 hold fewer pairs than one global batch \(3\)"):
        order = batch_order(Buckets(range(7)), config, accelerator)
    batches = [order.indices(step)[0].tolist() for step in range(order.batches_per_epoch)]
    assert [6, 6, 6] in batches and len(batches) == 3  # the one-pair bucket fills its batch with itself


# ---------------------------------------------------------------------- training through the CLI
def _train_config(tmp_path: Path, model: Path, cache: Path, out: Path, **extra) -> Path:
    path = tmp_path / f"{out.name}.yaml"
    settings = {"family": "sd", "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(out),
                "lora_rank": 2, "log_every": 1, "train_batch_size": 2, "report_to": "none", "learning_rate": 0.05,
                "seed": 3, "max_steps": 4, **extra}
    path.write_text(yaml.safe_dump(settings))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_training_batch_has_one_shape_and_a_resume_continues_exactly(sd, tmp_path, monkeypatch):
    model, _, cache = sd
    shapes, real = [], optimize_module.collate_pairs

    def recording(items):
        batch = real(items)
        shapes.append(tuple(batch.chosen.shape))
        return batch

    monkeypatch.setattr(optimize_module, "collate_pairs", recording)
    whole = tmp_path / "whole"
    assert main(["--quiet", "train", str(_train_config(tmp_path, model, cache, whole, checkpoint_every=2,
                                                          gradient_accumulation_steps=2))]) == 0
    assert len(shapes) == 8 and len(set(shapes)) == 3  # all three buckets, each batch of one shape
    assert all(shape[0] == 2 for shape in shapes)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole / "checkpoint-2", interrupted / "checkpoint-2")
    (interrupted / "metrics.jsonl").write_text("\n".join((whole / "metrics.jsonl").read_text().splitlines()[:2]) + "\n")
    assert latest_checkpoint(interrupted).name == "checkpoint-2"
    shapes.clear()
    config = _train_config(tmp_path, model, cache, interrupted, checkpoint_every=2, gradient_accumulation_steps=2)
    assert main(["--quiet", "train", str(config), "--resume", "latest"]) == 0
    assert len(shapes) == 4  # only steps 3 and 4 ran again
    torch.testing.assert_close(torch.tensor(_losses(interrupted)), torch.tensor(_losses(whole)), rtol=1e-6, atol=1e-8)
