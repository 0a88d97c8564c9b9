"""`vaekit explain`: the HTML report of the note's demonstrations, and its pieces."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image

from vaekit.estimate import evaluate
from vaekit.report import (
    erase_patch,
    estimator_sweep,
    evaluation_table,
    explain,
    shift_right,
)
from vaekit.runs import load_run, load_run_dataset

SECTIONS = ("point-10", "points-9-11", "point-14", "points-13-14", "point-15", "point-16",
            "samples")
SMALL = dict(examples=12, k=300, gradient_examples=4, gradient_samples=(1, 10),
             gradient_repeats=8, refit_steps=20)


class Page(HTMLParser):
    """Section ids, image sources and any reference to a resource outside the page."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def copy_run(run, tmp_path):
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def test_shift_and_erase_are_exact_pixel_operations():
    image = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    image[0, 0, 1:5, 2:4] = 200  # a bar of ink on a black background
    shifted = shift_right(image, 1)
    assert torch.equal(shifted[0, 0, :, 1:], image[0, 0, :, :-1])
    assert torch.all(shifted[0, 0, :, 0] == 0)  # filled with the background
    erased = erase_patch(image, 2)
    assert int((erased != image).sum()) == 4  # one 2 x 2 patch, all of it on ink
    assert int(erased.sum()) == int(image.sum()) - 4 * 200


@pytest.fixture(autouse=True)
def cached_features(feature_cache, monkeypatch):
    """The samples section uses the data's feature network: the session's, not ~/.cache."""
    monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache))


def test_explain_writes_a_self_contained_report_of_every_section(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    run = load_run(run_dir)
    page = explain(run, load_run_dataset(run), log=lambda *a: None, **SMALL)
    assert page == run_dir / "explain.html"
    parsed = parse(page)
    assert parsed.ids == list(SECTIONS)
    assert parsed.external == []  # opens from disk: nothing to fetch
    assert len(parsed.images) == 6
    for source in parsed.images:
        assert source.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert image.size[0] > 100 and image.size[1] > 100
    for name in ("point10", "estimators", "gap", "curves", "gradients", "samples"):
        assert (run_dir / f"explain-{name}.png").is_file(), name
    text = page.read_text()
    assert "Pixel distance prefers the damaged image in" in text
    assert "k = 300" in text and "score-function" in text and "reparameterisation" in text
    # points 13-14: the oracle's exact gaps, then one row per posterior family on the run
    assert "the diagonal Gaussian&#x27;s gap stops at 0.38" in text or \
        "the diagonal Gaussian's gap stops at 0.38" in text
    for row in ("the run&#x27;s own (gaussian", "gaussian, refitted", "full-covariance, refitted",
                "iaf, refitted"):
        assert row in text, row
    assert run.pipeline.description in text


def test_the_sweep_at_full_k_is_what_evaluate_reports(tiny_run):
    run = load_run(tiny_run)
    dataset = load_run_dataset(run)
    raw = dataset.test_x[:10]
    sweep = estimator_sweep(run, raw, k=200, seed=0)
    per = evaluate(run.model, raw, run.pipeline, k=200).per_example
    assert torch.allclose(sweep.per_example_log_px, per["log_px"] + run.pipeline.log_jacobian,
                          atol=1e-4)
    assert sweep.ks[0] == 1 and sweep.ks[-1] == 200
    naive_mean = float(per["log_px_naive"].mean())
    assert abs(sweep.naive[-1][0] - naive_mean) < 1e-4


def test_explain_on_a_conv_run(tiny_conv_run, tmp_path):
    run_dir = copy_run(tiny_conv_run, tmp_path)
    run = load_run(run_dir)
    page = explain(run, load_run_dataset(run), log=lambda *a: None, **SMALL)
    assert parse(page).ids == list(SECTIONS)


def test_explain_on_non_image_data_skips_only_the_image_demonstration(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "data.npy", rng.normal(size=(300, 5)).astype(np.float32))
    run_dir = train_tiny(tmp_path / "run", data=str(tmp_path / "data.npy"), epochs=2)
    run = load_run(run_dir)
    page = explain(run, load_run_dataset(run), log=lambda *a: None, **SMALL)
    parsed = parse(page)
    assert parsed.ids == list(SECTIONS)
    assert len(parsed.images) == 4  # no picture for point 10 nor of the samples
    assert "not images" in page.read_text()


def test_evaluation_table_names_every_figure_and_its_samples():
    result = {"run": "runs/x", "split": "test", "n": 10, "k": 7, "seed": 0, "seconds": 1.0,
              "device": "cpu", "processes": 1, "likelihood_of": "binary pixels, Bernoulli",
              "log_px": -90.0, "log_px_se": 0.1, "log_px_ess": 30.0, "log_px_ess_min": 2.5,
              "log_px_low_ess": 2, "log_px_naive": -120.0,
              "log_px_naive_se": 0.5, "log_px_naive_ess": 1.0, "elbo": -95.0, "elbo_se": 0.2,
              "reconstruction": -80.0, "reconstruction_se": 0.2, "kl": 15.0, "kl_se": 0.0,
              "kl_exact": True, "elbo_gap": 5.0, "elbo_gap_se": 0.2, "bits_per_dim": 0.3,
              "bits_per_dim_se": 0.001, "active_units": 3, "latent_dim": 4,
              "kl_per_dim": [1.0, 2.0, 3.0, 0.0]}
    table = evaluation_table(result)
    assert "k = 7 from q(z|x)" in table and "k = 7 from p(z)" in table
    assert "binary pixels, Bernoulli" in table
    assert "3 of 4" in table
    assert "effective sample size is 1.0 of 7" in table  # the naive error bar is flagged
    assert "2 of 10 examples have importance weights" not in table  # k = 7: too few to judge
    result["k"] = 100
    assert "2 of 10 examples have importance weights" in evaluation_table(result)


def test_explain_command(vaekit_cli, tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    result = vaekit_cli("explain", run_dir, "--examples", "5", "--k", "50",
                        "--gradient-repeats", "4", "--refit-steps", "10")
    assert result.returncode == 0, result.stderr
    assert "explain.html" in result.stdout
    assert parse(run_dir / "explain.html").ids == list(SECTIONS)
    bad = vaekit_cli("explain", run_dir, "--k", "1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.browser
def test_report_renders_in_a_browser_from_disk(tiny_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("VAEKIT_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (VAEKIT_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed")
    run_dir = copy_run(tiny_run, tmp_path)
    run = load_run(run_dir)
    page = explain(run, load_run_dataset(run), log=lambda *a: None, **SMALL)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1000,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    image = np.asarray(Image.open(shot).convert("L"))
    # the page drew its figures: many rows hold dark pixels (text, axes, images)
    assert (image < 128).any(axis=1).mean() > 0.3
    assert re.search(r"Point 16", page.read_text())



def test_a_run_folder_that_cannot_be_written_is_a_one_line_error(tiny_run, tmp_path,
                                                                 monkeypatch):
    import errno

    import vaekit.runs
    from vaekit.errors import RunError

    def refuse(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    run_dir = copy_run(tiny_run, tmp_path)
    run = load_run(run_dir)
    monkeypatch.setattr(vaekit.runs, "atomic_write_bytes", refuse)
    with pytest.raises(RunError, match="not writable"):
        explain(run, load_run_dataset(run), log=lambda *a: None, **SMALL)
    assert not (run_dir / "explain.html").exists()
