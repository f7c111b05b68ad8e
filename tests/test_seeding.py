"""The seeds sdpo derives are pinned: these values were computed by the code before sdpo.seeding existed
(models/_common.derive_seed, train/step._mix, the trainer's ``seed * 1_000_003 + epoch``), so results,
caches of generated media and resumed runs stay reproducible across releases."""

from __future__ import annotations

import torch

from sdpo.seeding import derive_seed, epoch_seed, mix_seed


def test_derive_seed_keeps_its_values():
    assert [derive_seed(0), derive_seed(0, 1), derive_seed(1, 0), derive_seed(7, 3, 2), derive_seed(-5, 2**40)] == [
        4246866556266386882, 2024819301478721300, 5250232019403110347, 2242714595259937464, 606894708126245593]


def test_mix_seed_keeps_its_values():
    assert [mix_seed(0, 0, 0), mix_seed(0, 1, 0), mix_seed(1, 0, 0), mix_seed(3, 17, 5),
            mix_seed(mix_seed(3, 17, 5), 2, 0), mix_seed(-1, 2, 3)] == [
        0, 2671861310475829465, 62254393806168869, 7732479727655520334, 2124221144309462294, 6235500643161204871]


def test_epoch_seed_keeps_its_values_and_every_seed_fits_a_torch_generator():
    assert [epoch_seed(0, 0), epoch_seed(0, 3), epoch_seed(1, 0), epoch_seed(42, 7)] == [0, 3, 1000003, 42000133]
    for seed in (derive_seed(2**62), mix_seed(2**62, 2**40, 9)):
        assert 0 <= seed < 2**63
        torch.Generator().manual_seed(seed)
