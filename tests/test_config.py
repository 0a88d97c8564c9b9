"""TrainConfig: the one definition behind the CLI options and config.json."""

from __future__ import annotations

import argparse

import pytest

from vaekit.config import TrainConfig, add_config_arguments, config_overrides
from vaekit.errors import ConfigError


def parse(*args):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_overrides(parser.parse_args(list(args)))


def test_round_trip_through_json_dict():
    config = TrainConfig(data="mnist", hidden=[300, 200], latent_dim=7, beta=2.0, epochs=3)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_cli_gives_only_what_was_set():
    assert parse() == {}
    values = parse("--latent-dim", "3", "--hidden", "64,32", "--no-progress", "--lr", "0.01")
    assert values == {"latent_dim": 3, "hidden": [64, 32], "progress": False, "lr": 0.01}
    assert parse("--hidden", "none")["hidden"] == []


@pytest.mark.parametrize("changes,message", [
    ({"latent_dim": 0}, "--latent-dim must be at least 1"),
    ({"epochs": -1}, "--epochs must be at least 1"),
    ({"lr": 0.0}, "--lr must be greater than 0"),
    ({"prior": "cauchy"}, "normal, uniform"),
    ({"net": "rnn"}, "mlp, conv"),
    ({"device": "tpu"}, "auto, cpu, cuda"),
    ({"test_fraction": 0.95}, "at most 0.9"),
    ({"hidden": [0]}, "positive"),
    ({"beta": float("nan")}, "finite"),
])
def test_invalid_values_name_the_option(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_posterior_is_checked_against_the_prior_in_one_line():
    assert TrainConfig(prior="uniform").validate().posterior == "auto"
    TrainConfig(prior="uniform", posterior="sigmoid-gaussian").validate()
    with pytest.raises(ConfigError, match="^--posterior gaussian cannot be paired with --prior "
                                          "uniform: valid pairs are .*--prior uniform with "
                                          "--posterior sigmoid-gaussian$"):
        TrainConfig(prior="uniform", posterior="gaussian").validate()


def test_a_run_written_before_posterior_existed_loads_with_the_family_it_used():
    from vaekit import __version__

    values = TrainConfig(prior="uniform").with_presets().to_dict()  # as config.json holds it
    del values["posterior"]
    config, filled = TrainConfig.from_stored(values, where="config.json", written_by=__version__)
    assert config.posterior == "auto" and filled == {"posterior": "auto"}


def test_from_dict_is_strict():
    good = TrainConfig().to_dict()
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        TrainConfig.from_dict({**good, "colour": "red"})
    missing = dict(good)
    del missing["latent_dim"]
    with pytest.raises(ConfigError, match="lacks key 'latent_dim'"):
        TrainConfig.from_dict(missing)
    with pytest.raises(ConfigError, match="'latent_dim' must be an integer"):
        TrainConfig.from_dict({**good, "latent_dim": "20"})
    with pytest.raises(ConfigError, match="'progress' must be true or false"):
        TrainConfig.from_dict({**good, "progress": 1})
    with pytest.raises(ConfigError, match="'hidden' must be a list of integers"):
        TrainConfig.from_dict({**good, "hidden": [1.5]})
    with pytest.raises(ConfigError, match="must not be null"):
        TrainConfig.from_dict({**good, "beta": None})


def test_presets_fill_only_unset_fields():
    assert TrainConfig().with_presets().epochs == 150
    assert TrainConfig(data="fashion-mnist").with_presets().batch_size == 128
    assert TrainConfig(epochs=2).with_presets().epochs == 2
    assert TrainConfig(data="my.npy").with_presets().epochs == 20
    fashion = TrainConfig(data="fashion-mnist").with_presets()
    assert (fashion.epochs, fashion.lr, fashion.lr_decay) == (30, 3e-3, 0.9)
    assert TrainConfig(data="fashion-mnist", lr=1e-3, lr_decay=1.0).with_presets().lr_decay == 1.0
    assert (TrainConfig().with_presets().lr, TrainConfig().with_presets().lr_decay) == (1e-3, 1.0)


def test_model_family_options_parse_and_round_trip():
    values = parse("--objective", "iwae", "--iwae-samples", "50", "--prior", "vamp",
                   "--prior-components", "100", "--likelihood", "logistic-mixture",
                   "--likelihood-components", "5", "--conditional")
    assert values == {"objective": "iwae", "iwae_samples": 50, "prior": "vamp",
                      "prior_components": 100, "likelihood": "logistic-mixture",
                      "likelihood_components": 5, "conditional": True}
    values = parse("--kl-schedule", "cyclical", "--kl-cycle-epochs", "2.5", "--kl-cycle-ratio",
                   "0.25", "--free-bits", "0.5", "--free-bits-group-size", "4")
    config = TrainConfig(**values).validate()
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("changes,message", [
    ({"objective": "vi"}, "elbo, iwae"),
    ({"iwae_samples": 0}, "--iwae-samples must be at least 1"),
    ({"kl_schedule": "cosine"}, "constant, linear, cyclical"),
    ({"kl_warmup_epochs": 0.0}, "--kl-warmup-epochs must be greater than 0"),
    ({"kl_cycle_ratio": 1.5}, "--kl-cycle-ratio must be at most 1"),
    ({"free_bits": -1.0}, "--free-bits must be greater than 0"),
    ({"likelihood": "poisson"}, "logistic-mixture"),
    ({"objective": "iwae", "beta": 2.0}, "--beta weights the ELBO's KL term"),
    ({"objective": "iwae", "free_bits": 1.0}, "--free-bits weights"),
    ({"prior": "vamp", "conditional": True}, "cannot be --conditional"),
    ({"prior": "vamp", "free_bits": 1.0}, "--free-bits-group-size 20"),
])
def test_model_family_invalid_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()
    TrainConfig(prior="vamp", free_bits=1.0, free_bits_group_size=20).validate()  # one group
