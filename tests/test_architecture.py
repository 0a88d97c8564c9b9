"""The layout the README's architecture section states: imports flow one way along the core
chain, and the library never imports the command line or the web app."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src" / "vaekit"
# The README's order: a module imports (at module level) only modules before it in this chain,
# or modules outside it (the helpers: errors, randomness, runs, data, ...).
CHAIN = ["names", "distributions", "posteriors", "latent", "nets", "model", "hierarchy",
         "conv_hierarchy", "objectives", "estimate", "gradients", "train_state", "loop",
         "train", "latent_space", "viz", "report", "cli", "explore"]
FRONT_ENDS = {"cli", "explore", "__main__"}


def relative_imports(path: Path):
    """(target module, at module level?, line) of every `from .x import` / `from ..x import`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SOURCE).parts[0].removesuffix(".py")
    in_subpackage = path.parent != SOURCE
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if in_subpackage and node.level == 1:
                target = package  # a sibling inside the same package
            else:
                target = (node.module or "").split(".")[0]
            yield target, node in tree.body, node.lineno


def modules():
    for path in sorted(SOURCE.rglob("*.py")):
        yield path.relative_to(SOURCE).parts[0].removesuffix(".py"), path


def test_the_library_never_imports_the_command_line_or_the_web_app():
    offenders = [f"{path.relative_to(SOURCE)}:{line} imports {target}"
                 for name, path in modules() if name not in FRONT_ENDS
                 for target, _, line in relative_imports(path) if target in FRONT_ENDS]
    assert not offenders, offenders


def test_module_level_imports_flow_one_way_along_the_chain():
    rank = {name: index for index, name in enumerate(CHAIN)}
    offenders = [f"{path.relative_to(SOURCE)}:{line} imports {target} at module level"
                 for name, path in modules() if name in rank
                 for target, top, line in relative_imports(path)
                 if top and target in rank and rank[target] > rank[name]]
    assert not offenders, offenders


def test_the_chain_names_real_modules():
    present = {name for name, _ in modules()}
    assert set(CHAIN) <= present, set(CHAIN) - present
