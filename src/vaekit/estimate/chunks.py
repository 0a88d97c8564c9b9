"""Chunking: how many examples and samples an estimator handles at once, and the map over a split.

Work is chunked over examples (map_examples, shared out round-robin to processes) and over
samples (sample_block, decode_samples), so memory stays bounded whatever k and the dataset size,
and a decoder pass stays small enough to run from the caches.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..data import Pipeline, batches
from ..distributed import DistContext
from ..model import VAE
from ..randomness import FIXED_BLOCK, SAMPLE_BLOCK

CHUNK_ELEMENTS = 2 ** 24  # float32 numbers one chunk's tensors may hold (~64 MiB)
# One decoder pass holds at most this many (16 MiB): activations that stay in the caches instead
# of streaming through memory (benchmarks/likelihood_throughput.py: about 1000 samples of the
# 784-400-20 VAE, where its matrix products run fastest on 1 and on 2 threads).
DECODE_ELEMENTS = 2 ** 22
# Samples of each example in one decoder pass, at the default number of examples per chunk: a
# chunk's bookkeeping per block of samples (noise, log weights, sums in float64) is then shared
# by enough examples to cost little next to decoding.
PASS_SAMPLES = 16


def map_examples(fn: Callable[[Tensor, int, int], Tensor], raw: Tensor, pipeline: Pipeline,
                 split: str, batch_size: int, device: torch.device,
                 dist: DistContext | None = None, outputs: int = 1,
                 progress: Callable[[int], None] | None = None) -> Tensor:
    """Apply fn(x, start, stop) -> (stop - start, outputs) to every example; (N, outputs).

    Chunks go round-robin to the processes; each fills its rows of a zero tensor and a sum over
    processes assembles the whole (adding zeros is exact, so the result is bit-identical to a
    single process's). progress(n) is called after each chunk with its number of examples.
    """
    dist = dist or DistContext()
    result = torch.zeros(len(raw), outputs, dtype=torch.float64, device=device)
    inputs = FixedInputs(raw, pipeline, split, device)
    # A failure in one process's share (out of memory, say) stops all, instead of leaving the
    # others waiting in the sum.
    with dist.same_outcome("evaluate"), torch.inference_mode():
        for chunk, (start, stop) in enumerate(batches(len(raw), batch_size)):
            if chunk % dist.world_size != dist.rank:
                continue
            x = inputs(start, stop)  # (b, *shape)
            result[start:stop] = fn(x, start, stop).double().reshape(stop - start, outputs)
            if progress is not None:
                progress(stop - start)
    return dist.all_reduce_sum(result)


class FixedInputs:
    """pipeline.fixed(raw[start:stop], start, split) for chunk after chunk of examples.

    A noisy pipeline draws its noise for a whole block of randomness.FIXED_BLOCK examples on
    every call (the noise of an example depends on its index alone), so small chunks would
    redraw the same block again and again: the inputs of the current block are made once and
    sliced. The result is identical to calling pipeline.fixed on each chunk.
    """

    def __init__(self, raw: Tensor, pipeline: Pipeline, split: str, device: torch.device):
        self.raw, self.pipeline, self.split, self.device = raw, pipeline, split, device
        self.block_start, self.block = 0, None

    def __call__(self, start: int, stop: int) -> Tensor:
        if not self.pipeline.noisy or start // FIXED_BLOCK != (stop - 1) // FIXED_BLOCK:
            return self.pipeline.fixed(self.raw[start:stop].to(self.device), start, self.split)
        block_start = start - start % FIXED_BLOCK
        if self.block is None or block_start != self.block_start:
            block_stop = min(len(self.raw), block_start + FIXED_BLOCK)
            self.block_start = block_start
            self.block = self.pipeline.fixed(self.raw[block_start:block_stop].to(self.device),
                                             block_start, self.split)  # (FIXED_BLOCK, *shape)
        return self.block[start - block_start: stop - block_start]  # (b, *shape)


def decoded_elements_per_sample(model: VAE) -> int:
    """Numbers one decoded sample occupies: every decoder activation plus the likelihood's
    parameters and the log-density terms, measured by one probe forward pass."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel()

    leaves = [m for m in model.decoder.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            condition = None if model.num_classes is None else \
                torch.zeros(1, model.num_classes, device=device)  # a conditional decoder's label
            model.decoder(torch.zeros(1, model.code_dim, device=device,
                                      dtype=next(model.parameters()).dtype), condition)
    finally:
        for hook in hooks:
            hook.remove()
    return total + 3 * math.prod(model.data_shape)


def decode_samples(model: VAE, examples: int, budget: int | None = None) -> int:
    """Samples of each of `examples` examples to decode in one pass, so that the pass's
    activations fit the cache-sized budget (default DECODE_ELEMENTS)."""
    budget = budget or DECODE_ELEMENTS
    return max(1, budget // (decoded_elements_per_sample(model) * max(1, examples)))


def sample_block(model: VAE, k: int, examples: int = 1, budget: int | None = None) -> int:
    """Samples per example to decode at once (at most a block of noise, SAMPLE_BLOCK, and k),
    within the memory budget (default CHUNK_ELEMENTS) for `examples` examples at a time."""
    budget = budget or CHUNK_ELEMENTS
    per_sample = decoded_elements_per_sample(model) * max(1, examples)
    return max(1, min(k, SAMPLE_BLOCK, budget // per_sample))


def examples_per_chunk(model: VAE, block: int, budget: int | None = None) -> int:
    """Examples to process together: enough that a decoder pass (DECODE_ELEMENTS) holds
    PASS_SAMPLES samples of each, and few enough that a block of `block` samples of each fits
    the memory budget (default CHUNK_ELEMENTS) with its noise, codes and per-dimension terms
    (about 6 numbers per latent dimension, and 24 per sample for the sums), and what a model's
    inference holds per draw beyond that (a hierarchy's top-down pass)."""
    budget = budget or CHUNK_ELEMENTS
    by_pass = DECODE_ELEMENTS // (decoded_elements_per_sample(model) * PASS_SAMPLES)
    per_sample = 6 * model.latent_dim + 24 + getattr(model, "inference_elements_per_sample", 0)
    by_memory = budget // (block * per_sample)
    return max(1, min(by_pass, by_memory))
