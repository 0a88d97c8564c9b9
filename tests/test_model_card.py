"""The model card (model_card.py): README.md of every run, written by train, updated by evaluate."""

from __future__ import annotations

import json
import shutil

from conftest import run_vaekit
from vaekit.model_card import write_run_card
from vaekit.runs import read_metrics


def test_training_writes_a_card_of_the_run(tiny_run):
    card = (tiny_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vaekit\n")
    assert "pipeline_tag: unconditional-image-generation" in card
    last = read_metrics(tiny_run)[-1]
    document = json.loads((tiny_run / "config.json").read_text())
    # the data, what the likelihood scores, and the last epoch's figures, as written
    assert "digits (1438 training and 359 test examples of shape 1x8x8" in card
    assert document["pipeline"]["description"] in card
    assert f"| test ELBO | {last['test_elbo']:,.2f} |" in card
    assert f"After epoch {last['epoch']} (step {last['step']}" in card
    assert "![samples](samples.png)" in card and (tiny_run / "samples.png").is_file()
    assert "Not evaluated yet" in card
    assert "LatentModel.from_pretrained('tiny')" in card


def test_evaluate_updates_the_card(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    result = run_vaekit("evaluate", run_dir, "--k", "20", "--limit", "30", "--no-progress")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    card = (run_dir / "README.md").read_text()
    assert "Not evaluated yet" not in card
    assert f"{evaluation['log_px']:,.2f} ± {evaluation['log_px_se']:.2g}" in card
    assert "k = 20 samples per example" in card and "30 examples" in card
    assert evaluation["likelihood_of"] in card
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_evaluation_leaves_the_card_without_it(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "evaluation.json").write_text("[" * 100)  # nested too deep: ignored, not fatal
    card = write_run_card(run_dir).read_text()
    assert "Not evaluated yet" in card


def test_a_hierarchy_card_names_its_groups(tmp_path):
    from conftest import train_tiny

    run_dir = train_tiny(tmp_path / "h", epochs=1, latent_groups=[2, 4], latent_dim=6)
    card = (run_dir / "README.md").read_text()
    assert "a hierarchical VAE with 2 latent groups of 2, 4 dimensions" in card
