"""Encoders and decoders: the shapes they map between, for MLP and convolutional nets."""

from __future__ import annotations

import pytest
import torch

from vaekit.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, conv_plan


@pytest.mark.parametrize("data_shape", [(5,), (1, 8, 8), (3, 4, 6)])
@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
def test_mlp_shapes(data_shape, hidden):
    encoder = MLPEncoder(data_shape, hidden, out_features=6)
    decoder = MLPDecoder(3, hidden, params_shape=data_shape)
    x = torch.randn(4, *data_shape)
    assert encoder(x).shape == (4, 6)
    assert decoder(torch.randn(4, 3)).shape == (4, *data_shape)
    assert decoder(torch.randn(7, 4, 3)).shape == (7, 4, *data_shape)  # sample dims pass through


@pytest.mark.parametrize("side", [8, 28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_nets_adapt_to_image_size(side, channels):
    data_shape = (channels, side, side)
    encoder = ConvEncoder(data_shape, [32], out_features=8)
    decoder = ConvDecoder(4, [32], params_shape=data_shape, data_shape=data_shape)
    x = torch.rand(2, *data_shape)
    assert encoder(x).shape == (2, 8)
    assert decoder(torch.randn(2, 4)).shape == (2, *data_shape)
    assert decoder(torch.randn(3, 2, 4)).shape == (3, 2, *data_shape)


@pytest.mark.parametrize("hw", [(28, 20), (17, 33), (5, 9)])
def test_conv_nets_handle_non_square_and_odd_sizes(hw):
    data_shape = (1, *hw)
    decoder = ConvDecoder(2, [], params_shape=data_shape, data_shape=data_shape)
    assert decoder(torch.randn(2, 2)).shape == (2, *data_shape)
    assert ConvEncoder(data_shape, [], 4)(torch.rand(2, *data_shape)).shape == (2, 4)


def test_conv_plan_default_stops_at_eight():
    assert conv_plan((28, 28), None) == ([32, 64], [(28, 28), (14, 14), (7, 7)])
    assert conv_plan((8, 8), None)[0] == [32]
    channels, sizes = conv_plan((128, 128), None)
    assert channels == [32, 64, 128, 256] and sizes[-1] == (8, 8)
    assert conv_plan((28, 28), [16])[1] == [(28, 28), (14, 14)]


def test_decoder_params_shape_may_have_extra_leading_dims():
    """A likelihood with several numbers per pixel (e.g. mixtures) asks for (K, C, H, W)."""
    decoder = ConvDecoder(3, [8], params_shape=(5, 1, 12, 12), data_shape=(1, 12, 12))
    assert decoder(torch.randn(2, 3)).shape == (2, 5, 1, 12, 12)


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (128, 128), (48, 80), (31, 17)])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_nets_with_a_condition_and_a_mixture_likelihood(hw, channels):
    """The sizes users bring, square or not, grey or RGB, with 2 * C + 1 numbers per component
    (the logistic mixture's parameters) and a one-hot label joined to features and to z."""
    from vaekit.distributions import LogisticMixtureLikelihood

    data_shape = (channels, *hw)
    params_shape = LogisticMixtureLikelihood(data_shape, components=2).params_shape
    encoder = ConvEncoder(data_shape, [16], out_features=6, condition_features=5)
    decoder = ConvDecoder(3, [16], params_shape, data_shape, condition_features=5)
    condition = torch.nn.functional.one_hot(torch.tensor([1, 4]), 5).float()
    assert encoder(torch.rand(2, *data_shape), condition).shape == (2, 6)
    assert decoder(torch.randn(2, 3), condition).shape == (2, *params_shape)
    assert decoder(torch.randn(4, 2, 3), condition).shape == (4, 2, *params_shape)


def test_mlp_nets_join_the_condition():
    encoder = MLPEncoder((1, 4, 4), [8], out_features=6, condition_features=3)
    decoder = MLPDecoder(2, [8], params_shape=(1, 4, 4), condition_features=3)
    condition = torch.eye(3)[[0, 2]]  # (2, 3)
    assert encoder(torch.rand(2, 1, 4, 4), condition).shape == (2, 6)
    assert decoder(torch.randn(5, 2, 2), condition).shape == (5, 2, 1, 4, 4)
    with pytest.raises(RuntimeError):
        encoder(torch.rand(2, 1, 4, 4))  # built for a condition, called without one
