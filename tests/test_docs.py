"""The README agrees with the command: the lists and figures it repeats from the code."""

from __future__ import annotations

import re
from pathlib import Path

from vaekit.cli import build_parser
from vaekit.config import RESUMABLE_OVERRIDES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _flags(names) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names]


def test_the_resume_options_of_the_readme_are_the_clis():
    sentence = re.search(r"On resume only (.*?) may change", README, re.S).group(1)
    assert re.findall(r"`(--[a-z-]+)`", sentence) == _flags(RESUMABLE_OVERRIDES)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    resume = next(a for a in train._actions if "--resume" in a.option_strings)
    assert ", ".join(_flags(RESUMABLE_OVERRIDES)) in resume.help


def test_the_digits_time_of_the_readme_is_the_helps():
    readme = re.search(r"built-in digits \(offline, about (\d+ \w+) on 2 CPU cores\)",
                       README).group(1)
    assert f"about {readme} on 2 CPU cores" in build_parser().epilog
