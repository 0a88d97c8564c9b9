"""The hierarchical VAE: its densities against quadrature, its bounds, temperature, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_resumes_exactly

from vaekit.estimate import evaluate
from vaekit.hierarchy import HierarchicalVAE
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, log_importance_weights


def tiny_hierarchy(seed: int = 0) -> HierarchicalVAE:
    """Two groups of one dimension each on 2-d Gaussian data: small enough to integrate."""
    torch.manual_seed(seed)
    model = build_vae(ModelConfig(data_shape=(2,), latent_dim=2, hidden=[16],
                                  latent_groups=[1, 1], likelihood="gaussian",
                                  gaussian_scale=0.3)).double()
    with torch.no_grad():  # trained-looking weights: posteriors and priors away from N(0, 1)
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def log_joint_on_grid(model: HierarchicalVAE, x: torch.Tensor, grid: torch.Tensor
                      ) -> torch.Tensor:
    """log p(x, z1, z2) on every point of grid x grid, from the generative parts alone:
    p(z1) p(z2 | z1) p(x | z1, z2), the top-down path written out. (G, G) for one x (1, 2)"""
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
    z1, z2 = z1.reshape(-1, 1, 1), z2.reshape(-1, 1, 1)  # (G^2, 1, 1): sample dims first
    state = model.initial_state(z1.shape[:-1], None, z1)  # (G^2, 1, W)
    top, bottom = model.top_down
    log_p = top.prior(state).log_prob(z1)  # (G^2, 1)
    state = top.merge(state, z1)
    log_p = log_p + bottom.prior(state).log_prob(z2)
    state = bottom.merge(state, z2)
    log_p = log_p + model.decode(state).log_prob(x)
    return log_p.view(len(grid), len(grid))


def test_importance_sampling_of_a_hierarchy_reaches_its_log_px_by_quadrature():
    model = tiny_hierarchy()
    x = torch.tensor([[0.4, -0.8]], dtype=torch.float64)
    grid = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    cell = float(grid[1] - grid[0]) ** 2
    with torch.no_grad():
        exact = float(torch.logsumexp(log_joint_on_grid(model, x, grid).flatten(), 0)
                      + math.log(cell))
        eps = torch.randn(20000, 1, 2, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
        log_px_z, log_ratio = log_importance_weights(model, x, eps)  # (S, 1) each
        log_w = (log_px_z - log_ratio).squeeze(1)  # (S,)
    estimate = float(torch.logsumexp(log_w, 0) - math.log(len(log_w)))
    # the delta-method standard error of a log-mean-exp: sd(w) / (sqrt(S) mean(w))
    weights = (log_w - log_w.max()).exp()
    standard_error = float(weights.std() / (math.sqrt(len(weights)) * weights.mean()))
    assert abs(estimate - exact) < 4 * standard_error + 1e-3
    # the ELBO, E_q[log w], is below log p(x) by KL(q || p(z|x)) > 0
    elbo = float(log_w.mean())
    assert elbo < exact


def test_the_elbo_is_reconstruction_minus_each_groups_kl_given_the_groups_above():
    model = tiny_hierarchy(seed=2)
    x = torch.randn(5, 2, dtype=torch.float64)
    eps = torch.randn(5, 2, dtype=torch.float64)
    draw = model.infer(x).draw(eps)
    assert [group.name for group in draw.groups] == ["z1", "z2"]
    terms = elbo_terms(model, x, eps)
    assert torch.allclose(terms.kl, draw.groups[0].kl() + draw.groups[1].kl())
    # the closed-form KL of each group is the mean of its log-ratio over draws of that group
    many = torch.randn(40000, 5, 2, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    many[..., 0] = eps[:, 0]  # the top group fixed: the bottom group's KL given it
    bottom = model.infer(x).draw(many).groups[1]
    log_ratio = bottom.log_ratio()  # (S, 5)
    standard_error = log_ratio.std(0) / math.sqrt(len(many))
    assert bool(((log_ratio.mean(0) - draw.groups[1].kl()).abs()
                 < 4 * standard_error + 1e-6).all())


def test_temperature_scales_every_groups_prior_noise():
    model = tiny_hierarchy(seed=4)
    generator = torch.Generator().manual_seed(5)
    eps = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        cold = model.sample_codes(6, 0.0)
        # T = 0: every group at its prior mean given the groups above: one code for all draws
        assert torch.allclose(cold, cold[:1].expand_as(cold))
        tempered = model.prior_draws().latents(0.5 * eps)
        top = tempered[:, 0]
        assert torch.allclose(top, 0.5 * eps[:, 0])  # the top prior is N(0, 1): z1 = T eps
        codes = model.sample_codes(6, 0.5, torch.Generator().manual_seed(5))
        assert torch.allclose(codes, model.generate(0.5 * eps))


def test_an_evaluation_of_a_hierarchy_bounds_log_px_by_the_elbo():
    model = tiny_hierarchy(seed=6).float()
    from vaekit.data import Pipeline

    raw = torch.randn(30, 2)
    pipeline = Pipeline("identity", "real", split_seed=0)
    evaluation = evaluate(model, raw, pipeline, k=200, naive=False).summary()
    assert evaluation["log_px"] >= evaluation["elbo"]
    assert evaluation["latent_dim"] == 2


def test_the_top_group_view_decodes_with_the_lower_groups_at_their_prior_means():
    from vaekit.hierarchy import TopGroupView

    model = tiny_hierarchy(seed=7)
    view = TopGroupView(model)
    z1 = torch.randn(3, 1, dtype=torch.float64)
    with torch.no_grad():
        # T = 0 for the group below z1: its draw is its prior mean
        eps = torch.cat([z1, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
        assert torch.allclose(view.decode(z1).mean, model.decode(model.generate(eps)).mean)
        x = torch.randn(4, 2, dtype=torch.float64)
        top = model.infer(x).draw(torch.zeros(4, 2, dtype=torch.float64)).groups[0]
        assert torch.allclose(view.encode(x).mean, top.q.mean)  # the top group's q(z1 | x)
    assert view.latent_dim == 1


def test_latent_groups_are_checked(vaekit_cli, tmp_path):
    for args, words in ((["--latent-groups", "8,16", "--prior", "mixture"], "--prior normal"),
                        (["--latent-groups", "8,16", "--net", "conv", "--conditional"],
                         "is unconditional"),
                        (["--latent-groups", "8,16", "--latent-dim", "30"], "has 24 latent"),
                        (["--latent-groups", "8,16", "--latent-dim", "20"], "has 24 latent"),
                        (["--latent-groups", "0,16"], "positive sizes")):
        result = vaekit_cli("train", *args, "--out", tmp_path / "run")
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()


def test_a_hierarchical_run_trains_resumes_exactly_and_samples(vaekit_cli, tmp_path):
    common = ["--latent-groups", "4,8", "--hidden", "64", "--batch-size", "128",
              "--no-progress"]
    straight = assert_resumes_exactly(vaekit_cli, tmp_path, common)
    config = json.loads((straight / "config.json").read_text())["config"]
    assert config["latent_groups"] == [4, 8] and config["latent_dim"] == 12

    result = vaekit_cli("sample", straight, "-n", "8", "--temperature", "0.7", "--out",
                        tmp_path / "s.png", "--save-array", tmp_path / "s.npy")
    assert result.returncode == 0, result.stderr
    assert "at temperature 0.7" in result.stdout
    result = vaekit_cli("evaluate", straight, "--k", "32", "--limit", "20")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((straight / "evaluation.json").read_text())
    assert evaluation["log_px"] >= evaluation["elbo"]
    groups = evaluation["latent_groups"]  # KL and active units of each group
    assert [(g["name"], g["dims"]) for g in groups] == [("z1", 4), ("z2", 8)]
    assert abs(sum(g["kl"] for g in groups) - sum(evaluation["kl_per_dim"])) < 1e-6
    assert "group z1 (4 dimensions): KL" in result.stdout
    # latent steering reads the top group (hierarchy.TopGroupView): 4 dimensions
    result = vaekit_cli("traverse", straight, "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    assert "z3" in result.stdout and "z4" not in result.stdout
    for command in (("reconstruct", straight, "--out", tmp_path / "r.png"),
                    ("score", straight, "--data", "digits"),
                    ("embed", straight, "--out", tmp_path / "e.png"),
                    ("manifold", straight, "--out", tmp_path / "m.png")):
        result = vaekit_cli(*command)
        assert result.returncode == 0, result.stderr


def test_a_conditional_hierarchy_carries_the_label_into_every_group_and_the_decoder():
    torch.manual_seed(8)
    model = build_vae(ModelConfig(data_shape=(6,), latent_dim=3, hidden=[16],
                                  latent_groups=[1, 2], num_classes=3)).eval()
    eps = torch.randn(5, 3)
    with torch.no_grad():
        codes = [model.generate(eps, torch.full((5,), label)) for label in range(3)]
        assert not torch.allclose(codes[0], codes[1])  # the state starts from the label
        samples = model.sample(5, 2, mean=True)
        assert samples.shape == (5, 6)
        x = torch.rand(5, 6).round()
        y = torch.tensor([0, 1, 2, 0, 1])
        assert elbo_terms(model, x, eps, y).elbo.shape == (5,)
    with pytest.raises(ValueError, match="this model is conditional"):
        model.infer(x)


def test_a_float64_hierarchy_takes_float32_noise_and_keeps_float32_densities_under_bf16():
    model = tiny_hierarchy(seed=9)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert elbo_terms(model, x).elbo.dtype == torch.float64  # eps drawn in float32 inside
    flat = build_vae(ModelConfig(data_shape=(6,), latent_dim=3, hidden=[16],
                                 latent_groups=[1, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        draw = flat.infer(torch.rand(3, 6)).draw(torch.randn(3, 3))
    for group in draw.groups:  # the networks may run in bfloat16, the distributions do not
        assert group.q.base_dist.loc.dtype == torch.float32
        assert group.p.base_dist.scale.dtype == torch.float32


def test_a_conditional_hierarchy_is_not_steered_by_its_top_group_alone():
    from vaekit.hierarchy import TopGroupView

    model = build_vae(ModelConfig(data_shape=(6,), latent_dim=3, hidden=[16],
                                  latent_groups=[1, 2], num_classes=3))
    with pytest.raises(ValueError, match="depend on the label"):
        TopGroupView(model)


def test_a_draw_that_skips_the_lowest_groups_takes_them_from_their_priors():
    """draw(eps, inferred_groups=m): the top m groups as in the full draw (same noise, same z),
    every lower group z_l = mu_p + sigma_p eps_l with q_l = p_l, so it adds no KL; m = L is the
    ordinary draw bit for bit."""
    torch.manual_seed(0)
    model = build_vae(ModelConfig(data_shape=(6,), latent_dim=6, hidden=[16],
                                  latent_groups=[2, 2, 2], likelihood="gaussian")).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(5, 6, dtype=torch.float64)
    eps = torch.randn(4, 5, 6, dtype=torch.float64)  # (S, B, D)
    with torch.no_grad():
        inference = model.infer(x)
        full = inference.draw(eps)
        assert torch.equal(inference.draw(eps, inferred_groups=3).code, full.code)
        skipped = inference.draw(eps, inferred_groups=1)
        assert torch.equal(skipped.groups[0].z, full.groups[0].z)
        assert torch.allclose(skipped.groups[0].kl(), full.groups[0].kl())
        for group in skipped.groups[1:]:
            prior = group.p.base_dist
            assert torch.allclose(group.z, prior.loc + prior.scale * group.eps)
            assert float(group.kl().abs().max()) < 1e-12
        assert not torch.allclose(skipped.groups[1].z, full.groups[1].z)


def test_a_lower_group_is_steered_in_its_priors_coordinates():
    """GroupView of the bottom group: its prior is N(0, I) in u = (z - mu_p) / sigma_p, the KL
    of q(u | x) against it is the group's own KL given the groups above (invariant under the
    map), and decoding an example's posterior mean with that example as the context gives the
    model's point-code reconstruction."""
    from torch.distributions import kl_divergence

    from vaekit.hierarchy import GroupView, group_index

    torch.manual_seed(1)
    model = build_vae(ModelConfig(data_shape=(6,), latent_dim=5, hidden=[16],
                                  latent_groups=[2, 3], likelihood="gaussian")).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(4, 6, dtype=torch.float64)
    assert group_index(model, "z2") == 1
    with pytest.raises(ValueError, match="groups are z1, z2"):
        group_index(model, "z3")
    with torch.no_grad():
        view = GroupView(model, 1, x[:1])
        q = view.encode(x)
        own = model.infer(x).draw(torch.zeros(len(x), 5, dtype=torch.float64)).groups[1]
        assert torch.allclose(kl_divergence(q, view.prior), own.kl(), atol=1e-10)
        assert view.latent_dim == 3 and view.detail_dim == 0
        reconstruction = view.decode(q.base_dist.loc[:1]).mean  # (1, 6)
        point = model.decode(model.point_code(x[:1])).mean
        assert torch.allclose(reconstruction, point, atol=1e-10)
        # without a context the groups above sit at their prior means: another picture
        centre = GroupView(model, 1, None).decode(q.base_dist.loc[:1]).mean
        assert not torch.allclose(centre, point)
