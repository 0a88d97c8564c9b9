"""The VAE object: three distributions and two networks, and its save/load."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Distribution

from vaekit.model import ModelConfig, build_vae
from vaekit.runs import load_state, model_weights_bytes, tensors_from_file


@pytest.mark.parametrize("net,data_shape", [("mlp", (6,)), ("mlp", (1, 8, 8)),
                                            ("conv", (1, 8, 8)), ("conv", (3, 16, 16))])
@pytest.mark.parametrize("prior", ["normal", "uniform"])
def test_encode_decode_sample_shapes(net, data_shape, prior):
    likelihood = "gaussian" if len(data_shape) == 1 else "bernoulli"
    model = build_vae(ModelConfig(data_shape=data_shape, latent_dim=3, net=net, hidden=[16],
                                  prior=prior, likelihood=likelihood))
    x = torch.rand(5, *data_shape).round()
    q = model.encode(x)
    assert isinstance(q, Distribution) and q.batch_shape == (5,) and q.event_shape == (3,)
    px = model.decode(q.rsample())
    assert isinstance(px, Distribution) and px.event_shape == data_shape
    assert isinstance(model.prior, Distribution) and model.prior.event_shape == (3,)
    assert model.sample(4).shape == (4, *data_shape)
    assert model.sample(4, mean=True).shape == (4, *data_shape)
    assert model.reconstruct(x).shape == x.shape
    if prior == "uniform":
        z = q.rsample((100,))
        assert bool(((z >= 0) & (z <= 1)).all())  # the posterior lives inside the cube


def test_sample_draws_z_from_model_prior():
    """Sampling goes through model.prior: a prior that always gives z0 makes every sample E[x|z0]."""
    model = build_vae(ModelConfig(data_shape=(4,), latent_dim=2, hidden=[], likelihood="gaussian"))
    z0 = torch.tensor([0.7, -1.2])

    class PointPrior(torch.nn.Module):
        latent_dim = 2

        def forward(self):
            return torch.distributions.Independent(
                torch.distributions.Normal(z0, torch.full((2,), 1e-12)), 1)

    model.prior_module = PointPrior()
    expected = model.decode(z0).mean
    assert torch.allclose(model.sample(3, mean=True), expected.expand(3, 4), atol=1e-5)


def test_save_then_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(data_shape=(1, 8, 8), latent_dim=4, net="conv", hidden=[16],
                         likelihood="gaussian")
    model = build_vae(config)
    path = tmp_path / "model.safetensors"
    path.write_bytes(model_weights_bytes(model))
    copy = build_vae(config)  # different random initialisation
    load_state(copy, tensors_from_file(path), path)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.encode(x).mean, copy.encode(x).mean)
    z = torch.randn(3, 4)
    assert torch.equal(model.decode(z).mean, copy.decode(z).mean)
    assert torch.equal(model.likelihood.log_scale, copy.likelihood.log_scale)


@pytest.mark.parametrize("net,data_shape", [("mlp", (6,)), ("conv", (1, 8, 8)),
                                            ("conv", (3, 12, 10))])
def test_conditional_model_shapes_and_labels(net, data_shape):
    likelihood = "gaussian" if len(data_shape) == 1 else "logistic-mixture"
    model = build_vae(ModelConfig(data_shape=data_shape, latent_dim=3, net=net, hidden=[16],
                                  likelihood=likelihood, likelihood_components=2, num_classes=4))
    x = torch.rand(5, *data_shape).mul(255).round().div(255)
    y = torch.tensor([0, 1, 2, 3, 1])
    q = model.encode(x, y)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    z = q.rsample((7,))  # (7, 5, 3): sample dims pass through the conditional decoder
    assert model.decode(z, y).batch_shape == (7, 5)
    assert model.sample(4, 2).shape == (4, *data_shape)  # one label for all
    assert model.sample(4, torch.tensor([0, 1, 2, 3]), mean=True).shape == (4, *data_shape)
    assert model.reconstruct(x, y).shape == x.shape
    # the label changes what the decoder says
    z0 = torch.zeros(2, 3)
    assert not torch.allclose(model.decode(z0, torch.tensor([0, 0])).mean,
                              model.decode(z0, torch.tensor([3, 3])).mean)


def test_conditional_model_checks_its_labels_and_unconditional_stays_compatible():
    conditional = build_vae(ModelConfig(data_shape=(4,), latent_dim=2, hidden=[8],
                                        likelihood="gaussian", num_classes=3))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="conditional: pass class labels"):
        conditional.encode(x)
    with pytest.raises(ValueError, match="integers 0..2"):
        conditional.encode(x, torch.tensor([0, 3]))
    plain = build_vae(ModelConfig(data_shape=(4,), latent_dim=2, hidden=[8],
                                  likelihood="gaussian"))
    assert plain.encode(x).batch_shape == (2,) and plain.sample(3).shape == (3, 4)
    with pytest.raises(ValueError, match="not conditional"):
        plain.encode(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vamp"):
        build_vae(ModelConfig(data_shape=(4,), prior="vamp", num_classes=3))


@pytest.mark.parametrize("prior", ["mixture", "vamp"])
def test_learned_priors_save_and_load(tmp_path, prior):
    torch.manual_seed(1)
    config = ModelConfig(data_shape=(1, 8, 8), latent_dim=3, net="conv", hidden=[16],
                         prior=prior, prior_components=6, likelihood="categorical")
    model = build_vae(config)
    path = tmp_path / "model.safetensors"
    path.write_bytes(model_weights_bytes(model))
    copy = build_vae(config)
    load_state(copy, tensors_from_file(path), path)
    z = torch.randn(5, 3)
    assert torch.equal(model.prior.log_prob(z), copy.prior.log_prob(z))
    # the VampPrior of the copy runs the copy's encoder, not the original's
    if prior == "vamp":
        with torch.no_grad():
            copy.encoder.head[0].bias.add_(1.0)
        assert not torch.equal(model.prior.log_prob(z), copy.prior.log_prob(z))


def test_model_fields_are_the_training_options_with_their_defaults_written_once():
    import dataclasses

    from vaekit.config import TrainConfig

    options = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model = ModelConfig(data_shape=(3,))
    for name in ModelConfig.model_fields():
        assert name in options, name
        if name != "likelihood":  # the option's "auto" is settled from the data first
            assert getattr(model, name) == getattr(TrainConfig(), name), name
    assert model.likelihood == "bernoulli"
    assert ModelConfig((3,)).hidden is not ModelConfig((3,)).hidden  # each its own list
