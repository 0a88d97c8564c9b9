"""Evaluation: the ELBO, log p(x) by importance sampling, the naive estimator, and their gaps.

    ELBO(x)      = E_q[log p(x|z)] - KL(q(z|x) || p(z))                      <= log p(x)
    IS_k(x)      = log (1/k) sum_j p(x, z_j) / q(z_j|x),   z_j ~ q(z|x)      (Burda et al. 2016)
    naive_k(x)   = log (1/k) sum_j p(x | z_j),             z_j ~ p(z)         (the note's point 9)
    log p(x) - ELBO(x) = KL(q(z|x) || p(z|x))                                 (the note's point 14)

E[IS_k] rises with k to log p(x) (it is the IWAE bound, an ELBO at k = 1); the naive estimator
targets the same number but its weights live where the prior puts z, not where x was made, so
it needs vastly more samples. Every figure comes with its sample count and a Monte Carlo
standard error (delta method for log-means of weights; see `LogMeanExp`).

Noise: sample j of example i is a fixed function of (seed, purpose, split, i, j)
(randomness.per_example_normal), so results do not depend on the batch size, on how the k
samples are chunked or on the number of processes, and IS_k for a smaller k uses the first k
samples of a larger one. Work is chunked over examples (map_examples) and over samples, so
memory stays bounded whatever k and the dataset size; the networks run in float32 and every
sum over samples is accumulated in float64.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    MixtureSameFamily,
    kl_divergence,
)

from .data import Pipeline, batches
from .distributed import DistContext
from .distributions import (
    base_normal,
    draw_from_noise,
    log_ratio_per_dimension,
    per_dimension,
    reparameterize,
)
from .model import VAE
from .nets import MLPDecoder, join_condition
from .objectives import elbo_terms, iwae_terms
from .randomness import FIXED_BLOCK, SAMPLE_BLOCK, fixed_normal, per_example_normal

CHUNK_ELEMENTS = 2 ** 24  # float32 numbers one chunk's tensors may hold (~64 MiB)
# One decoder pass holds at most this many (16 MiB): activations that stay in the caches instead
# of streaming through memory (benchmarks/likelihood_throughput.py: about 1000 samples of the
# 784-400-20 VAE, where its matrix products run fastest on 1 and on 2 threads).
DECODE_ELEMENTS = 2 ** 22
# Samples of each example in one decoder pass, at the default number of examples per chunk: a
# chunk's bookkeeping per block of samples (noise, log weights, sums in float64) is then shared
# by enough examples to cost little next to decoding.
PASS_SAMPLES = 16
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active if Cov_x(E_q[z_d]) > 0.01
# Examples whose importance weights have an effective sample size below this are flagged: a
# few draws carry the estimate, which is then likely too low and its error bar too small.
LOW_ESS = 10.0


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, subnormal floats (below 1.2e-38) count as zero while the block runs.

    Arithmetic on them takes a slow path in the CPU: a Fashion-MNIST VAE at --lr 3e-3 trained
    its first two epochs at 6,000 images/s instead of 34,000 on them, and to the same numbers
    (every metric equal to all printed digits) with them flushed. Restored afterwards, as
    PyTorch's default leaves it off. Used by training and by evaluate_run; GPUs flush by their own rules and are left alone.
    """
    flushing = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


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


# ------------------------------------------------------------------------------------------------
# Sums over samples, in float64


class MeanSums:
    """Running mean of a per-sample statistic (S, B) over samples, and the variance of that mean.

    Sums are taken around the first block's mean so that large values (log-likelihoods of
    hundreds of nats) with small spread keep their precision.
    """

    def __init__(self):
        self.count = 0
        self.shift = self.total = self.total_sq = None

    def add(self, values: Tensor) -> None:
        values = values.double()  # (S, B)
        if self.shift is None:
            self.shift = values.mean(0)
            self.total = torch.zeros_like(self.shift)
            self.total_sq = torch.zeros_like(self.shift)
        centred = values - self.shift
        self.total += centred.sum(0)
        self.total_sq += centred.square().sum(0)
        self.count += len(values)

    @property
    def mean(self) -> Tensor:
        return self.shift + self.total / self.count  # (B,)

    @property
    def sample_variance(self) -> Tensor:
        """The per-sample variance (unbiased; NaN with one sample). (B,)"""
        if self.count < 2:
            return torch.full_like(self.shift, math.nan)
        return (self.total_sq - self.total.square() / self.count).clamp_min(0) / (self.count - 1)

    @property
    def variance_of_mean(self) -> Tensor:
        return self.sample_variance / self.count  # (B,)


class LogMeanExp:
    """log (1/k) sum_j exp(a_j) per example, streamed over blocks of samples (S, B) in float64.

    Besides the estimate it keeps what its Monte Carlo error needs. With weights w_j = exp(a_j)
    and r_j = w_j / mean(w), the delta method gives Var[log mean w] ~ Var(r) / k, and the
    effective sample size is (sum w)^2 / sum w^2 (Kong 1992): k when all weights agree, 1 when
    one sample carries all the weight, which is when no error bar can be trusted. A companion
    statistic c_j (the ELBO's summand) gets its covariance with r, so the variance of
    log mean w - mean c (the ELBO gap) is known too.
    """

    def __init__(self):
        self.count = 0
        self.max = self.sum_w = self.sum_w2 = None
        self.companion = MeanSums()
        self.sum_wc = None  # sum of w_j (c_j - shift), scaled like sum_w

    def add(self, log_w: Tensor, companion: Tensor | None = None) -> None:
        log_w = log_w.double()  # (S, B)
        if self.max is None:
            self.max = torch.full_like(log_w[0], -math.inf)
            self.sum_w, self.sum_w2 = torch.zeros_like(self.max), torch.zeros_like(self.max)
            self.sum_wc = torch.zeros_like(self.max)
        new_max = torch.maximum(self.max, log_w.max(0).values)
        anchor = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(self.max - anchor)  # 0 while nothing was added (exp(-inf))
        w = torch.exp(log_w - anchor)  # (S, B), at most 1
        self.sum_w = self.sum_w * rescale + w.sum(0)
        self.sum_w2 = self.sum_w2 * rescale.square() + w.square().sum(0)
        if companion is not None:
            self.companion.add(companion)
            centred = companion.double() - self.companion.shift
            self.sum_wc = self.sum_wc * rescale + (w * centred).sum(0)
        self.max = anchor
        self.count += len(log_w)

    @property
    def estimate(self) -> Tensor:
        """log of the mean weight. (B,)"""
        return self.max + torch.log(self.sum_w) - math.log(self.count)

    @property
    def relative_weight_variance(self) -> Tensor:
        """Var(r) of the normalised weights r_j = w_j / mean(w) (unbiased). (B,)"""
        if self.count < 2:
            return torch.full_like(self.max, math.nan)
        k = self.count
        return (k * k * self.sum_w2 / self.sum_w.square() - k) / (k - 1)

    @property
    def variance(self) -> Tensor:
        """Delta-method variance of `estimate`. (B,)"""
        return self.relative_weight_variance / self.count

    @property
    def effective_sample_size(self) -> Tensor:
        return self.sum_w.square() / self.sum_w2  # (B,)

    @property
    def gap_variance(self) -> Tensor:
        """Delta-method variance of estimate - companion mean. (B,)"""
        k = self.count
        if k < 2:
            return torch.full_like(self.max, math.nan)
        covariance = (k * self.sum_wc / self.sum_w - self.companion.total) / (k - 1)
        return (self.relative_weight_variance + self.companion.sample_variance
                - 2 * covariance).clamp_min(0) / k


# ------------------------------------------------------------------------------------------------
# Samples for one batch of examples


def _exact_kl_per_dim(q: Distribution, prior: Distribution) -> Tensor | None:
    """KL(q || p) per latent dimension (B, D) where torch knows it in closed form, else None."""
    try:
        return kl_divergence(per_dimension(q), per_dimension(prior))
    except (NotImplementedError, TypeError):
        return None


@dataclass
class ImportanceBlock:
    """One block of S importance samples for each of B examples."""

    z: Tensor  # (S, B, D) draws from q(z|x)
    log_likelihood: Tensor  # (S, B) log p(x | z_j)
    log_weight: Tensor  # (S, B) log p(x, z_j) - log q(z_j | x)
    kl_per_dim: Tensor  # (S, B, D) log q(z_j,d | x) - log p(z_j,d): the KL's one-sample estimate


def noise_chunks(model: VAE, start: int, examples: int, k: int, key: tuple, block: int,
                 device: torch.device) -> Iterator[Tensor]:
    """N(0, I) noise for samples 0..k-1 of examples start.., in chunks of at most `block`
    samples: (S, B, D) each. Each block of randomness.SAMPLE_BLOCK samples is drawn once."""
    for first in range(0, k, SAMPLE_BLOCK):
        last = min(k, first + SAMPLE_BLOCK)
        eps = per_example_normal((model.latent_dim,), start, start + examples, first, last,
                                 key).to(device)  # (S_block, B, D)
        yield from eps.split(block)


def log_likelihood(model: VAE, z: Tensor, x: Tensor, samples_per_pass: int | None = None,
                   y: Tensor | None = None) -> Tensor:
    """log p(x | z_j [, y]) of every example of x (B, *shape) under each of its codes z
    (S, B, D): (S, B), equal to model.decode(z, y).log_prob(x). y (B,): the labels of a
    conditional model.

    The decoder runs on `samples_per_pass` samples of every example at a time (default:
    decode_samples), so that its activations stay in cache instead of streaming through
    memory. Without gradients, a likelihood with a `scorer` (BernoulliLikelihood) scores the
    decoder's output in place instead of building a distribution per pass; an MLP decoder then
    also writes every layer into buffers reused from pass to pass (_mlp_pass).
    """
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    condition = model.condition(y)  # (B, classes) one-hot, or None
    make_scorer = None if torch.is_grad_enabled() else getattr(model.likelihood, "scorer", None)
    layers = _mlp_layers(model) if make_scorer is not None else None
    if layers is not None:  # the last layer's bias joins the scorer's first pass
        score = make_scorer(x, layers[-1].bias)
    elif make_scorer is not None:
        score = make_scorer(x)
    else:
        def score(params: Tensor) -> Tensor:
            return model.likelihood(params).log_prob(x)
    result, buffers = None, {}
    for first in range(0, len(z), samples_per_pass):
        codes = z[first:first + samples_per_pass]  # (s, B, D)
        if layers is not None:
            inputs = join_condition(codes, condition)  # (s, B, D [+ classes])
            params = _mlp_pass(layers, inputs, buffers).view(
                *codes.shape[:-1], *model.likelihood.params_shape)  # (s, B, *params_shape)
        else:
            params = model.decoder(codes, condition)  # (s, B, *params_shape)
        part = score(params)  # (s, B)
        if result is None:
            result = part.new_empty(z.shape[:-1])  # (S, B)
        result[first:first + len(part)] = part
    return result


def _mlp_layers(model: VAE) -> nn.Sequential | None:
    """The layers of an MLP decoder (of z, joined to the condition of a conditional model)
    whose last layer, a Linear with a bias, gives the likelihood's parameters; None for other
    decoders."""
    net = model.decoder.net if isinstance(model.decoder, MLPDecoder) else None
    inputs = model.latent_dim + (model.num_classes or 0)
    if not isinstance(net, nn.Sequential) or not isinstance(net[0], nn.Linear) or \
            net[0].in_features != inputs:
        return None
    head = net[-1]
    if not isinstance(head, nn.Linear) or head.bias is None:
        return None
    return net


def _mlp_pass(layers: nn.Sequential, codes: Tensor, buffers: dict) -> Tensor:
    """layers(codes (s, B, D)) as (s B, P), but without the last layer's bias. Every Linear
    writes into a buffer of `buffers`, kept from pass to pass, and ReLU works in place: after
    the first pass nothing is allocated, so the passes' memory stays in cache."""
    hidden = codes.reshape(-1, codes.shape[-1])  # (s B, D)
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            out = buffers.get(index)
            if out is None or len(out) < len(hidden):
                out = buffers[index] = hidden.new_empty(len(hidden), layer.out_features)
            out = out[:len(hidden)]  # (s B, out_features)
            if index == last or layer.bias is None:
                hidden = torch.mm(hidden, layer.weight.T, out=out)
            else:
                hidden = torch.addmm(layer.bias, hidden, layer.weight.T, out=out)
        elif isinstance(layer, nn.ReLU):
            hidden = hidden.relu_()
        else:
            hidden = layer(hidden)
    return hidden  # (s B, P)


def importance_blocks(model: VAE, x: Tensor, start: int, k: int, *, seed: int, split: str,
                      block: int, y: Tensor | None = None,
                      samples_per_pass: int | None = None) -> Iterator[ImportanceBlock]:
    """k samples z_j ~ q(z|x) per example of x (B, *shape), in blocks of `block` samples.

    Example start + i of the split gets the noise of that index (see the module doc). y (B,):
    the labels of a conditional model, whose weights then estimate log p(x | y). A prior that
    does not factorise over dimensions (mixture, vamp) has no per-dimension KL: NaN there.
    samples_per_pass: samples of each example decoded at once (see log_likelihood).
    """
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    q = model.encode(x, y)  # batch (B,), event (D,)
    prior = model.prior
    factorised = not isinstance(prior, MixtureSameFamily)
    for eps in noise_chunks(model, start, len(x), k, (seed, "importance", split), block,
                            x.device):
        z = reparameterize(q, eps)  # (S, B, D)
        log_px_given_z = log_likelihood(model, z, x, samples_per_pass, y)  # (S, B)
        if factorised:
            # log q(z|x) - log p(z) per dimension; the sum over dimensions gives the log weight.
            kl_per_dim = log_ratio_per_dimension(q, prior, z, eps)  # (S, B, D)
            log_ratio = kl_per_dim.sum(-1)  # (S, B)
        else:
            log_ratio = q.log_prob(z) - prior.log_prob(z)  # (S, B)
            kl_per_dim = torch.full_like(z, math.nan)  # (S, B, D)
        log_weight = log_px_given_z - log_ratio  # (S, B)
        yield ImportanceBlock(z, log_px_given_z, log_weight, kl_per_dim)


def prior_blocks(model: VAE, x: Tensor, start: int, k: int, *, seed: int, split: str,
                 block: int, y: Tensor | None = None,
                 samples_per_pass: int | None = None) -> Iterator[Tensor]:
    """log p(x | z_j) with z_j ~ p(z), k per example of x, in blocks: (S, B) each.

    A mixture prior picks each draw's component with a second noise stream of its own key."""
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    prior = model.prior
    chunks = noise_chunks(model, start, len(x), k, (seed, "naive", split), block, x.device)
    choices = noise_chunks(model, start, len(x), k, (seed, "naive-component", split), block,
                           x.device) if isinstance(prior, MixtureSameFamily) else None
    for eps in chunks:
        choice = None if choices is None else next(choices)[..., 0]  # (S, B)
        z = draw_from_noise(prior, eps, choice)  # (S, B, D)
        yield log_likelihood(model, z, x, samples_per_pass, y)  # (S, B)


def log_weights(model: VAE, x: Tensor, start: int, k: int, *, seed: int = 0,
                split: str = "test", proposal: str = "posterior",
                block: int | None = None, y: Tensor | None = None) -> Tensor:
    """All k log weights of every example of x, (k, B) float64: log p(x,z)/q(z|x) with z ~ q
    (proposal "posterior") or log p(x|z) with z ~ p(z) (proposal "prior", the naive estimator).
    For sweeps over k on a few examples; `evaluate` streams instead. y: labels (conditional)."""
    if proposal not in ("posterior", "prior"):
        raise ValueError(f"unknown proposal {proposal!r}: choose one of posterior, prior")
    block = block or sample_block(model, k, len(x))
    samples_per_pass = decode_samples(model, len(x))
    with torch.inference_mode():
        if proposal == "posterior":
            parts = [b.log_weight.double() for b in importance_blocks(
                model, x, start, k, seed=seed, split=split, block=block, y=y,
                samples_per_pass=samples_per_pass)]
        else:
            parts = [b.double() for b in prior_blocks(
                model, x, start, k, seed=seed, split=split, block=block, y=y,
                samples_per_pass=samples_per_pass)]
    return torch.cat(parts)  # (k, B)


def log_mean_exp(log_w: Tensor, companion: Tensor | None = None) -> LogMeanExp:
    """The estimator of a whole (k, B) block of log weights, with its error (see LogMeanExp);
    companion (k, B): a per-sample statistic to average alongside (e.g. log_w: the ELBO)."""
    sums = LogMeanExp()
    sums.add(log_w, companion)
    return sums


# ------------------------------------------------------------------------------------------------
# Chunk sizes


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
            model.decoder(torch.zeros(1, model.latent_dim, device=device), condition)
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
    (about 6 numbers per latent dimension, and 24 per sample for the sums)."""
    budget = budget or CHUNK_ELEMENTS
    by_pass = DECODE_ELEMENTS // (decoded_elements_per_sample(model) * PASS_SAMPLES)
    by_memory = budget // (block * (6 * model.latent_dim + 24))
    return max(1, min(by_pass, by_memory))


# ------------------------------------------------------------------------------------------------
# Evaluation of a whole split


SCALARS = ("log_px", "log_px_var", "log_px_ess", "elbo", "elbo_var", "elbo_gap_var",
           "reconstruction", "reconstruction_var", "kl", "kl_var",
           "log_px_naive", "log_px_naive_var", "log_px_naive_ess")


def evaluate_batch(model: VAE, x: Tensor, start: int, *, k: int, seed: int, split: str,
                   naive: bool = True, block: int | None = None,
                   y: Tensor | None = None, samples_per_pass: int | None = None) -> Tensor:
    """Every per-example figure of x (B, *shape) as columns (B, len(SCALARS) + 2 D): SCALARS,
    then the posterior mean E_q[z] (D columns) and the KL per latent dimension (D columns).
    Model space: the pipeline's log-Jacobian is not added here. y (B,): labels of a
    conditional model (the figures are then of log p(x | y))."""
    block = block or sample_block(model, k, len(x))
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    q = model.encode(x, y)
    exact_kl = _exact_kl_per_dim(q, model.prior)  # (B, D) or None
    weights, likelihood, kl_sums = LogMeanExp(), MeanSums(), MeanSums()
    kl_dims = torch.zeros(len(x), model.latent_dim, dtype=torch.float64, device=x.device)
    try:
        posterior_mean = q.mean.double()  # (B, D)
        z_sum = None
    except NotImplementedError:  # a transformed Gaussian: E_q[z] by the same samples
        posterior_mean, z_sum = None, torch.zeros_like(kl_dims)
    for b in importance_blocks(model, x, start, k, seed=seed, split=split, block=block, y=y,
                               samples_per_pass=samples_per_pass):
        if exact_kl is not None:
            # The ELBO's summand with the KL in closed form: lower variance than log w.
            summand = b.log_likelihood.double() - exact_kl.double().sum(-1)  # (S, B)
        else:
            summand = b.log_weight
            kl_dims += b.kl_per_dim.double().sum(0)
            kl_sums.add(b.log_likelihood - b.log_weight)  # log q(z|x) - log p(z)
        weights.add(b.log_weight, companion=summand)
        likelihood.add(b.log_likelihood)
        if z_sum is not None:
            z_sum += b.z.double().sum(0)
    if exact_kl is not None:
        kl_dims = exact_kl.double()
        kl, kl_var = kl_dims.sum(-1), torch.zeros(len(x), dtype=torch.float64, device=x.device)
    else:
        kl_dims = kl_dims / k
        kl, kl_var = kl_sums.mean, kl_sums.variance_of_mean
    if z_sum is not None:
        posterior_mean = z_sum / k
    columns = {
        "log_px": weights.estimate, "log_px_var": weights.variance,
        "log_px_ess": weights.effective_sample_size,
        "elbo": weights.companion.mean, "elbo_var": weights.companion.variance_of_mean,
        "elbo_gap_var": weights.gap_variance,
        "reconstruction": likelihood.mean, "reconstruction_var": likelihood.variance_of_mean,
        "kl": kl, "kl_var": kl_var,
    }
    if naive:
        prior_weights = LogMeanExp()
        for log_px_given_z in prior_blocks(model, x, start, k, seed=seed, split=split,
                                           block=block, y=y, samples_per_pass=samples_per_pass):
            prior_weights.add(log_px_given_z)
        columns.update(log_px_naive=prior_weights.estimate,
                       log_px_naive_var=prior_weights.variance,
                       log_px_naive_ess=prior_weights.effective_sample_size)
    else:
        nan = torch.full((len(x),), math.nan, dtype=torch.float64, device=x.device)
        columns.update(log_px_naive=nan, log_px_naive_var=nan, log_px_naive_ess=nan)
    scalars = torch.stack([columns[name] for name in SCALARS], dim=1)  # (B, len(SCALARS))
    return torch.cat([scalars, posterior_mean, kl_dims], dim=1)


@dataclass
class Evaluation:
    """Per-example figures of one split (model space) and what is needed to report them."""

    per_example: dict[str, Tensor]  # SCALARS -> (N,); posterior_mean, kl_per_dim -> (N, D)
    k: int
    seed: int
    split: str
    naive: bool
    log_jacobian: float  # added to log-densities to give the data's own units
    data_dims: int
    discrete: bool  # the likelihood scores discrete data (bits per dimension make sense)
    kl_exact: bool
    prior_variance: list[float]  # per latent dimension: the scale of the active-unit threshold
    description: str  # what log p(x) is a likelihood of

    @property
    def n(self) -> int:
        return len(self.per_example["log_px"])

    def data_units(self, name: str) -> Tensor:
        """A per-example log-quantity in the data's own units (log-densities get the Jacobian)."""
        values = self.per_example[name]
        if name in ("log_px", "log_px_naive", "elbo", "reconstruction"):
            return values + self.log_jacobian
        return values

    def summary(self) -> dict:
        """Dataset means (nats per example) with Monte Carlo standard errors: the JSON report."""
        n, k = self.n, self.k
        per = self.per_example

        def mean(name: str) -> float:
            return float(self.data_units(name).mean())

        def se(variance: str) -> float:
            return float(per[variance].sum().sqrt() / n) if k > 1 else math.nan

        gap = per["log_px"] - per["elbo"]  # the Jacobian cancels
        posterior_mean = per["posterior_mean"]  # (N, D)
        spread = posterior_mean.var(0) if n > 1 else torch.zeros(posterior_mean.shape[1],
                                                                  dtype=torch.float64)
        threshold = ACTIVE_THRESHOLD * torch.tensor(self.prior_variance, dtype=torch.float64)
        log_px, log_px_se = mean("log_px"), se("log_px_var")
        result = {
            "format": "vaekit-evaluation/1", "split": self.split, "n": n, "k": k,
            "seed": self.seed, "likelihood_of": self.description,
            "units": "nats per example; log-densities in the data's own units",
            "log_px": log_px, "log_px_se": log_px_se,
            "log_px_sd": float(self.data_units("log_px").std()) if n > 1 else 0.0,
            "log_px_ess": float(per["log_px_ess"].mean()),
            "log_px_ess_min": float(per["log_px_ess"].min()),
            "log_px_low_ess": int((per["log_px_ess"] < LOW_ESS).sum()),
            "elbo": mean("elbo"), "elbo_se": se("elbo_var"),
            "reconstruction": mean("reconstruction"),
            "reconstruction_se": se("reconstruction_var"),
            "kl": mean("kl"), "kl_se": 0.0 if self.kl_exact else se("kl_var"),
            "kl_exact": self.kl_exact,
            "elbo_gap": float(gap.mean()), "elbo_gap_se": se("elbo_gap_var"),
        }
        if self.naive:
            result.update(log_px_naive=mean("log_px_naive"),
                          log_px_naive_se=se("log_px_naive_var"),
                          log_px_naive_ess=float(per["log_px_naive_ess"].mean()))
        if self.discrete:
            result.update(bits_per_dim=bits_per_dim(log_px, self.data_dims),
                          bits_per_dim_se=-bits_per_dim(log_px_se, self.data_dims))
        result.update(
            active_units=int((spread > threshold).sum()), latent_dim=len(spread),
            active_threshold=[float(t) for t in threshold],
            posterior_mean_variance=[float(v) for v in spread],
            kl_per_dim=[float(v) for v in per["kl_per_dim"].mean(0)],
            samples={
                "log_px": f"k = {k} importance samples per example from q(z|x) (IWAE bound)",
                "log_px_naive": f"k = {k} samples per example from p(z)" if self.naive
                else "not computed",
                "elbo": f"the same k = {k} samples per example; KL "
                + ("in closed form" if self.kl_exact else "estimated from them"),
                "log_px_ess": "effective sample size (sum w)^2 / sum w^2 of the importance "
                "weights: mean, minimum over examples, examples below 10",
                "active_units": f"{n} examples (covariance over data of E_q[z])",
            })
        return result


def discrete_likelihood(model: VAE, pipeline: Pipeline) -> bool:
    """Whether log p(x) is (a bound on) the log-probability of discrete data: Bernoulli
    likelihoods, or Gaussian densities of dequantised 8-bit pixels in pixel units."""
    return bool(getattr(model.likelihood, "discrete", False)) or pipeline.mode == "dequantize"


def evaluate(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test", k: int = 5000,
             seed: int = 0, naive: bool = True, batch_size: int | None = None,
             device: torch.device | None = None, dist: DistContext | None = None,
             progress: Callable[[int], None] | None = None,
             labels: Tensor | None = None) -> Evaluation:
    """Estimate log p(x), the ELBO and the rest on every example of raw (a split's raw data).

    labels (N,): the classes of a conditional model's examples; every figure is then of
    log p(x | y).
    batch_size: examples per chunk (default: examples_per_chunk).
    Under torchrun pass DistContext.from_env(): chunks are shared out, results are identical.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = device or next(model.parameters()).device
    block = sample_block(model, k)
    batch_size = batch_size or examples_per_chunk(model, block)
    samples_per_pass = decode_samples(model, min(batch_size, len(raw)))
    latent = model.latent_dim
    was_training = model.training
    model.eval()

    def fn(x: Tensor, start: int, stop: int) -> Tensor:
        y = None if labels is None else labels[start:stop].to(x.device)
        return evaluate_batch(model, x, start, k=k, seed=seed, split=split, naive=naive,
                              block=block, y=y, samples_per_pass=samples_per_pass)

    try:
        table = map_examples(fn, raw, pipeline, split, batch_size, device, dist,
                             outputs=len(SCALARS) + 2 * latent, progress=progress).cpu()
    finally:
        model.train(was_training)
    per_example = {name: table[:, i] for i, name in enumerate(SCALARS)}
    per_example["posterior_mean"] = table[:, len(SCALARS): len(SCALARS) + latent]
    per_example["kl_per_dim"] = table[:, len(SCALARS) + latent:]
    with torch.inference_mode():
        y = None if labels is None else labels[:1].to(device)
        q = model.encode(pipeline.fixed(raw[:1].to(device), 0, split), y)
        kl_exact = _exact_kl_per_dim(q, model.prior) is not None
        prior_variance = [float(v) for v in model.prior.variance.cpu()]
    return Evaluation(per_example, k, seed, split, naive, pipeline.log_jacobian,
                      math.prod(model.data_shape), discrete_likelihood(model, pipeline),
                      kl_exact, prior_variance, pipeline.description)


# ------------------------------------------------------------------------------------------------
# The gradient of the ELBO: reparameterisation vs score function (the note's point 16)


@dataclass
class GradientVariance:
    """Spread of `repeats` independent estimates of the gradient of the batch-mean ELBO with
    respect to the encoder's parameters, each from `samples` draws of z per example."""

    estimator: str  # reparameterisation | score-function
    samples: int
    repeats: int
    variance: float  # trace of the covariance: sum over parameters of Var(g_p)
    mean_norm: float  # |mean of the estimates|: the gradient, plus noise of variance / repeats
    parameters: int


def elbo_gradient(model: VAE, x: Tensor, eps: Tensor, estimator: str) -> list[Tensor]:
    """One estimate of d ELBO / d encoder parameters from noise eps (S, B, D).

    reparameterisation: z = loc + scale * eps, differentiate through z (Kingma & Welling 2014).
    score-function (REINFORCE, Williams 1992): E_q[f(z) d log q(z|x)], with z held fixed and no
    baseline or control variate. The KL is differentiated in closed form in both where torch
    knows it, so the two differ only in how they treat the sampled term.
    """
    if estimator not in ("reparameterisation", "score-function"):
        raise ValueError(f"unknown estimator {estimator!r}: choose one of reparameterisation, "
                         "score-function")
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    q, prior = model.encode(x), model.prior
    exact_kl = _exact_kl_per_dim(q, prior)
    if estimator == "reparameterisation":
        z = reparameterize(q, eps)  # (S, B, D), differentiable in the encoder's parameters
        sampled = model.decode(z).log_prob(x)  # (S, B)
        if exact_kl is None:
            sampled = sampled - (q.log_prob(z) - prior.log_prob(z))
        objective = sampled.mean(0)  # (B,)
    else:
        with torch.no_grad():
            z = reparameterize(q, eps)  # (S, B, D), a plain draw: no path to the parameters
            f = model.decode(z).log_prob(x)  # (S, B)
            if exact_kl is None:
                f = f + prior.log_prob(z) - q.log_prob(z)
        objective = (f * _score_log_prob(q, eps)).mean(0)  # (B,)
    if exact_kl is not None:
        objective = objective - exact_kl.sum(-1)
    return list(torch.autograd.grad(objective.mean(), params))


def _score_log_prob(q: Distribution, eps: Tensor) -> Tensor:
    """log q(z) at the fixed draw z made of eps, differentiable in q's parameters only. (S, B)

    For a transformed Gaussian, z = t(g) with g Gaussian: log q(z) = log N(g) - log|t'(g)|, and
    the second term does not depend on the parameters at fixed g, so d log q = d log N(g).
    """
    normal = base_normal(q)  # loc, scale (B, D)
    pre_image = (normal.loc + normal.scale * eps).detach()  # (S, B, D)
    return normal.log_prob(pre_image).sum(-1)  # (S, B)


def gradient_variance(model: VAE, x: Tensor, *, samples: Sequence[int] = (1, 10, 100),
                      repeats: int = 100, seed: int = 0) -> list[GradientVariance]:
    """Both gradient estimators at each sample count, from the same noise (the note's point 16)."""
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    results = []
    was_training = model.training
    model.eval()
    try:
        for count in samples:
            for estimator in ("reparameterisation", "score-function"):
                moments = MeanSums()
                for repeat in range(repeats):
                    eps = per_example_normal((model.latent_dim,), 0, len(x), 0, count,
                                             (seed, "gradient", count, repeat)).to(x.device)
                    grads = elbo_gradient(model, x, eps, estimator)
                    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
                    moments.add(flat.unsqueeze(0))
                variance = float(moments.sample_variance.sum())
                results.append(GradientVariance(estimator, count, repeats, variance,
                                                float(moments.mean.norm()), n_params))
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------
# A run's evaluation (what `vaekit evaluate` computes)


def evaluate_run(run, dataset, *, split: str = "test", k: int = 5000, limit: int | None = None,
                 seed: int = 0, batch_size: int | None = None, naive: bool = True,
                 dist: DistContext | None = None,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate a loaded run (runs.load_run) on its dataset (runs.load_run_dataset): the
    evaluation.json object, labelled with the run, the data and what the likelihood scores."""
    import time

    from . import __version__

    if split not in ("test", "train"):
        raise ValueError(f"unknown split {split!r}: choose one of test, train")
    raw = dataset.test_x if split == "test" else dataset.train_x
    labels = (dataset.test_y if split == "test" else dataset.train_y) \
        if run.config.conditional else None
    if limit is not None:
        raw = raw[:limit]
        labels = None if labels is None else labels[:limit]
    device = next(run.model.parameters()).device
    started = time.monotonic()
    with flush_denormals(device):
        evaluation = evaluate(run.model, raw, run.pipeline, split=split, k=k, seed=seed,
                              naive=naive, batch_size=batch_size, device=device, dist=dist,
                              progress=progress, labels=labels)
    seconds = time.monotonic() - started
    result = evaluation.summary()
    if labels is not None:  # a conditional model: every figure is of log p(x | y)
        result["likelihood_of"] += ", given each example's class label y: log p(x | y)"
    result["conditional"] = labels is not None
    dist = dist or DistContext()
    result.update(run=str(run.path), data=run.data["name"], data_shape=run.data["shape"],
                  likelihood=run.config.likelihood, prior=run.config.prior, net=run.config.net,
                  seconds=seconds, device=str(device), processes=dist.world_size,
                  vaekit_version=__version__)
    return result


def kl_per_dimension(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test",
                     seed: int = 0, samples: int = 16, batch_size: int = 1000,
                     device: torch.device | None = None,
                     dist: DistContext | None = None) -> Tensor:
    """(N, D) float64: KL(q(z_d | x) || p(z_d)) of every example and latent dimension, in nats.

    Posterior and prior factorise over dimensions, so the rows sum to each example's KL. Exact
    where `kl_divergence` knows the pair (Gaussian posterior, normal prior); otherwise the mean
    of `samples` reparameterised draws per example, fixed by (seed, example index). Averaged over
    examples it says how much each dimension is used: near 0, q(z_d | x) is the prior whatever x
    is, and z_d carries no information (a collapsed, inactive unit).
    """
    device = device or next(model.parameters()).device
    prior = per_dimension(model.prior)  # batch (D,)
    dims = model.latent_dim

    def kl(x: Tensor, start: int, stop: int) -> Tensor:
        q = per_dimension(model.encode(x))  # batch (b, D)
        try:
            return kl_divergence(q, prior)  # (b, D)
        except NotImplementedError:
            eps = fixed_normal((samples, dims), start, stop, (seed, "kl-dim-eps", split))
            z = reparameterize(q, eps.transpose(0, 1).to(device))  # (S, b, D)
            return (q.log_prob(z) - prior.log_prob(z)).mean(0)  # (b, D)

    return map_examples(kl, raw, pipeline, split, batch_size, device, dist, outputs=dims)
