"""The decoder fast path of estimators: log p(x | z_j) for many codes of the same examples.

Without gradients, a likelihood with a `scorer` scores the decoder's output in place, and an MLP
decoder writes every layer into buffers reused from pass to pass; everything else takes the
distribution's own `log_prob`. The result always equals model.decode(z, y).log_prob(x).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import VAE
from ..nets import MLPDecoder, join_condition
from .chunks import decode_samples


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
    inputs = model.code_dim + (model.num_classes or 0)
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
