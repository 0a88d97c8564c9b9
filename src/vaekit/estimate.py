"""Evaluation: per-example ELBO terms on a whole split, in chunks, over one process or many.

Each example's noise (fixed binarisation, the eps of its ELBO sample) is a function of its index
alone, so the numbers do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .data import Pipeline, batches
from .distributed import DistContext
from .model import VAE
from .objectives import elbo_terms, iwae_terms
from .randomness import fixed_normal


def map_examples(fn: Callable[[Tensor, int, int], Tensor], raw: Tensor, pipeline: Pipeline,
                 split: str, batch_size: int, device: torch.device,
                 dist: DistContext | None = None, outputs: int = 1) -> Tensor:
    """Apply fn(x, start, stop) -> (stop - start, outputs) to every example; (N, outputs).

    Chunks go round-robin to the processes; each fills its rows of a zero tensor and a sum over
    processes assembles the whole (adding zeros is exact, so the result is bit-identical to a
    single process's).
    """
    dist = dist or DistContext()
    result = torch.zeros(len(raw), outputs, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for chunk, (start, stop) in enumerate(batches(len(raw), batch_size)):
            if chunk % dist.world_size != dist.rank:
                continue
            x = pipeline.fixed(raw[start:stop].to(device), start, split)  # (b, *shape)
            result[start:stop] = fn(x, start, stop).double().reshape(stop - start, outputs)
    return dist.all_reduce_sum(result)


def elbo_per_example(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test",
                     seed: int = 0, batch_size: int = 1000, device: torch.device | None = None,
                     dist: DistContext | None = None, labels: Tensor | None = None) -> Tensor:
    """(N, 2) float64: reconstruction and KL of every example, one fixed z sample each.

    labels (N,): the class of each example, for a conditional model (the ELBO of log p(x|y)).
    """
    device = device or next(model.parameters()).device

    def terms(x: Tensor, start: int, stop: int) -> Tensor:
        eps = fixed_normal((model.latent_dim,), start, stop, (seed, "elbo-eps", split))
        y = None if labels is None else labels[start:stop].to(device)
        result = elbo_terms(model, x, eps.to(device), y)
        return torch.stack([result.reconstruction, result.kl], dim=1)  # (b, 2)

    return map_examples(terms, raw, pipeline, split, batch_size, device, dist, outputs=2)


def iwae_per_example(model: VAE, raw: Tensor, pipeline: Pipeline, samples: int, *,
                     split: str = "test", seed: int = 0, device: torch.device | None = None,
                     dist: DistContext | None = None, labels: Tensor | None = None) -> Tensor:
    """(N,) float64: the IWAE bound with `samples` z per example (Burda et al. 2016), noise
    fixed per example index; chunks hold about 20,000 samples of z so memory stays bounded."""
    device = device or next(model.parameters()).device
    batch_size = max(1, 20_000 // samples)

    def bound(x: Tensor, start: int, stop: int) -> Tensor:
        eps = fixed_normal((samples, model.latent_dim), start, stop, (seed, "iwae-eps", split))
        y = None if labels is None else labels[start:stop].to(device)
        return iwae_terms(model, x, eps.to(device), y).bound  # (b,)

    return map_examples(bound, raw, pipeline, split, batch_size, device, dist).squeeze(1)


def bits_per_dim(log_p: float, dims: int) -> float:
    """A log-probability (nats per example) as bits per dimension: -log2 p / dims."""
    return -log_p / (dims * math.log(2.0))
