"""Trainer pieces that need no model: config validation, batch order, per-pair draws, statistics."""

import math

import pytest
import torch

from sdpo.stats import compare, mean_interval, wilson_interval
from sdpo.train.config import TrainConfig
from sdpo.train.step import draw_for_pairs
from sdpo.train.trainer import GlobalBatchOrder


def test_one_process_and_two_processes_see_the_same_global_batches():
    single = GlobalBatchOrder(20, per_process=4, world=1, rank=0, seed=3)
    ranks = [GlobalBatchOrder(20, per_process=2, world=2, rank=r, seed=3) for r in range(2)]
    for micro_step in range(12):  # crosses epoch boundaries (5 batches per epoch)
        rows, positions = single.indices(micro_step)
        split = [order.indices(micro_step) for order in ranks]
        assert torch.equal(rows, torch.cat([s[0] for s in split]))
        assert torch.equal(positions, torch.cat([s[1] for s in split]))
    epoch0 = torch.cat([single.indices(i)[0] for i in range(5)])
    assert sorted(epoch0.tolist()) == list(range(20))  # every pair once per epoch


def test_draws_depend_only_on_seed_step_and_position():
    a = draw_for_pairs(torch.tensor([0, 1, 2, 3]), step=7, seed=1, latent_shape=(2, 3), num_timesteps=1000)
    b = draw_for_pairs(torch.tensor([2, 3]), step=7, seed=1, latent_shape=(2, 3), num_timesteps=1000)
    assert torch.equal(a.timesteps[2:], b.timesteps) and torch.equal(a.noise[2:], b.noise)
    c = draw_for_pairs(torch.tensor([0, 1, 2, 3]), step=8, seed=1, latent_shape=(2, 3), num_timesteps=1000)
    assert not torch.equal(a.noise, c.noise)
    ranged = draw_for_pairs(torch.arange(200), 0, 0, (1,), 1000, t_min=300, t_max=310)
    assert int(ranged.timesteps.min()) >= 300 and int(ranged.timesteps.max()) <= 310


def test_batch_order_rejects_a_cache_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchOrder(3, per_process=2, world=2, rank=0, seed=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"method": {"name": "ppo"}}, "unknown method 'ppo'"),
        ({"method": {"name": "sdpo", "clip": [2.0, 1.0]}}, "out of order"),
        ({"t_min": 500, "t_max": 100}, "t_max"),
        ({"lora_rank": -1}, "lora_rank"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(overrides)


def test_config_round_trip_and_unknown_keys():
    config = TrainConfig.from_dict({"method": {"name": "dpo-cm", "beta": 20.0}, "max_steps": 5})
    assert config.method.name == "dpo-cm" and config.method.beta == 20.0 and config.method.mask_threshold == 0.9
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rat": 1e-4})


def test_wilson_and_mean_intervals():
    interval = wilson_interval(50, 100)
    assert interval.value == 0.5 and interval.low == pytest.approx(0.4038, abs=1e-3)
    assert interval.high == pytest.approx(0.5962, abs=1e-3)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = mean_interval(values)
    assert m.value == 2.5 and m.high - m.value == pytest.approx(1.96 * values.std().item() / 2, rel=1e-3)


def test_compare_counts_ties_half():
    base = torch.tensor([0.0, 0.0, 1.0, 2.0])
    tuned = torch.tensor([1.0, 0.0, 0.5, 3.0])
    result = compare(base, tuned)
    assert result.win_rate.value == pytest.approx(2.5 / 4)
    assert result.ties == 0.25 and result.gain.value == pytest.approx(0.375)
    with pytest.raises(ValueError, match="NaN"):
        compare(base, torch.tensor([math.nan, 0.0, 0.0, 0.0]))


def test_validation_without_writing_samples_but_saves_nothing(tmp_path):
    """The non-main processes of a sharded model sample (their forward is needed) and write nothing."""
    from sdpo.models import tiny
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec
    from sdpo.train.validation import write_validation_samples

    spec = load_spec("sd", tiny.build_tiny_sd(tmp_path / "model"), media_format=MediaFormat(height=16, width=16))
    folder = tmp_path / "validation"
    assert write_validation_samples(spec, spec.denoiser, ["a prompt"], folder, 2, write=False) == []
    assert not folder.exists()
    written = write_validation_samples(spec, spec.denoiser, ["a prompt"], folder, 2)
    assert [p.name for p in written] == ["00.png"] and (folder / "prompts.txt").is_file()


def test_validation_of_a_spec_without_encoders_loads_them_once_around_the_training_denoiser(tmp_path, monkeypatch):
    """Training from a cache loads no VAE or text encoder: validation loads them on its first call only,
    with the training denoiser in place of the folder's, and samples videos into GIFs."""
    from PIL import Image

    from sdpo.models import tiny
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec
    from sdpo.models.wan import WanSpec
    from sdpo.train.validation import write_validation_samples

    model = tiny.build_tiny_wan(tmp_path / "model")
    spec = load_spec("wan", model, load_vae=False, load_text_encoder=False,
                     media_format=MediaFormat(height=32, width=32, frames=5))
    assert not spec.can_sample
    loads = []
    load = WanSpec.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(WanSpec, "from_pretrained", classmethod(counted))
    for step in (1, 2):
        written = write_validation_samples(spec, spec.denoiser, ["a", "b"], tmp_path / f"step-{step}", 2)
        assert [p.name for p in written] == ["00.gif", "01.gif"]
        assert Image.open(written[0]).n_frames == 5
    assert len(loads) == 1 and loads[0]["denoiser"] is spec.denoiser
    assert spec.vae is None and spec.text_encoder is None  # the training spec itself is left as it was
