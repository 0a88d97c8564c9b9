"""jsonio: untrusted JSON read with size and depth limits, standard tokens only, schemas; JSON
written without NaN or Infinity."""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaekit import jsonio
from vaekit.errors import ConfigError, RunError
from vaekit.runs import atomic_write_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False,
                                                                        allow_infinity=False)
    | st.text(alphabet='ab[]{}"\\ ,:', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3), max_leaves=20)


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@given(json_values)
def test_nesting_depth_matches_the_parsed_structure(value):
    text = json.dumps(value)  # brackets and quotes inside strings must not count
    assert jsonio.nesting_depth(text) == depth_of(value)
    assert jsonio.loads(text, "x", max_depth=64) == value


def test_deep_nesting_is_refused_before_parsing():
    for text in ["[" * 200_000, '{"a":' * 100_000 + "1" + "}" * 100_000]:
        with pytest.raises(RunError, match="nested [12]00000 deep"):
            jsonio.loads(text, "f.json")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_numbers_are_refused(token):
    with pytest.raises(ConfigError, match=f"{token} is not a JSON number"):
        jsonio.loads(f'{{"a": [1, {token}]}}', "f.json", error=ConfigError)


def test_files_over_the_size_limit_and_special_files_are_refused(tmp_path):
    (tmp_path / "big.json").write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(RunError, match="over the limit of 100"):
        jsonio.read_json(tmp_path / "big.json", "a file", max_bytes=100)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(RunError, match="FIFO"):  # refused at once, not read (which would block)
        jsonio.read_json(tmp_path / "fifo.json", "a file")
    (tmp_path / "latin1.json").write_bytes(b'"caf\xe9"')
    with pytest.raises(RunError, match="not UTF-8"):
        jsonio.read_json(tmp_path / "latin1.json", "a file")


def test_schemas_name_the_first_mismatch():
    schema = {"format": str, "files": {"a": {"bytes": int}}, "note": jsonio.Optional(str)}
    good = {"format": "x", "files": {"a": {"bytes": 3}}}
    assert jsonio.check(good, schema, "m.json") is good
    for bad, words in [({"format": 1, "files": {}}, "'format' must be a string"),
                       ({"format": "x"}, "lacks key 'files'"),
                       ({"format": "x", "files": {"a": {"bytes": True}}}, "must be an integer"),
                       ({"format": "x", "files": {"a": {"bytes": 1}}, "note": 2}, "'note'"),
                       ([], "expected an object")]:
        with pytest.raises(RunError, match=words):
            jsonio.check(bad, schema, "m.json")
    assert jsonio.check([1, 2.5], [float], "l") == [1, 2.5]
    with pytest.raises(RunError, match=r"l\[1\] must be a number"):
        jsonio.check([1, "2"], [float], "l")


def test_json_lines_are_read_line_by_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert jsonio.read_json_lines(tmp_path / "m.jsonl", "metrics") == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\n' + "[" * 1000 + "\n")
    with pytest.raises(RunError, match="line 2: JSON nested 1000 deep"):
        jsonio.read_json_lines(tmp_path / "m.jsonl", "metrics")


def test_nothing_non_finite_is_ever_written(tmp_path):
    value = {"log_px": float("nan"), "se": [1.0, float("inf"), -float("inf")], "k": 5}
    atomic_write_json(tmp_path / "e.json", value)
    text = (tmp_path / "e.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"log_px": None, "se": [1.0, None, None], "k": 5}
    assert jsonio.dumps(1.5) == "1.5" and math.isnan(value["log_px"])  # the input is unchanged


def test_explain_reads_the_good_lines_of_a_hostile_metrics_file(tmp_path):
    from vaekit.report import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n' + "[" * 100_000 + "\n"
                                            '{"epoch": NaN}\n{"epoch": 2}\n')
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").unlink()
    os.mkfifo(tmp_path / "metrics.jsonl")
    assert read_metrics(tmp_path) == []  # refused at once, not read (which would block)
