"""Property-based tests of the config parser (src/vaekit/config.py): config.json and the CLI.

Valid configurations survive config.json and the command line unchanged; anything else is a
ConfigError (or, on the command line, argparse's exit status 2), never another exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaekit.cli import build_parser
from vaekit.config import TrainConfig, _base_type, config_overrides
from vaekit.errors import ConfigError
from vaekit.names import FACTORISED_POSTERIORS, POSTERIORS_FOR_PRIOR, resolve_posterior

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


def valid_value(name: str) -> st.SearchStrategy:
    """Values the field accepts, from its own metadata (choices, bounds, type)."""
    f = FIELDS[name]
    base, optional = _base_type(f.type)
    meta = f.metadata
    if name == "device":
        strategy = st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
    elif name == "background":  # a colour: white, black, R,G,B or none
        strategy = st.sampled_from(["white", "black", "none", "0,0,0", "128,64,255"])
    elif name == "data_memory":  # a size: auto, bytes, or a number with K, M, G, T
        strategy = st.sampled_from(["auto", "0", "512M", "8G", "1.5g", "4096"])
    elif meta.get("choices"):
        strategy = st.sampled_from(meta["choices"])
    elif base is bool:
        strategy = st.booleans()
    elif base is int:
        low = int(meta["minimum"]) if meta.get("minimum") is not None else -10**6
        high = int(meta["maximum"]) if meta.get("maximum") is not None else low + 10**6
        strategy = st.integers(low + (1 if meta.get("exclusive_minimum") else 0), high)
    elif base is float:
        low = meta.get("minimum") if meta.get("minimum") is not None else -1e6
        high = meta.get("maximum") if meta.get("maximum") is not None else 1e6
        strategy = st.floats(low, high, allow_nan=False, allow_infinity=False,
                             exclude_min=bool(meta.get("exclusive_minimum")))
    elif base is list:
        strategy = st.lists(st.integers(1, 4096), max_size=4,
                            min_size=1 if name in ("conv_channels", "latent_groups") else 0)
    else:  # free text: data, data_dir, out
        strategy = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                           max_size=20)
    return (st.none() | strategy) if optional else strategy


def within_cross_field_rules(values: dict) -> dict:
    """Fields valid one by one can still clash; keep the draws inside the rules that relate them
    (TrainConfig.validate): IWAE has no KL term to weight, the VampPrior cannot be conditional,
    and free bits per group need a factorised prior (else one group over all dimensions), and
    the posterior must suit the prior (names.POSTERIORS_FOR_PRIOR); --flow-steps belongs to the
    iaf posterior; a hierarchy (--latent-groups) is an MLP with its own priors and posteriors,
    its latent dimension their sum; --patience needs validation rows."""
    if values["latent_groups"] is not None:
        values.update(net="mlp", prior="normal", posterior="auto", prior_components=None,
                      flow_steps=None, latent_dim=sum(values["latent_groups"]),
                      hidden=values["hidden"] or [64])
    if values["posterior"] not in ("auto", *POSTERIORS_FOR_PRIOR[values["prior"]]):
        values["posterior"] = "auto"
    if resolve_posterior(values["posterior"], values["prior"]) != "iaf":
        values["flow_steps"] = None
    if values["objective"] == "iwae":
        values.update(beta=1.0, kl_schedule="constant", free_bits=None)
    if values["prior"] == "vamp":
        values["conditional"] = False
    if values["validation_fraction"] == 0:  # early stopping needs validation rows
        values["patience"] = 0 if values["patience"] is not None else None
    if values["free_bits"] is not None and (
            values["prior"] not in ("normal", "uniform")
            or resolve_posterior(values["posterior"], values["prior"]) not in
            FACTORISED_POSTERIORS):
        values["free_bits_group_size"] = max(values["free_bits_group_size"],
                                             values["latent_dim"])
    return values


configs = st.fixed_dictionaries({name: valid_value(name) for name in FIELDS}).map(
    lambda values: TrainConfig(**within_cross_field_rules(values)))


@FAST
@given(config=configs)
def test_config_json_round_trip(config):
    text = json.dumps(config.to_dict())
    assert TrainConfig.from_dict(json.loads(text)) == config.validate()


@FAST
@given(config=configs, name=st.sampled_from(sorted(FIELDS)), value=json_values)
def test_any_json_value_is_accepted_exactly_or_refused(config, name, value):
    values = {**config.to_dict(), name: value}
    try:
        parsed = TrainConfig.from_dict(values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and (repr(name) in str(exc) or
                                        "--" + name.replace("_", "-") in str(exc))
        return
    got = getattr(parsed, name)
    assert got == value and (type(got) is type(value) or isinstance(value, int) and
                             isinstance(got, float))


@FAST
@given(config=configs, extra=st.text(min_size=1, max_size=10), data=st.data())
def test_unknown_and_missing_keys_are_refused_by_name(config, extra, data):
    values = config.to_dict()
    if extra not in values:
        with pytest.raises(ConfigError, match="unknown key"):
            TrainConfig.from_dict({**values, extra: 1})
    dropped = data.draw(st.sampled_from(sorted(values)))
    del values[dropped]
    with pytest.raises(ConfigError, match=f"lacks key {dropped!r}"):
        TrainConfig.from_dict(values)


@FAST
@given(values=json_values)
def test_non_objects_are_refused(values):
    if not isinstance(values, dict):
        with pytest.raises(ConfigError, match="must be a JSON object"):
            TrainConfig.from_dict(values)


def cli_words(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, ",".join(map(str, value)) or "none"]
    if isinstance(value, float):
        return [f"{flag}={value!r}"]
    return [f"{flag}={value}"]


@FAST
@given(config=configs)
def test_command_line_round_trip(config):
    words = [w for name, value in config.to_dict().items() if value is not None
             for w in cli_words(name, value)]
    args = build_parser().parse_args(["train", *words])
    overrides = config_overrides(args)
    # a field left out takes its default (the command line has no way to say None)
    expected = dataclasses.replace(config, **{n: getattr(TrainConfig(), n)
                                              for n, v in config.to_dict().items() if v is None})
    assert TrainConfig(**overrides).validate() == expected
    assert set(overrides) == {n for n, v in config.to_dict().items() if v is not None}


@FAST
@given(name=st.sampled_from(sorted(FIELDS)), text=st.text(max_size=12))
def test_any_option_text_is_parsed_or_refused(name, text):
    flag = "--" + name.replace("_", "-")
    base, _ = _base_type(FIELDS[name].type)
    words = [flag if text in ("yes", "") else "--no-" + flag[2:]] if base is bool else \
        [f"{flag}={text}"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(["train", *words])
    except SystemExit as exit:
        assert exit.code == 2 and len(stderr.getvalue().strip().splitlines()) == 1
        return
    overrides = config_overrides(args)
    try:
        config = TrainConfig(**overrides).validate()
    except ConfigError as exc:
        assert "\n" not in str(exc) and flag in str(exc)
        return
    value = getattr(config, name)
    if isinstance(value, float):
        assert math.isfinite(value)
