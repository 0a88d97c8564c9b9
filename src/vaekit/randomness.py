"""Counter-based randomness: every random draw in training is a function of (seed, purpose, counter).

The data order of an epoch depends on (seed, epoch); the noise of a step (binarisation, the
reparameterisation eps) on (seed, global step), drawn for the whole global batch so that each
process takes its own rows. Nothing random is carried from step to step, so a run resumed from a
checkpoint, or run with another number of processes, replays exactly the same draws.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A 63-bit seed mixed from any printable parts, e.g. derive_seed(seed, "noise", step)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """The order in which epoch `epoch` visits n training examples. (n,) int64"""
    generator = seeded_generator(derive_seed(seed, "order", epoch))
    return torch.randperm(n, generator=generator).to(device)


class StepNoise:
    """The noise of one global training step, sliced for one process.

    rows: which rows of the global batch this process holds (a slice).
    """

    def __init__(self, seed: int, step: int, global_batch: int, rows: slice,
                 device: torch.device):
        self.generator = seeded_generator(derive_seed(seed, "noise", step), device)
        self.global_batch = global_batch
        self.rows = rows
        self.device = device

    def uniform(self, event_shape: tuple[int, ...]) -> Tensor:
        """U[0, 1) noise for this process's rows. (B_local, *event_shape)"""
        u = torch.rand((self.global_batch, *event_shape), generator=self.generator,
                       device=self.device)
        return u[self.rows]

    def normal(self, *shape: int) -> Tensor:
        """N(0, 1) noise for this process's rows. (B_local, *shape)"""
        eps = torch.randn((self.global_batch, *shape), generator=self.generator, device=self.device)
        return eps[self.rows]


FIXED_BLOCK = 1024  # examples per block of fixed noise


def _fixed_noise(draw, example_shape: tuple[int, ...], start: int, stop: int,
                 key: tuple) -> Tensor:
    # Noise is drawn in blocks of FIXED_BLOCK examples, each seeded by (key, block number), so
    # an example's noise depends only on its index: not on batch size or process count.
    first, last = start // FIXED_BLOCK, (stop - 1) // FIXED_BLOCK
    blocks = [draw((FIXED_BLOCK, *example_shape),
                   generator=seeded_generator(derive_seed(*key, block)))
              for block in range(first, last + 1)]
    offset = first * FIXED_BLOCK
    return torch.cat(blocks)[start - offset: stop - offset]  # (stop - start, *example_shape)


def fixed_uniform(example_shape: tuple[int, ...], start: int, stop: int, key: tuple) -> Tensor:
    """U[0, 1) noise for examples start..stop-1, a fixed function of (key, example index)."""
    return _fixed_noise(torch.rand, example_shape, start, stop, key)


def fixed_normal(example_shape: tuple[int, ...], start: int, stop: int, key: tuple) -> Tensor:
    """N(0, 1) noise for examples start..stop-1, a fixed function of (key, example index)."""
    return _fixed_noise(torch.randn, example_shape, start, stop, key)


SAMPLE_BLOCK = 500  # samples per block of per-example noise (estimators draw k per example)


def per_example_normal(sample_shape: tuple[int, ...], start: int, stop: int,
                       first_sample: int, last_sample: int, key: tuple) -> Tensor:
    """N(0, 1) noise for samples first..last-1 of examples start..stop-1. (S, B, *sample_shape)

    Estimators draw many samples per example (k importance samples), so fixed_normal's blocks of
    1024 examples would be far too large; here every (example, block of SAMPLE_BLOCK samples)
    has its own generator. Sample j of example i is a fixed function of (key, i, j): it does not
    depend on the batch size, the chunking over samples, the number of processes, or k (the
    first k samples of a larger k are the same), so estimates at growing k are nested.
    """
    first_block, last_block = first_sample // SAMPLE_BLOCK, (last_sample - 1) // SAMPLE_BLOCK
    offset = first_block * SAMPLE_BLOCK
    per_example = []
    for example in range(start, stop):
        blocks = [torch.randn((SAMPLE_BLOCK, *sample_shape),
                              generator=seeded_generator(derive_seed(*key, example, block)))
                  for block in range(first_block, last_block + 1)]
        per_example.append(torch.cat(blocks)[first_sample - offset: last_sample - offset])
    return torch.stack(per_example, dim=1)  # (S, B, *sample_shape)
