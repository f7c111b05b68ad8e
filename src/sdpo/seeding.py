"""Every seed sdpo derives from a run's seed, in one place: the same inputs give the same seed in every release.

Three derivations, each kept because files and results depend on its exact values:

* :func:`derive_seed` hashes any number of integers (blake2b): the initial noise of sample ``i``
  (``derive_seed(seed, i)``), and the stages' per-prompt, per-candidate noise.
* :func:`mix_seed` mixes (seed, step, index) splitmix-style: the trainer's per-pair draws of a step
  (timesteps, noise, latent samples, augmentation streams).
* :func:`epoch_seed` is the seed of one epoch's batch order (``seed * 1_000_003 + epoch``).

Hashing or mixing rather than adding keeps (seed 0, sample 1) and (seed 1, sample 0) apart.
"""

from __future__ import annotations

import hashlib

_MASK64 = 2**64 - 1
EPOCH_STRIDE = 1_000_003
"""A prime above any epoch count: consecutive run seeds never share an epoch's order."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` alone (e.g. (run seed, prompt, candidate)).

    Hashed rather than added, so (seed 0, sample 1) and (seed 1, sample 0) do not share noise.
    """
    text = ",".join(str(int(part)) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def mix_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from three integers (splitmix-style), so nearby (step, index) do not collide.

    Cheaper than :func:`derive_seed`, which matters at one call per pair per step.
    """
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & _MASK64
    return value & (2**63 - 1)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffled batch order in a run seeded ``seed``."""
    return seed * EPOCH_STRIDE + epoch
