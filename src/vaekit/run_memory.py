"""The memory a training run will take, estimated before it starts, and a refusal when it will
not fit.

    weights     parameters, their gradients and Adam's two moments: 4 copies of the weights
    activations what autograd keeps of one batch for the backward pass, measured by running the
                training objective on PROBE examples with a saved-tensors hook (tensors that
                are weights, or views of one storage, counted once), scaled to the batch, and
                doubled: the backward pass holds gradients of about the same size while it
                frees the saved tensors
    data        the training and test data held in memory (nothing for mapped data)

The total is compared with vaekit's memory limit (budget.memory_limit: half of RAM unless
VAEKIT_MEMORY_LIMIT says otherwise). A run over it is refused in one line that names the parts
and the largest --batch-size that fits. On an accelerator the activations live in its memory,
not the host's: there only weights and data are checked against the host's limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .budget import check_bytes, human, memory_limit
from .errors import ConfigError

PROBE = 2  # examples the activation probe runs; per-example sizes are its bytes / PROBE
BACKWARD_FACTOR = 2  # saved activations plus the gradients the backward pass holds beside them


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes: parameters, gradients, Adam moments
    activations_per_example: int  # bytes autograd saves per example, times BACKWARD_FACTOR
    batch: int  # examples per step on this process
    data: int  # bytes of data held in memory

    @property
    def activations(self) -> int:
        return self.activations_per_example * self.batch

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data

    def largest_batch(self, limit: int) -> int:
        """The largest batch whose run fits in `limit` bytes (0 if none does)."""
        room = limit - self.weights - self.data
        return max(0, room // max(1, self.activations_per_example))

    def describe(self) -> str:
        return (f"weights and Adam {human(self.weights)}, activations of a batch of "
                f"{self.batch} {human(self.activations)}, data {human(self.data)}")


def saved_bytes(function, parameters: list[nn.Parameter]) -> int:
    """Bytes of the tensors autograd saves while `function()` runs, each storage once, the
    weights (saved by every layer, but held anyway) left out."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in weights and tensor.device.type != "meta":
            seen[pointer] = max(seen.get(pointer, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(seen.values())


def estimate_training_memory(objective: nn.Module, model: nn.Module, x: torch.Tensor,
                             y: torch.Tensor | None, noise_shape: tuple[int, ...], batch: int,
                             data_bytes: int, device: torch.device) -> MemoryEstimate:
    """The estimate for steps of `batch` examples: x (PROBE, *shape) are model inputs (through
    the pipeline), y their labels or None; objective(x, y, eps) as Trainer calls it."""
    parameters = list(model.parameters())
    weights = 4 * sum(p.numel() * p.element_size() for p in parameters)
    per_example = 0
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            eps = torch.randn(len(x), *noise_shape)  # (PROBE, *noise_shape)

            def step():
                reconstruction, kl, _ = objective(x, y, eps)
                return (reconstruction - kl).mean()

            was_training = model.training
            model.train()
            try:
                saved = saved_bytes(step, parameters)
            finally:
                model.train(was_training)
        per_example = BACKWARD_FACTOR * math.ceil(saved / len(x))
    return MemoryEstimate(weights, per_example, batch, data_bytes)


def check_training_memory(estimate: MemoryEstimate, what: str) -> None:
    """Refuse a run whose estimate is over the memory limit, in one line with the fix.

    what: the options that decide the size, e.g. "--net conv --likelihood categorical on
    3x48x48 images"."""
    limit = memory_limit()
    if estimate.total <= limit:
        return
    fits = estimate.largest_batch(limit)
    if estimate.activations and fits >= 1:
        fix = (f"use --batch-size {_round_down(fits)} or less, or a likelihood with fewer "
               "outputs per value (--likelihood discretized-logistic: 2 a value)")
    else:
        fix = "use a smaller model (--hidden, --conv-channels, --latent-dim) or smaller images " \
            "(--image-size)"
    check_bytes(f"this run ({what}: {estimate.describe()})", estimate.total, fix, ConfigError)


def _round_down(n: int) -> int:
    """n rounded down to a power of two below 64 or a multiple of 16 from there (batch sizes
    people type)."""
    if n >= 64:
        return n - n % 16
    return 1 << (n.bit_length() - 1)
