"""The explorer's page in a real headless Chromium (Debian's, driven by Playwright).

Skipped when /usr/bin/chromium or Playwright is missing, unless VAEKIT_REQUIRE_BROWSER=1 (set
by CI), in which case a missing browser is a failure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("VAEKIT_REQUIRE_BROWSER") == "1"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update"]


def missing(reason: str):
    if REQUIRED:
        pytest.fail(f"VAEKIT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def live(tiny_run):
    pytest.importorskip("fastapi")
    from vaekit.explore.server import build, running

    with running(build(tiny_run)[1]) as url:
        yield url


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.problems = problems  # a test that provokes an error clears what it expects
    page.goto(live + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield page
    context.close()
    assert not problems, problems


def info(live) -> dict:
    return httpx.get(live + "/api/info", timeout=30).json()


def slider_values(page) -> dict[int, float]:
    return {int(dim): float(value) for dim, value in page.eval_on_selector_all(
        "#sliders input[type=range]", "inputs => inputs.map(i => [i.dataset.dim, i.value])")}


def decoded_src(page) -> str:
    return page.get_attribute("#decoded", "src") or ""


def test_page_loads_with_the_runs_facts(page, live, tiny_run):
    facts = page.inner_text("#facts")
    assert tiny_run.name in facts and "digits" in facts and "test ELBO" in facts
    assert page.title() == f"vaekit explorer: {tiny_run.name}"
    assert decoded_src(page).startswith("data:image/png;base64,")
    assert page.locator(".gallery-item").count() == 48
    assert page.is_hidden("#detail") and page.is_hidden("#groups-hint")  # one latent group


def test_one_slider_per_dimension_in_order_of_use(page, live):
    facts = info(live)
    sliders = page.locator("#sliders input[type=range]")
    assert sliders.count() == facts["latent_dim"]
    ids = page.eval_on_selector_all("#sliders input", "inputs => inputs.map(i => i.id)")
    assert ids == [f"z{d}" for d in facts["dims_by_use"]]
    assert float(sliders.first.get_attribute("min")) == facts["slider_range"][0]
    assert float(sliders.first.get_attribute("max")) == facts["slider_range"][1]


def test_moving_a_slider_redraws_the_decoded_image(page, live):
    before = decoded_src(page)
    slider = page.locator("#sliders input[type=range]").first
    slider.fill("2.4")  # sets the value and fires input, as dragging does
    page.wait_for_function("before => document.getElementById('decoded').src !== before",
                           arg=before, timeout=10_000)
    after = decoded_src(page)
    # the picture is the API's decoding of exactly the code the sliders show
    z = [0.0] * info(live)["latent_dim"]
    for dim, value in slider_values(page).items():
        z[dim] = value
    assert z[int(slider.get_attribute("data-dim"))] == 2.4
    expected = httpx.post(live + "/api/decode", json={"z": z}, timeout=30).json()["image"]
    page.wait_for_function("expected => document.getElementById('decoded').src === expected",
                           arg=expected, timeout=10_000)
    assert after == expected
    page.keyboard.press("ArrowLeft")  # the keyboard moves a slider as well
    page.wait_for_function("before => document.getElementById('decoded').src !== before",
                           arg=after, timeout=10_000)


def test_encoding_a_gallery_image_sets_the_sliders_to_its_posterior_mean(page, live):
    facts = info(live)
    low, high = facts["slider_range"]
    step = (high - low) / 200
    item = page.locator(".gallery-item").nth(7)
    index = int(item.get_attribute("data-index"))
    encoded = httpx.post(live + "/api/encode", json={"index": index}, timeout=30).json()
    before = slider_values(page)
    item.click()
    page.wait_for_function("image => document.getElementById('decoded').src === image",
                           arg=encoded["image"], timeout=10_000)
    after = slider_values(page)
    assert after != before
    for dim, value in after.items():  # a range input snaps to its step and stays in range
        target = min(high, max(low, encoded["z"][dim]))
        assert abs(value - target) <= step / 2 + 1e-9, (dim, value, target)
    assert f"test example {index}" in page.inner_text("#status")


def test_sample_upload_and_interpolation_strip(page, live):
    before = slider_values(page)
    page.click("#sample")
    page.wait_for_function("text => document.getElementById('status').textContent.includes(text)",
                           arg="drawn from the prior", timeout=10_000)
    assert slider_values(page) != before
    page.click("#set-a")
    buffer = io.BytesIO()
    Image.new("L", (20, 20), 255).save(buffer, format="PNG")
    sampled = slider_values(page)
    page.set_input_files("#file", files=[{"name": "white.png", "mimeType": "image/png",
                                          "buffer": buffer.getvalue()}])
    page.wait_for_function("text => document.getElementById('status').textContent.includes(text)",
                           arg="encoded white.png", timeout=10_000)
    assert "percentile" in page.text_content("#status")  # its log p(x) among the test set's
    assert slider_values(page) != sampled
    assert page.is_visible("#upload-input")
    page.click("#set-b")
    page.wait_for_function("n => document.querySelectorAll('#strip img').length === n", arg=9,
                           timeout=10_000)
    page.locator("#strip img").nth(4).click()  # a frame loads its code
    page.wait_for_function(
        "() => document.getElementById('decoded').src === "
        "document.querySelectorAll('#strip img')[4].src", timeout=10_000)


def test_a_bad_request_shows_the_servers_message(page):
    page.fill("#steps", "1")
    page.click("#set-a")
    page.click("#set-b")
    page.dispatch_event("#steps", "change")
    page.wait_for_selector("#status.error", timeout=10_000)
    assert "steps" in page.inner_text("#status")
    assert page.problems and all("422" in text for text in page.problems)
    page.problems.clear()


def test_the_header_shows_log_px_once_the_run_is_evaluated(browser, tiny_run, tmp_path):
    import json
    import shutil

    from vaekit.explore.server import build, running

    run_dir = tmp_path / "evaluated"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    (run_dir / "evaluation.json").write_text(json.dumps(
        {"elbo": -30.5, "log_px": -28.25, "log_px_se": 0.03, "k": 1000}))
    with running(build(run_dir)[1]) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        facts = page.inner_text("#facts")
        context.close()
    assert "test log p(x) (IS, k = 1000)" in facts and "-28.25 ± 0.03 nats" in facts
    assert "evaluated ELBO" in facts and "-30.50 nats" in facts


def test_a_hierarchy_keeps_its_top_group_and_redraws_the_detail(browser, tmp_path):
    """The sliders steer the top group; 'Redraw detail' draws the lower groups afresh from
    their priors (the API's picture for that seed), 'Detail at mean' puts them back."""
    from conftest import train_tiny

    from vaekit.explore.server import build, running

    run = train_tiny(tmp_path / "hierarchy", epochs=1, hidden=[32], latent_groups=[2, 3],
                     latent_dim=5)
    with running(build(run)[1]) as url:
        facts = httpx.get(url + "/api/info", timeout=30).json()
        assert facts["groups"] == [["z1", 2], ["z2", 3]] and facts["detail_dim"] == 3
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert page.locator("#sliders input[type=range]").count() == 2  # the top group only
        assert "top group z1 (2 dimensions)" in page.inner_text("#groups-hint")
        at_mean = decoded_src(page)
        page.click("#redraw-detail")
        page.wait_for_function("before => document.getElementById('decoded').src !== before",
                               arg=at_mean, timeout=10_000)
        seed = int(page.inner_text("#status").split("seed ")[1].split(")")[0])
        expected = httpx.post(url + "/api/decode", json={"z": [0.0, 0.0], "detail_seed": seed},
                              timeout=30).json()["image"]
        page.wait_for_function("e => document.getElementById('decoded').src === e",
                               arg=expected, timeout=10_000)
        # the lower group's sliders show the drawn detail
        drawn = httpx.post(url + "/api/decode", json={"z": [0.0, 0.0], "detail_seed": seed},
                           timeout=30).json()["detail"]
        assert page.locator("#lower-groups input[type=range]").count() == 3
        shown = [float(page.input_value(f"#z2-{d}")) for d in range(3)]
        assert shown == pytest.approx(drawn, abs=0.02)
        page.click("#mean-detail")
        page.wait_for_function("e => document.getElementById('decoded').src === e",
                               arg=at_mean, timeout=10_000)
        assert page.input_value("#z2-0") == "0"
        # a lower group's own slider: its coordinate in the prior's units, the rest at 0
        page.fill("#z2-1", "1.5")  # range inputs take fill() and fire their input event
        expected = httpx.post(url + "/api/decode", json={"z": [0.0, 0.0],
                                                         "detail": [0.0, 1.5, 0.0]},
                              timeout=30).json()["image"]
        page.wait_for_function("e => document.getElementById('decoded').src === e",
                               arg=expected, timeout=10_000)
        assert "Group z2: 3 dimensions" in page.inner_text("#lower-groups")
        context.close()
