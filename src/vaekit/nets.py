"""Encoder and decoder networks: plain modules from x to parameters and from z to parameters.

They know nothing of distributions: an encoder returns the numbers a posterior family asks for
(`params_per_example`), a decoder returns a tensor of the likelihood's `params_shape`.

A conditional model passes a `condition` (B, F), a one-hot class label, to both: the encoder
joins it to its flattened input (MLP) or to the flattened convolutional features (conv), the
decoder to z. Built with condition_features=0 (the default), the nets take no condition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "softplus": nn.Softplus}


# Activations whose gradient reads their output, not their input: they may overwrite a tensor
# that nothing else holds (a layer's fresh output) and save a buffer of its size per call.
IN_PLACE = ("relu", "elu")


def activation(name: str, fresh_input: bool = False) -> nn.Module:
    """The activation `name`; fresh_input: it is only ever applied to a tensor nothing else
    reads (the output of the layer before it), so ReLU and ELU may work in place."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    if fresh_input and name in IN_PLACE:
        return ACTIVATIONS[name](inplace=True)
    return ACTIVATIONS[name]()


def mlp(in_features: int, hidden: list[int], out_features: int, act: str) -> nn.Sequential:
    """Linear layers with `act` between them; no activation after the last (it gives parameters)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), activation(act, fresh_input=True)]
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def join_condition(features: Tensor, condition: Tensor | None) -> Tensor:
    """features (..., B, F1) and condition (B, F2) -> (..., B, F1 + F2); no condition: unchanged."""
    if condition is None:
        return features
    return torch.cat([features, condition.expand(*features.shape[:-1], -1)], dim=-1)


class MLPEncoder(nn.Module):
    """x (B, *data_shape) [+ condition (B, F)] -> flatten -> MLP -> (B, out_features)."""

    def __init__(self, data_shape: tuple[int, ...], hidden: list[int], out_features: int,
                 act: str = "relu", condition_features: int = 0):
        super().__init__()
        self.net = mlp(math.prod(data_shape) + condition_features, hidden, out_features, act)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(join_condition(x.flatten(1), condition))  # (B, out_features)


class MLPDecoder(nn.Module):
    """z (..., B, D) [+ condition (B, F)] -> MLP -> (..., B, *params_shape)."""

    def __init__(self, latent_dim: int, hidden: list[int], params_shape: tuple[int, ...],
                 act: str = "relu", condition_features: int = 0):
        super().__init__()
        self.params_shape = tuple(params_shape)
        self.net = mlp(latent_dim + condition_features, list(reversed(hidden)),
                       math.prod(params_shape), act)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        out = self.net(join_condition(z, condition))  # (..., P)
        return out.view(*z.shape[:-1], *self.params_shape)  # (..., *params_shape)


def conv_plan(image_hw: tuple[int, int], channels: list[int] | None) -> tuple[list[int], list]:
    """Channels per stride-2 stage and the feature-map sizes they produce.

    Each 3x3, stride-2, padding-1 convolution maps a side n to ceil(n / 2), so every size works;
    the default doubles channels from 32 (capped at 256) until the map is at most 8 x 8.
    sizes[i] is the (H, W) entering stage i; sizes[-1] is the final map.
    """
    height, width = image_hw
    if channels is None:
        channels = []
        while max(height, width) > 8 or not channels:
            channels.append(min(32 * 2 ** len(channels), 256))
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        height, width = image_hw
    sizes = [(height, width)]
    for _ in channels:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        sizes.append((height, width))
    return list(channels), sizes


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> stride-2 convolutions -> flatten [+ condition] -> MLP -> (B, out)."""

    def __init__(self, data_shape: tuple[int, ...], hidden: list[int], out_features: int,
                 act: str = "relu", channels: list[int] | None = None,
                 condition_features: int = 0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"conv nets need images shaped (C, H, W), got {tuple(data_shape)}")
        in_channels, height, width = data_shape
        channels, sizes = conv_plan((height, width), channels)
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
                       activation(act)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        final_h, final_w = sizes[-1]
        self.head = mlp(in_channels * final_h * final_w + condition_features, hidden,
                        out_features, act)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        features = self.features(x)  # (B, C_last, h, w)
        return self.head(join_condition(features.flatten(1), condition))  # (B, out_features)


class ConvDecoder(nn.Module):
    """z (B, D) [+ condition] -> MLP -> (B, C_last, h, w) -> transposed convolutions -> params.

    Mirrors ConvEncoder: each transposed convolution doubles a side, with output_padding 0 or 1
    chosen per stage so the sizes retrace the encoder's exactly (7 -> 14 -> 28, 4 -> 7, ...).
    The last stage outputs prod(params_shape) / (H * W) channels, reshaped to params_shape.
    """

    def __init__(self, latent_dim: int, hidden: list[int], params_shape: tuple[int, ...],
                 data_shape: tuple[int, ...], act: str = "relu",
                 channels: list[int] | None = None, condition_features: int = 0):
        super().__init__()
        _, height, width = data_shape
        channels, sizes = conv_plan((height, width), channels)
        self.params_shape = tuple(params_shape)
        out_channels = math.prod(params_shape) // (height * width)
        self.start_shape = (channels[-1], *sizes[-1])
        self.head = mlp(latent_dim + condition_features, list(reversed(hidden)),
                        math.prod(self.start_shape), act)
        layers: list[nn.Module] = [activation(act)]
        stage_outputs = list(reversed(channels[:-1])) + [out_channels]
        in_channels = channels[-1]
        for stage, next_channels in enumerate(stage_outputs):
            (in_h, in_w), (out_h, out_w) = sizes[-1 - stage], sizes[-2 - stage]
            padding = (out_h - (2 * in_h - 1), out_w - (2 * in_w - 1))  # each 0 or 1
            layers.append(nn.ConvTranspose2d(in_channels, next_channels, 3, stride=2, padding=1,
                                             output_padding=padding))
            if stage < len(stage_outputs) - 1:
                layers.append(activation(act))
            in_channels = next_channels
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        batch_shape = z.shape[:-1]
        inputs = join_condition(z, condition)  # (..., B, D + F)
        hidden = self.head(inputs.reshape(-1, inputs.shape[-1]))  # (N, C_last * h * w)
        maps = self.features(hidden.view(-1, *self.start_shape))  # (N, P, H, W)
        return maps.reshape(*batch_shape, *self.params_shape)  # (..., *params_shape)


def build_encoder(net: str, data_shape: tuple[int, ...], hidden: list[int], out_features: int,
                  act: str, conv_channels: list[int] | None = None,
                  condition_features: int = 0) -> nn.Module:
    if net == "mlp":
        return MLPEncoder(data_shape, hidden, out_features, act, condition_features)
    if net == "conv":
        return ConvEncoder(data_shape, hidden, out_features, act, conv_channels,
                           condition_features)
    raise ValueError(f"unknown net {net!r}: choose one of mlp, conv")


def build_decoder(net: str, latent_dim: int, hidden: list[int], params_shape: tuple[int, ...],
                  data_shape: tuple[int, ...], act: str,
                  conv_channels: list[int] | None = None,
                  condition_features: int = 0) -> nn.Module:
    if net == "mlp":
        return MLPDecoder(latent_dim, hidden, params_shape, act, condition_features)
    if net == "conv":
        return ConvDecoder(latent_dim, hidden, params_shape, data_shape, act, conv_channels,
                           condition_features)
    raise ValueError(f"unknown net {net!r}: choose one of mlp, conv")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

