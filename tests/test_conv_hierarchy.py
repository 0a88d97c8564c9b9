"""The convolutional hierarchical VAE (conv_hierarchy.py): feature-map groups at two
resolutions through the same latent interface, objectives, estimators and run folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_resumes_exactly

from vaekit.conv_hierarchy import ConvHierarchicalVAE
from vaekit.data import Pipeline
from vaekit.estimate import evaluate, skip_bounds_per_example
from vaekit.hierarchy import GroupView, TopGroupView
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, log_importance_weights

MODEL_SPACE = Pipeline("identity", "real", 0)


def conv_hierarchy(shape=(1, 10, 10), groups=(2, 3), seed: int = 0) -> ConvHierarchicalVAE:
    torch.manual_seed(seed)
    model = build_vae(ModelConfig(data_shape=shape, latent_dim=sum(groups), net="conv",
                                  conv_channels=[8], latent_groups=list(groups),
                                  likelihood="gaussian", gaussian_scale=0.5)).double()
    with torch.no_grad():  # trained-looking weights: posteriors and priors away from N(0, 1)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_groups_are_feature_maps_at_a_quarter_and_half_of_the_side():
    """28 x 28: the top half of the groups at 7 x 7, the rest at 14 x 14; odd sides round up
    (stride-2 convolutions), and one group sits at the coarse resolution."""
    model = build_vae(ModelConfig(data_shape=(1, 28, 28), latent_dim=7, net="conv",
                                  latent_groups=[1, 2, 4], likelihood="bernoulli"))
    assert isinstance(model, ConvHierarchicalVAE)
    assert model.latent_groups == (("z1", 49), ("z2", 98), ("z3", 4 * 196))
    assert model.code_dim == 64 * 196  # the last state, 64 channels (the default) at 14 x 14
    odd = conv_hierarchy(shape=(3, 9, 11), groups=(2, 3))
    assert odd.resolutions == [(3, 3), (5, 6)]
    single = conv_hierarchy(groups=(4,))
    assert single.latent_groups == (("z1", 4 * 9),) and single.last_resolution == (3, 3)
    assert single.sample(2).shape == (2, 1, 10, 10)


def test_the_elbo_is_reconstruction_minus_each_groups_kl_given_the_groups_above():
    model = conv_hierarchy()
    x = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        eps = torch.randn(4, model.latent_dim, dtype=torch.float64)
        draw = model.infer(x).draw(eps)
        terms = elbo_terms(model, x, eps)
        reconstruction = model.decode(draw.code).log_prob(x)
        assert torch.allclose(terms.reconstruction, reconstruction)
        assert torch.allclose(terms.kl, sum(group.kl() for group in draw.groups))
        # each closed-form KL is the mean of its log-ratio over draws of that group alone
        inference = model.infer(x)
        fixed = torch.randn(4, model.latent_dim, dtype=torch.float64)
        top_dim = model.groups_sizes[0]
        draws = torch.randn(4000, 4, model.latent_dim, dtype=torch.float64)
        draws[..., :top_dim] = fixed[:, :top_dim]  # the top group fixed, the bottom one drawn
        bottom = inference.draw(draws).groups[1]
        ratio = bottom.log_ratio()  # (4000, 4)
        closed = inference.draw(fixed).groups[1].kl()  # (4,)
    se = ratio.std(0) / math.sqrt(len(ratio))
    assert float(((ratio.mean(0) - closed) / se).abs().max()) < 4.5


def test_importance_sampling_bounds_and_converges():
    """With every posterior at its prior (the posterior networks' outputs zero)
    and a decoder that leans on z only a little, IS weights are well behaved: k = 4000 lands
    within 4 s.e. of k = 16000 on every example, both above the ELBO (by the KL-free gap)."""
    model = conv_hierarchy()
    with torch.no_grad():
        for group in model.top_down:
            group.posterior_out.weight.zero_()
            group.posterior_out.bias.zero_()
        model.decoder.out.weight.mul_(0.3)
        x = model.sample(6)  # (6, 1, 10, 10) data of the model itself
    low = evaluate(model, x, MODEL_SPACE, k=4000, naive=False, seed=1)
    high = evaluate(model, x, MODEL_SPACE, k=16000, naive=False, seed=2)
    a, b = low.per_example["log_px"], high.per_example["log_px"]
    se = (low.per_example["log_px_var"] + high.per_example["log_px_var"]).sqrt()
    assert float(((a - b).abs() / se).max()) < 4.5
    assert bool((b > low.per_example["elbo"]).all())
    # q is p up to the second application of the log-scale bound: a KL near zero
    assert float(low.per_example["kl"].abs().max()) < 1e-2
    with torch.no_grad():
        log_px_z, log_ratio = log_importance_weights(
            model, x, torch.randn(3, 6, model.latent_dim, dtype=torch.float64))
    assert log_px_z.shape == log_ratio.shape == (3, 6)


def test_group_views_and_skipped_groups_work_on_feature_maps():
    model = conv_hierarchy()
    x = torch.randn(3, 1, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        top = TopGroupView(model)
        assert top.latent_dim == model.groups_sizes[0] and top.detail_dim == model.groups_sizes[1]
        assert top.decode(top.encode(x).base_dist.loc).mean.shape == (3, 1, 10, 10)
        bottom = GroupView(model, 1, x[:1])
        u = bottom.encode(x[:1]).base_dist.loc  # (1, D_2)
        assert torch.allclose(bottom.decode(u).mean, model.reconstruct(x[:1]), atol=1e-8)
        bounds = skip_bounds_per_example(model, x, MODEL_SPACE, 64)  # (3, 2)
    assert bounds.shape == (3, 2) and torch.isfinite(bounds).all()


def test_options_are_checked(vaekit_cli, tmp_path):
    result = vaekit_cli("train", "--net", "conv", "--latent-groups", "2,3", "--conditional",
                        "--out", tmp_path / "c")
    assert result.returncode == 2 and "is unconditional" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_a_conv_hierarchy_trains_resumes_exactly_samples_and_evaluates(vaekit_cli, tmp_path):
    common = ["--net", "conv", "--latent-groups", "2,3", "--conv-channels", "8",
              "--batch-size", "256", "--no-progress"]
    straight = assert_resumes_exactly(vaekit_cli, tmp_path, common)
    config = json.loads((straight / "config.json").read_text())["config"]
    assert config["net"] == "conv" and config["latent_groups"] == [2, 3]
    result = vaekit_cli("sample", straight, "-n", "8", "--temperature", "0.7", "--out",
                        tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    result = vaekit_cli("evaluate", straight, "--k", "32", "--limit", "20")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((straight / "evaluation.json").read_text())
    assert evaluation["log_px"] >= evaluation["elbo"]
    # digits are 8 x 8: z1 at 2 x 2 (2 channels), z2 at 4 x 4 (3 channels)
    assert [(g["name"], g["dims"]) for g in evaluation["latent_groups"]] == [("z1", 8),
                                                                            ("z2", 48)]
    for command in (("traverse", straight, "--out", tmp_path / "t.png"),
                    ("traverse", straight, "--group", "z2", "--base", "0", "--dims", "0,1",
                     "--out", tmp_path / "t2.png"),
                    ("reconstruct", straight, "--out", tmp_path / "r.png")):
        result = vaekit_cli(*command)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic-mixture"])
def test_image_likelihoods_get_their_parameters(likelihood):
    model = build_vae(ModelConfig(data_shape=(3, 8, 8), latent_dim=5, net="conv",
                                  conv_channels=[8], latent_groups=[2, 3],
                                  likelihood=likelihood))
    x = torch.rand(2, 3, 8, 8).round() if likelihood == "bernoulli" else \
        torch.randint(0, 256, (2, 3, 8, 8)).float() / 255
    with torch.no_grad():
        terms = elbo_terms(model, x)
    assert torch.isfinite(terms.reconstruction).all() and terms.reconstruction.shape == (2,)
