"""The training loop: it learns, it is reproducible, and a resumed run is the same run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, train_tiny

from vaekit.errors import ConfigError, RunError
from vaekit.runs import latest_checkpoint, load_run, tensors_from_file


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return tensors_from_file(run / "model.safetensors")


def step_log(run):
    return tensors_from_file(latest_checkpoint(run) / "optimizer.safetensors")["step_log"]


def test_training_raises_the_test_elbo(tiny_run):
    rows = metrics(tiny_run)
    assert len(rows) == 3
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 1.0
    for row in rows:
        assert abs(row["test_elbo"] - (row["test_reconstruction"] - row["test_kl"])) < 1e-6
        assert row["test_kl"] >= 0 and row["images_per_second"] > 0


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = train_tiny(tmp_path / "a", epochs=1)
    b = train_tiny(tmp_path / "b", epochs=1)
    c = train_tiny(tmp_path / "c", epochs=1, seed=1)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path):
    whole = train_tiny(tmp_path / "whole", epochs=3)
    part = train_tiny(tmp_path / "part", epochs=1)
    from vaekit.train import train

    train(resume=part, overrides={"epochs": 3}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(step_log(whole), step_log(part))
    assert [r["test_elbo"] for r in metrics(whole)] == [r["test_elbo"] for r in metrics(part)]


def test_resume_after_a_mid_epoch_stop_is_bit_identical(tmp_path):
    from vaekit.train import train

    whole = train_tiny(tmp_path / "whole", epochs=2, batch_size=16)
    part = train_tiny(tmp_path / "part", epochs=2, batch_size=16, time_limit=0.05)
    rows = metrics(part)
    assert rows and rows[-1]["complete"] is False  # stopped inside the first epochs
    train(resume=part, overrides={"time_limit": None}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(step_log(whole), step_log(part))
    assert [r["epoch"] for r in metrics(part)] == [1, 2]


def test_resume_refuses_changes_that_alter_the_computation(tiny_run, tmp_path):
    import shutil

    from vaekit.train import train

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    with pytest.raises(ConfigError, match="--latent-dim cannot change when resuming"):
        train(resume=run, overrides={"latent_dim": 9})
    with pytest.raises(RunError, match="no such run folder"):
        train(resume=tmp_path / "missing")


def test_new_run_refuses_an_existing_folder(tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match="already exists"):
        train_tiny(tiny_run)
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_conv_and_uniform_prior_runs_train(tiny_conv_run, tmp_path):
    assert metrics(tiny_conv_run)[-1]["test_elbo"] < 0
    run = train_tiny(tmp_path / "uniform", prior="uniform", epochs=2)
    rows = metrics(run)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] - 1.0 and rows[-1]["test_kl"] > 0
    model = load_run(run).model
    z = model.prior.sample((50,))
    assert bool(((z >= 0) & (z <= 1)).all())


def test_gaussian_run_on_real_arrays(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(600, 2))
    x = latent @ rng.normal(size=(2, 6)) * 3 + 10 + 0.1 * rng.normal(size=(600, 6))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    run = train_tiny(tmp_path / "g", data=str(tmp_path / "x.npy"), epochs=4)
    rows = metrics(run)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]
    document = json.loads((run / "config.json").read_text())
    assert document["config"]["likelihood"] == "gaussian"
    assert document["pipeline"]["mode"] == "standardize"
    assert (run / "pipeline.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# The model family: objectives, priors, likelihoods and labels as configurations of one trainer


@pytest.mark.parametrize("options", [
    dict(objective="iwae", iwae_samples=5),
    dict(prior="mixture"),
    dict(prior="vamp", prior_components=40),
    dict(conditional=True),
    dict(likelihood="discretized-logistic"),
    dict(likelihood="logistic-mixture", likelihood_components=3, net="conv"),
    dict(likelihood="categorical", net="conv"),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_short_runs_of_each_configuration_improve(tmp_path, options):
    run = train_tiny(tmp_path / "run", **options)
    rows = metrics(run)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 1.0
    for row in rows:
        assert abs(row["test_elbo"] - (row["test_reconstruction"] - row["test_kl"])) < 1e-6
    model = load_run(run).model  # rebuilt from config.json alone
    assert model.prior.sample((3,)).shape == (3, 4)


def test_iwae_run_reports_its_bound_above_the_elbo(tmp_path):
    run = train_tiny(tmp_path / "iwae", objective="iwae", iwae_samples=8)
    for row in metrics(run):
        assert row["objective"] == "iwae" and "beta" not in row
        assert row["test_iwae"] > row["test_elbo"]  # IWAE_8 >= ELBO, by a clear margin here
        assert row["train_objective"] > row["train_elbo"]


def test_level_likelihoods_report_bits_per_dimension(tmp_path):
    run = train_tiny(tmp_path / "dl", likelihood="discretized-logistic", epochs=1)
    row = metrics(run)[-1]
    assert abs(row["test_bits_per_dim"] - (-row["test_elbo"] / (64 * math.log(2)))) < 1e-9
    assert 0 < row["test_bits_per_dim"] < 8  # better than uniform over 256 levels
    document = json.loads((run / "config.json").read_text())
    assert document["pipeline"]["mode"] == "levels"


def test_linear_warmup_logs_the_beta_it_used(tmp_path):
    run = train_tiny(tmp_path / "warm", kl_schedule="linear", kl_warmup_epochs=2, beta=2.0)
    rows = metrics(run)
    steps = rows[0]["step"]  # steps per epoch
    # epoch 1 uses beta = 2 * s / (2 * steps) for s = 0 .. steps - 1; epoch 3 the full beta
    assert abs(rows[0]["beta"] - 2.0 * (steps - 1) / 2 / (2 * steps)) < 1e-6
    assert abs(rows[0]["beta_last"] - 2.0 * (steps - 1) / (2 * steps)) < 1e-6
    assert rows[1]["beta"] > rows[0]["beta"] and rows[2]["beta"] == 2.0
    betas = step_log(run)[:, 3]
    assert betas[0] == 0 and torch.all(betas[1:] >= betas[:-1])


def test_cyclical_schedule_restarts_each_cycle(tmp_path):
    run = train_tiny(tmp_path / "cyc", kl_schedule="cyclical", kl_cycle_epochs=1.0,
                     kl_cycle_ratio=0.5)
    betas = step_log(run)[:, 3]
    steps = metrics(run)[0]["step"]
    for epoch in range(3):  # one cycle per epoch: rises from 0 to 1 in its first half
        cycle = betas[epoch * steps:(epoch + 1) * steps]
        assert cycle[0] == 0 and cycle[-1] == 1.0 and cycle.max() == 1.0
    assert all(abs(r["beta"] - betas[:steps].double().mean().item()) < 1e-6
               for r in metrics(run))


def test_free_bits_hold_groups_at_the_floor_and_raise_the_kl(tmp_path):
    plain = metrics(train_tiny(tmp_path / "plain", epochs=2))
    free = metrics(train_tiny(tmp_path / "free", epochs=2, free_bits=1.0))
    for row in free:
        assert 0 <= row["kl_groups_at_floor"] <= 4  # latent_dim 4, one group per dimension
        assert row["train_objective"] <= row["train_elbo"] + 1e-9  # max(floor, KL) >= KL
    # dimensions under a floor of 1 nat cost nothing more when used, so more information flows
    assert free[-1]["test_kl"] > plain[-1]["test_kl"]
    grouped = metrics(train_tiny(tmp_path / "grouped", epochs=1, free_bits=1.0,
                                 free_bits_group_size=2))
    assert 0 <= grouped[0]["kl_groups_at_floor"] <= 2


@pytest.mark.parametrize("options", [
    dict(objective="iwae", iwae_samples=3, conditional=True),
    dict(kl_schedule="cyclical", kl_cycle_epochs=0.7, free_bits=0.5, free_bits_group_size=4,
         prior="mixture"),
    dict(perturb=0.2, binarize="fixed"),
], ids=["iwae-conditional", "cyclical-freebits-mixture", "perturb-fixed-binarisation"])
def test_resume_mid_epoch_is_bit_identical_for_the_new_objectives(tmp_path, options):
    from vaekit.train import train

    whole = train_tiny(tmp_path / "whole", epochs=2, batch_size=16, **options)
    part = train_tiny(tmp_path / "part", epochs=2, batch_size=16, time_limit=0.05, **options)
    assert metrics(part)[-1]["complete"] is False
    train(resume=part, overrides={"time_limit": None}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(step_log(whole), step_log(part))


def test_conditional_run_keeps_its_labels(tmp_path):
    run = train_tiny(tmp_path / "cond", conditional=True, epochs=1)
    loaded = load_run(run)
    assert loaded.model.num_classes == 10 and loaded.label_names == [str(d) for d in range(10)]
    assert loaded.model.sample(3, 7).shape == (3, 1, 8, 8)


def test_invalid_combinations_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="iwae"):
        train_tiny(tmp_path / "a", objective="iwae", beta=4.0)
    with pytest.raises(ConfigError, match="conditional"):
        train_tiny(tmp_path / "b", prior="vamp", conditional=True)
    with pytest.raises(ConfigError, match="free-bits-group-size 4"):
        train_tiny(tmp_path / "c", prior="mixture", free_bits=0.5)
    assert not (tmp_path / "a").exists()


def test_learning_rate_decays_per_epoch_and_resumes_exactly(tmp_path):
    from vaekit.train import train

    whole = train_tiny(tmp_path / "whole", epochs=3, lr=2e-3, lr_decay=0.5)
    assert [r["lr"] for r in metrics(whole)] == pytest.approx([2e-3, 1e-3, 5e-4])
    part = train_tiny(tmp_path / "part", epochs=1, lr=2e-3, lr_decay=0.5)
    train(resume=part, overrides={"epochs": 3}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    constant = train_tiny(tmp_path / "constant", epochs=3, lr=2e-3)
    assert not torch.equal(weights(constant)["encoder.net.0.weight"], w1["encoder.net.0.weight"])


def test_bf16_autocast_learns_like_fp32_and_keeps_float32_weights(tiny_run, tmp_path):
    run = train_tiny(tmp_path / "bf16", precision="bf16")
    rows, reference = metrics(run), metrics(tiny_run)
    trained = weights(run)
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())
    # the matrix products ran in bfloat16: other numbers than the fp32 run, the same learning
    assert not torch.equal(trained["encoder.net.0.weight"],
                           weights(tiny_run)["encoder.net.0.weight"])
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 1.0
    assert rows[-1]["test_elbo"] == pytest.approx(reference[-1]["test_elbo"], abs=0.5)


def test_compiled_step_computes_what_the_eager_step_does(tiny_run, tmp_path):
    import shutil

    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    run = train_tiny(tmp_path / "compiled", compile=True)
    eager, compiled = weights(tiny_run), weights(run)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-4)
    assert [r["test_elbo"] for r in metrics(run)] == pytest.approx(
        [r["test_elbo"] for r in metrics(tiny_run)], abs=1e-3)


def test_compile_without_a_cpu_compiler_is_refused_up_front(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        train_tiny(tmp_path / "run", compile=True)
    assert not (tmp_path / "run").exists()


def test_the_training_step_trains_a_model_with_two_latent_groups_unchanged():
    """The training module and noise of train.py, untouched, fit the posterior of the two-group
    linear-Gaussian hierarchy (oracle.py): from a posterior that is off, Adam on the ELBO of
    TrainingObjective, with StepNoise's counter-based noise, closes most of the gap to the exact
    log p(x), which no model parameter of the generative side can change."""
    from vaekit.config import TrainConfig
    from vaekit.objectives import build_objective
    from vaekit.oracle import LinearGaussianHierarchy, sample_data
    from vaekit.randomness import StepNoise
    from vaekit.train import TrainingObjective, make_adam

    model = LinearGaussianHierarchy(8, 2, 3, 0.5, seed=6)
    x = sample_data(model, 64, seed=7).float()
    exact = float(model.exact_log_px(x).mean())
    with torch.no_grad():
        model.top_bias.add_(0.5)
        model.bottom_scale_tril.mul_(2.0)
    objective = build_objective(TrainConfig())
    module = TrainingObjective(model, objective)
    inference = [p for n, p in model.named_parameters() if n.startswith(("top_", "bottom_w",
                                                                          "bottom_from", "bottom_b",
                                                                          "bottom_scale"))]
    optimizer = make_adam(inference, 0.01)

    def elbo(step: int) -> float:
        noise = StepNoise(0, step, len(x), slice(0, len(x)), torch.device("cpu"))
        eps = noise.normal(*objective.noise_shape(model.latent_dim))  # (B, D), D over groups
        value, _ = objective.per_example(module(x, None, eps), 1.0, lambda t: t)
        return value.mean()

    with torch.no_grad():
        before = float(torch.stack([elbo(10_000 + i) for i in range(50)]).mean())
    for step in range(300):
        loss = -elbo(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(torch.stack([elbo(10_000 + i) for i in range(50)]).mean())
    assert before < exact - 1.0
    assert exact - after < 0.2 * (exact - before)
    assert after < exact + 0.05  # a bound: never above log p(x) beyond its noise


def test_perturbed_training_is_another_run_and_refuses_real_arrays(tmp_path):
    import numpy as np

    plain = train_tiny(tmp_path / "plain", epochs=1)
    perturbed = train_tiny(tmp_path / "perturbed", epochs=1, perturb=0.2)
    assert load_run(perturbed).config.perturb == 0.2
    w1, w2 = weights(plain), weights(perturbed)
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    np.save(tmp_path / "real.npy", np.random.default_rng(0).normal(size=(40, 3)))
    with pytest.raises(ConfigError, match="--perturb replaces pixels of 8-bit images"):
        train_tiny(tmp_path / "real", data=str(tmp_path / "real.npy"), perturb=0.1)
    assert not (tmp_path / "real").exists()


def test_a_config_json_without_the_later_perturb_key_loads(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(tiny_run, run_dir)
    document = json.loads((run_dir / "config.json").read_text())
    del document["config"]["perturb"]
    (run_dir / "config.json").write_text(json.dumps(document))
    assert load_run(run_dir).config.perturb == 0.0


def test_skip_threshold_leaves_exploding_updates_out_and_counts_them(tmp_path):
    from vaekit.config import TrainConfig
    from vaekit.train import build_model

    plain = train_tiny(tmp_path / "plain", epochs=1)
    loose = train_tiny(tmp_path / "loose", epochs=1, skip_threshold=1e12)
    # a threshold no gradient reaches changes nothing, bit for bit
    assert all(torch.equal(weights(plain)[k], weights(loose)[k]) for k in weights(plain))
    assert metrics(loose)[0]["skipped_updates"] == 0
    assert "skipped_updates" not in metrics(plain)[0]
    # one every gradient exceeds: no update at all, every step counted, and a warning says so
    from vaekit.train import train

    lines = []
    tight = train(TrainConfig(**{**TINY, "epochs": 1, "skip_threshold": 1e-9,
                                 "out": str(tmp_path / "tight")}),
                  log=lambda line, **k: lines.append(line))
    steps = metrics(tight)[0]["step"]
    warning = [line for line in lines if "every update of this epoch" in line]
    assert len(warning) == 1 and f"({steps:,}) was skipped" in warning[0] \
        and "--skip-threshold 1e-09" in warning[0]
    assert metrics(tight)[0]["skipped_updates"] == steps > 0
    config = TrainConfig.from_dict(json.loads((tight / "config.json").read_text())["config"])
    initial = build_model(config, (1, 8, 8)).state_dict()
    assert all(torch.equal(initial[k], weights(tight)[k]) for k in initial)
    assert bool((step_log(tight)[:, -1] == 1).all())
