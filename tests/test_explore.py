"""The explorer's server: API round trips, every bad input, Host checks, path traversal, size
limits, schemathesis fuzzing of its OpenAPI description, and `vaekit explore` itself."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from vaekit.explore.server import (  # noqa: E402
    MAX_BODY_BYTES,
    MAX_IMAGE_SIDE,
    MAX_UPLOAD_BYTES,
    build,
    running,
)
from vaekit.latent_space import LatentSpace  # noqa: E402


# Starlette's test client (also schemathesis's) notes that it prefers httpx2 to httpx: noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def client_for(app, base_url: str = "http://127.0.0.1:8000"):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=base_url)


class Explorer:
    """A run's explorer app, a client for it, and the latent space it serves."""

    def __init__(self, run_dir: Path, allowed_hosts=()):
        self.run, self.app = build(run_dir, allowed_hosts)
        self.space = LatentSpace.of_run(self.run)
        self.client = client_for(self.app)
        self.dims = self.space.latent_dim


@pytest.fixture(scope="module")
def explorer(tiny_run):
    return Explorer(tiny_run)


@pytest.fixture(scope="module")
def uniform_explorer(tmp_path_factory):
    return Explorer(train_tiny(tmp_path_factory.mktemp("runs") / "uniform", prior="uniform"))


@pytest.fixture(scope="module")
def grey_explorer(tmp_path_factory):
    """Continuous Bernoulli on grey levels: the model sees the pixels as they are, no noise."""
    return Explorer(train_tiny(tmp_path_factory.mktemp("runs") / "grey",
                               likelihood="continuous-bernoulli"))


def pixels(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))))


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """What the explorer draws for a grey image (1, H, W) in [0, 1]."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[0].numpy()


def png(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def upload(client, data: bytes, invert: bool = False, name: str = "x.png"):
    return client.post("/api/encode/upload", files={"file": (name, data, "image/png")},
                       data={"invert": "true" if invert else "false"})


# --- round trips -------------------------------------------------------------------------------


def test_info_describes_the_run(explorer, tiny_run):
    info = explorer.client.get("/api/info").json()
    space = explorer.space
    assert info["run"] == tiny_run.name and info["dataset"] == "digits"
    assert info["latent_dim"] == explorer.dims and info["data_shape"] == [1, 8, 8]
    assert info["dims_by_use"] == space.dims_by_use and info["unused"] == space.unused
    np.testing.assert_allclose(info["kl_per_dimension"], space.kl_per_dimension.numpy())
    assert info["slider_range"] == [-3.0, 3.0] and info["code_range"] == [-10.0, 10.0]
    assert info["interpolation_modes"] == ["spherical", "linear"]
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert info["test_elbo"] == pytest.approx(last["test_elbo"]) and info["epochs"] == 3
    assert info["evaluation"] is None and info["images"] is True


def test_info_shows_the_evaluation_when_the_run_has_one(tiny_run, tmp_path):
    run_dir = tmp_path / "evaluated"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    (run_dir / "evaluation.json").write_text(json.dumps(
        {"elbo": -30.5, "log_px": -28.25, "log_px_se": 0.03, "k": 1000, "other": "kept out"}))
    info = Explorer(run_dir).client.get("/api/info").json()
    assert info["evaluation"] == {"elbo": -30.5, "log_px": -28.25, "log_px_se": 0.03, "k": 1000,
                                  "n": None, "subset_of": None}
    # a --limit evaluation: the header can say n = 200 of 359 (random subset)
    (run_dir / "evaluation.json").write_text(json.dumps(
        {"log_px": -28.25, "k": 100, "n": 200, "subset": {"n": 200, "of": 359, "seed": 0}}))
    evaluation = Explorer(run_dir).client.get("/api/info").json()["evaluation"]
    assert evaluation["n"] == 200 and evaluation["subset_of"] == 359
    (run_dir / "evaluation.json").write_text("{not json")
    assert Explorer(run_dir).client.get("/api/info").json()["evaluation"] is None


def test_decode_draws_the_likelihood_mean(explorer):
    z = [0.5, -1.0, 2.0, 0.25]
    response = explorer.client.post("/api/decode", json={"z": z})
    assert response.status_code == 200
    expected = explorer.space.decode(torch.tensor([z]))[0]  # (1, 8, 8)
    assert np.array_equal(pixels(response.json()["image"]), as_uint8(expected))


def test_a_hierarchys_lower_groups_are_redrawn_from_their_priors(explorer, tmp_path):
    from vaekit.hierarchy import TopGroupView

    hierarchy = Explorer(train_tiny(tmp_path / "hierarchy", epochs=1, hidden=[32],
                                    latent_groups=[2, 3], latent_dim=5))
    assert isinstance(hierarchy.space.model, TopGroupView) and hierarchy.dims == 2
    z = [0.3, -0.4]
    at_mean = hierarchy.client.post("/api/decode", json={"z": z}).json()["image"]
    redrawn = [hierarchy.client.post("/api/decode", json={"z": z, "detail_seed": 7}).json()
               ["image"] for _ in range(2)]
    assert redrawn[0] == redrawn[1] != at_mean  # the seed alone decides the detail
    noise = 0.5 * torch.randn(1, 3, generator=torch.Generator().manual_seed(7))
    expected = hierarchy.space.decode(torch.tensor([z]), noise)[0]
    tempered = hierarchy.client.post("/api/decode", json={
        "z": z, "detail_seed": 7, "detail_temperature": 0.5}).json()["image"]
    assert np.array_equal(pixels(tempered), as_uint8(expected))
    cold = hierarchy.client.post("/api/decode", json={
        "z": z, "detail_seed": 7, "detail_temperature": 0.0}).json()["image"]
    assert cold == at_mean  # temperature 0: every lower group at its prior mean
    assert hierarchy.client.post("/api/decode", json={
        "z": z, "detail_seed": 7, "detail_temperature": 2.5}).status_code == 422
    # a run of one group has no detail to redraw: the field is refused
    assert explorer.client.post("/api/decode", json={
        "z": [0.0] * explorer.dims, "detail_seed": 7}).status_code == 422
    # the lower groups set explicitly, in their priors' units: the picture of that detail, and
    # the detail drawn from a seed comes back with the picture (for the page's sliders)
    chosen = [1.5, -0.5, 0.25]
    set_detail = hierarchy.client.post("/api/decode", json={"z": z, "detail": chosen}).json()
    expected = hierarchy.space.decode(torch.tensor([z]), torch.tensor([chosen]))[0]
    assert np.array_equal(pixels(set_detail["image"]), as_uint8(expected))
    assert set_detail["detail"] == chosen
    drawn = hierarchy.client.post("/api/decode", json={"z": z, "detail_seed": 7,
                                                       "detail_temperature": 0.5}).json()
    assert drawn["detail"] == pytest.approx(noise[0].tolist())
    zeros = hierarchy.client.post("/api/decode", json={"z": z, "detail": [0.0] * 3}).json()
    assert zeros["image"] == at_mean  # 0 in the priors' units: every lower group at its mean
    both = hierarchy.client.post("/api/decode", json={"z": z, "detail": chosen, "detail_seed": 7})
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    assert hierarchy.client.post("/api/decode", json={"z": z, "detail": [0.0] * 2}
                                 ).status_code == 422  # the wrong length
    info = hierarchy.client.get("/api/info").json()
    (lower,) = info["lower_groups"]
    assert lower["name"] == "z2" and lower["dims"] == 3 and lower["offset"] == 0
    assert sorted(lower["dims_by_use"]) == [0, 1, 2] and len(lower["kl_per_dimension"]) == 3
    assert explorer.client.get("/api/info").json()["lower_groups"] == []


def test_encode_a_test_example(explorer):
    response = explorer.client.post("/api/encode", json={"index": 11})
    assert response.status_code == 200
    result = response.json()
    code = explorer.space.code_of(11)
    np.testing.assert_allclose(result["z"], code.numpy(), rtol=1e-6, atol=1e-7)
    assert np.array_equal(pixels(result["image"]), as_uint8(explorer.space.decode(code[None])[0]))
    x = explorer.space.inputs([11])[0]  # the fixed binarisation the model encodes
    assert np.array_equal(pixels(result["input"]), as_uint8(x))


def test_upload_of_a_test_image_encodes_like_the_test_image(grey_explorer):
    space, client = grey_explorer.space, grey_explorer.client
    raw = space.test_x[6, 0].numpy()  # (8, 8) uint8
    by_index = client.post("/api/encode", json={"index": 6}).json()
    wide = np.full((8, 14), 77, dtype=np.uint8)
    wide[:, 3:11] = raw  # the centre crop to the data's square cuts 3 columns each side
    for data, invert in ((png(Image.fromarray(raw, "L")), False),
                         (png(Image.fromarray(255 - raw, "L")), True),
                         (png(Image.fromarray(wide, "L")), False)):
        response = upload(client, data, invert)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["z"], by_index["z"], rtol=1e-5, atol=1e-6)
        assert np.array_equal(pixels(response.json()["input"]), raw)


def test_upload_shows_its_log_px_and_percentile_among_test_images(grey_explorer):
    from vaekit.scoring import percentiles, reference_scores, score_examples

    run, client = grey_explorer.run, grey_explorer.client
    raw = grey_explorer.space.test_x[6:7]  # (1, 1, 8, 8) uint8
    result = upload(client, png(Image.fromarray(raw[0, 0].numpy(), "L"))).json()
    expected = score_examples(run.model, raw, run.pipeline, k=100, split="upload")
    assert result["log_px"] == pytest.approx(float(expected.log_px[0]), rel=1e-9)
    assert result["log_px_se"] == pytest.approx(float(expected.log_px_se[0]), rel=1e-6)
    reference = reference_scores(run, 100, 0, write_cache=False)
    assert result["test_examples"] == len(reference) and result["score_k"] == 100
    assert result["test_percentile"] == pytest.approx(
        float(percentiles(expected.log_px, reference.log_px)[0]))
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    assert upload(client, png(Image.fromarray(noise, "L"))).json()["test_percentile"] < 5
    assert not list(run.path.glob("test-scores-*"))  # browsing writes nothing to the run


@pytest.mark.parametrize("make", [
    lambda: png(Image.new("RGBA", (30, 20), (200, 10, 10, 128))),
    lambda: png(Image.new("I;16", (12, 40), 30000)),
    lambda: png(Image.new("RGB", (64, 64), "white"), "JPEG"),
    lambda: png(Image.new("P", (9, 9)), "GIF"),
    lambda: png(Image.new("L", (8, 8), 90), "BMP"),
    lambda: png(Image.new("RGB", (16, 8), "grey"), "WEBP"),
    lambda: png(Image.new("1", (5, 300), 1)),
], ids=["rgba", "16-bit", "jpeg", "gif", "bmp", "webp", "1-bit-tall"])
def test_upload_accepts_common_images(explorer, make):
    response = upload(explorer.client, make())
    assert response.status_code == 200, response.text
    assert len(response.json()["z"]) == explorer.dims
    assert pixels(response.json()["input"]).shape == (8, 8)


def test_sample_is_reproducible_from_its_seed_and_uses_the_prior(explorer, uniform_explorer):
    client = explorer.client
    first = client.post("/api/sample", json={"seed": 42}).json()
    again = client.post("/api/sample", json={"seed": 42}).json()
    other = client.post("/api/sample", json={"seed": 43}).json()
    assert first == again and first["z"] != other["z"] and first["seed"] == 42
    with torch.random.fork_rng():
        torch.manual_seed(42)
        expected = explorer.space.model.prior.sample()
    np.testing.assert_allclose(first["z"], expected.numpy())
    fresh = client.post("/api/sample", json={}).json()
    assert 0 <= fresh["seed"] < 2**31 and len(fresh["z"]) == explorer.dims
    cube = [uniform_explorer.client.post("/api/sample", json={"seed": s}).json()["z"]
            for s in range(20)]
    assert 0 <= np.min(cube) and np.max(cube) <= 1


def test_interpolate_between_two_codes(explorer, uniform_explorer):
    start, end = [1.0, 0.0, -2.0, 0.5], [-1.0, 2.0, 0.0, 0.5]
    result = explorer.client.post("/api/interpolate", json={"start": start, "end": end,
                                                            "steps": 5}).json()
    assert result["mode"] == "spherical" and len(result["images"]) == len(result["codes"]) == 5
    assert result["codes"][0] == start and result["codes"][-1] == end
    decoded = explorer.space.decode(torch.tensor(result["codes"]))  # (5, 1, 8, 8)
    for image, expected in zip(result["images"], decoded):
        assert np.array_equal(pixels(image), as_uint8(expected))
    cube = uniform_explorer.client
    start, end = [0.1] * uniform_explorer.dims, [0.9] * uniform_explorer.dims
    assert cube.post("/api/interpolate", json={"start": start, "end": end}).json()["mode"] \
        == "linear"
    refused = cube.post("/api/interpolate", json={"start": start, "end": end,
                                                  "mode": "spherical"})
    assert refused.status_code == 422 and "use linear" in refused.json()["detail"]


def test_a_conv_run_round_trips(tiny_conv_run):
    conv = Explorer(tiny_conv_run)
    z = conv.client.post("/api/encode", json={"index": 2}).json()["z"]
    np.testing.assert_allclose(z, conv.space.code_of(2).numpy(), rtol=1e-5, atol=1e-6)
    decoded = conv.client.post("/api/decode", json={"z": z}).json()["image"]
    assert np.array_equal(pixels(decoded), as_uint8(conv.space.decode(torch.tensor([z]))[0]))
    response = upload(conv.client, png(Image.new("L", (28, 28), 128)))
    assert response.status_code == 200 and len(response.json()["z"]) == conv.dims
    path = conv.client.post("/api/interpolate", json={"start": z, "end": [0.0] * conv.dims,
                                                      "steps": 3}).json()
    assert len(path["images"]) == 3


def test_gallery_pages_through_the_test_set(explorer):
    gallery = explorer.client.get("/api/gallery", params={"offset": 3, "limit": 4}).json()
    total = len(explorer.space.test_x)
    assert gallery["total"] == total
    indices = [item["index"] for item in gallery["items"]]
    labels = explorer.space.test_y[indices].tolist()
    assert [item["label"] for item in gallery["items"]] == [str(label) for label in labels]
    raw = explorer.space.test_x[indices[0], 0].numpy()
    assert np.array_equal(pixels(gallery["items"][0]["image"]), raw)
    last = explorer.client.get("/api/gallery", params={"offset": total - 1,
                                                       "limit": 10}).json()
    assert len(last["items"]) == 1
    # all pages together: every test example once, in a shuffled order (a split ordered by
    # class shows several classes on its first page)
    pages = [explorer.client.get("/api/gallery", params={"offset": start, "limit": 100}).json()
             for start in range(0, total, 100)]
    order = [item["index"] for page in pages for item in page["items"]]
    assert sorted(order) == list(range(total)) and order != sorted(order)
    assert indices == order[3:7]


# --- bad input: 4xx with a clear message, never a 5xx -----------------------------------------


D = 4  # tiny_run's latent dimensions
BAD_REQUESTS = [
    ("decode", {"z": [0.0] * (D - 1)}, 422, "at least 4 items"),
    ("decode", {"z": [0.0] * (D + 1)}, 422, "at most 4 items"),
    ("decode", {"z": [0.0] * 3 + [10.5]}, 422, "less than or equal to 10"),
    ("decode", {"z": [-11.0] + [0.0] * 3}, 422, "greater than or equal to -10"),
    ("decode", {"z": ["1"] + [0.0] * 3}, 422, "valid number"),
    ("decode", {"z": [True] + [0.0] * 3}, 422, "valid number"),
    ("decode", {"z": [None] + [0.0] * 3}, 422, "valid number"),
    ("decode", {"z": "0,0,0,0"}, 422, "valid list"),
    ("decode", {}, 422, "z: Field required"),
    ("decode", {"z": [0.0] * 4, "extra": 1}, 422, "Extra inputs"),
    ("decode", [0.0] * 4, 422, "JSON object"),
    ("encode", {"index": -1}, 422, "greater than or equal to 0"),
    ("encode", {"index": 10**6}, 422, "less than or equal to"),
    ("encode", {"index": 1.5}, 422, "integer"),
    ("encode", {"index": "3"}, 422, "integer"),
    ("sample", {"seed": -5}, 422, "greater than or equal to 0"),
    ("sample", {"seed": 2**40}, 422, "less than or equal to"),
    ("interpolate", {"start": [0.0] * 4, "end": [0.0] * 4, "steps": 1}, 422, "steps"),
    ("interpolate", {"start": [0.0] * 4, "end": [0.0] * 4, "steps": 1000}, 422, "steps"),
    ("interpolate", {"start": [0.0] * 4, "end": [0.0] * 4, "mode": "cubic"}, 422, "mode"),
    ("interpolate", {"start": [0.0] * 4}, 422, "end: Field required"),
]


@pytest.mark.parametrize("endpoint, body, status, words", BAD_REQUESTS)
def test_bad_json_is_refused_with_a_clear_message(explorer, endpoint, body, status, words):
    response = explorer.client.post(f"/api/{endpoint}", json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail


@pytest.mark.parametrize("raw", [b'{"z": [NaN, 0, 0, 0]}', b'{"z": [Infinity, 0, 0, 0]}',
                                 b'{"z": [1e999, 0, 0, 0]}', b'{"z": [0, 0, 0, -Infinity]}'])
def test_non_finite_numbers_are_refused(explorer, raw):
    response = explorer.client.post("/api/decode", content=raw,
                                    headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite number" in response.json()["detail"]


@pytest.mark.parametrize("raw, content_type", [(b'{"z": [0, 0', "application/json"),
                                               (b"\xff\xfe\x00", "application/json"),
                                               (b'{"z": [0, 0, 0, 0]}', "text/plain"),
                                               (b"", "application/json")])
def test_malformed_bodies_are_refused(explorer, raw, content_type):
    response = explorer.client.post("/api/decode", content=raw,
                                    headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text


def test_gallery_query_is_checked(explorer):
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"offset": 10**9},
                   {"limit": "many"}):
        response = explorer.client.get("/api/gallery", params=params)
        assert response.status_code == 422, params


def fake_png_header(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims another size: decoding it would be the bomb."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("data, status, words", [
    (b"", 422, "empty"),
    (b"hello, not an image", 415, "not an image"),
    (b"%PDF-1.4 ...", 415, "not an image"),
    (b"GIF89a" + b"\x00" * 10, 415, "not an image"),
    (png(Image.new("L", (8, 8)), "TIFF"), 415, "not an image"),  # a decoder it may not use
    (png(Image.new("L", (40, 40), 9))[:60], 422, "could not be decoded"),  # truncated
    (fake_png_header(100_000, 100_000), 413, "scale it down"),
    (fake_png_header(MAX_IMAGE_SIDE + 1, 10), 413, f"{MAX_IMAGE_SIDE + 1} x 10 pixels"),
    (fake_png_header(10, 9000), 413, "10 x 9000 pixels"),
], ids=["empty", "text", "pdf", "gif-header-only", "tiff", "truncated-png", "bomb-header",
        "too-wide", "too-tall"])
def test_bad_uploads_are_refused(explorer, data, status, words):
    started = time.perf_counter()
    response = upload(explorer.client, data)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert time.perf_counter() - started < 5  # refused from the header, never decoded


def test_upload_needs_a_file_and_image_data(explorer, tmp_path):
    assert explorer.client.post("/api/encode/upload").status_code == 422
    response = explorer.client.post("/api/encode/upload", json={"file": "x"})
    assert response.status_code == 422
    # a run of vectors has nothing to upload
    data = tmp_path / "vectors.npy"
    np.save(data, np.random.default_rng(0).normal(size=(80, 5)).astype(np.float32))
    run_dir = train_tiny(tmp_path / "vectors", data=str(data), epochs=1, batch_size=16)
    vectors = Explorer(run_dir)
    response = upload(vectors.client, png(Image.new("L", (8, 8))))
    assert response.status_code == 422 and "not images" in response.json()["detail"]
    decoded = vectors.client.post("/api/decode", json={"z": [0.0] * vectors.dims})
    assert pixels(decoded.json()["image"]).shape == (10, 50, 3)  # one heat-map row


# --- Host header, traversal, size limits --------------------------------------------------------


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("localhost", True),
    ("LOCALHOST.:8000", True), ("[::1]:8000", True), ("10.1.2.3", True),
    ("evil.example.com", False), ("evil.example.com:8000", False),
    ("localhost.evil.example.com", False), ("127.0.0.1.nip.io:8000", False),
    ("", False), ("localhost:80:80", False), ("[::1", False), ("::1", False),
    ("explorer.lan:8000", False),
])
def test_host_header_is_checked(explorer, host, allowed):
    response = explorer.client.get("/api/info", headers={"host": host})
    if allowed:
        assert response.status_code == 200
    else:
        assert response.status_code == 400
        assert "Host header" in response.json()["detail"]


@pytest.mark.parametrize("origin, allowed", [
    ("http://127.0.0.1:8000", True), ("HTTP://127.0.0.1:8000", True),
    ("http://evil.example.com", False), ("http://127.0.0.1:9999", False),
    ("https://127.0.0.1:8000", False), ("null", False), ("http://localhost:8000", False),
])
def test_requests_from_other_sites_pages_are_refused(explorer, origin, allowed):
    response = explorer.client.post("/api/decode", json={"z": [0.0] * D},
                                    headers={"origin": origin, "host": "127.0.0.1:8000"})
    assert response.status_code == (200 if allowed else 403), response.text
    if not allowed:
        assert "only the explorer's own page" in response.json()["detail"]


def test_allowed_host_names_are_accepted(tiny_run):
    named = Explorer(tiny_run, allowed_hosts=["Explorer.LAN"])
    assert named.client.get("/api/info", headers={"host": "explorer.lan:8000"}).status_code \
        == 200
    assert named.client.get("/api/info", headers={"host": "other.lan"}).status_code == 400


@pytest.fixture(scope="module")
def live(explorer):
    with running(explorer.app) as url:
        yield url


def raw_get(url: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation)."""
    address = url.removeprefix("http://")
    name, port = address.split(":")
    connection = http.client.HTTPConnection(name, int(port), timeout=10)
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", host or address)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/../../../../etc/passwd", "/static/%2e%2e/server.py",
    "/static/..%2fserver.py", "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/explorer.js/../../server.py", "/static//etc/passwd", "/static/%00explorer.js",
    "/static/..\\server.py", "/static/", "/static/__init__.py", "/../../etc/passwd",
    "/static/explorer.js%00.png", "/server.py", "/static/static/index.html",
])
def test_only_the_pages_own_files_are_served(live, path):
    status, body = raw_get(live, path)
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body and b"import" not in body


def test_the_page_and_its_files(live):
    for path, kind in (("/", b"<!doctype html>"), ("/static/index.html", b"<!doctype html>"),
                       ("/static/explorer.js", b'"use strict"'),
                       ("/static/explorer.css", b":root")):
        status, body = raw_get(live, path)
        assert status == 200 and kind in body[:200], path
    import httpx

    response = httpx.get(live + "/")
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers


def test_foreign_host_is_refused_over_http(live):
    status, body = raw_get(live, "/api/info", host="attacker.example:8000")
    assert status == 400 and b"Host header" in body


def test_body_size_limits(explorer, live):
    import httpx

    response = explorer.client.post("/api/decode", content=b"0" * (MAX_BODY_BYTES + 1),
                                    headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    # a chunked body that never says its length is counted as it arrives
    chunk = b" " * 65536

    def endless():
        for _ in range(MAX_BODY_BYTES // len(chunk) + 4):
            yield chunk

    response = httpx.post(live + "/api/decode", content=endless(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    # an upload over its own limit, inside the body limit
    big = png(Image.new("L", (8, 8))) + b"\x00" * MAX_UPLOAD_BYTES
    response = upload(explorer.client, big)
    assert response.status_code == 413 and "smaller image" in response.json()["detail"]
    response = explorer.client.post("/api/decode", content=b'{"z": [0,0,0,0]}',
                                    headers={"content-type": "application/json",
                                             "content-length": "lots"})
    assert response.status_code in (400, 413)


def test_openapi_describes_every_endpoint_with_its_bounds(explorer):
    schema = explorer.client.get("/api/openapi.json").json()
    assert set(schema["paths"]) == {"/api/info", "/api/gallery", "/api/decode", "/api/encode",
                                    "/api/encode/upload", "/api/sample", "/api/interpolate"}
    code = schema["components"]["schemas"]["DecodeRequest"]["properties"]["z"]
    assert code["minItems"] == code["maxItems"] == D
    assert code["items"]["minimum"] == -10 and code["items"]["maximum"] == 10
    assert schema["components"]["schemas"]["DecodeRequest"]["additionalProperties"] is False


# --- fuzzing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, examples", [("explorer", 200), ("uniform_explorer", 100)])
def test_schemathesis_finds_no_server_error(fixture, examples, request):
    """Requests generated from the OpenAPI description, valid and invalid: never a 5xx, and
    every response as the description says (status codes, content types, schemas)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    target = request.getfixturevalue(fixture)
    app = build(target.run.path, allowed_hosts=["testserver"])[1]  # schemathesis's Host
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    statuses: Counter = Counter()
    problems: list = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call()
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                problems.append((case.operation.label, case.body, response.text[:300]))
            try:  # an upload of random bytes is schema-valid yet no image: 415 is right
                case.validate_response(response, excluded_checks=[positive_data_acceptance])
            except BaseException as failure:  # schemathesis reports a group of failures
                problems.append((case.operation.label, case.body, str(failure)[:500]))

        fuzz()
    assert not problems, problems[:5]
    assert sum(statuses.values()) >= 2 * examples * 0.9, statuses
    assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses)
    test_schemathesis_finds_no_server_error.requests = \
        getattr(test_schemathesis_finds_no_server_error, "requests", 0) + sum(statuses.values())


def test_fuzzing_sent_at_least_500_requests():
    sent = getattr(test_schemathesis_finds_no_server_error, "requests", None)
    if sent is None:
        pytest.skip("the fuzzing tests did not run in this session")
    assert sent >= 500, sent


# --- vaekit explore ------------------------------------------------------------------------------


def start_explore(run_dir, *args):
    process = subprocess.Popen([sys.executable, "-m", "vaekit", "explore", str(run_dir),
                                "--port", "0", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    while True:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"vaekit explore stopped: {process.stderr.read()}")
        lines.append(line)
        if "http://" in line:
            return process, line.split("http://", 1)[1].split("/", 1)[0], lines


def test_vaekit_explore_serves_and_stops_on_ctrl_c(tiny_run):
    import httpx

    process, address, _ = start_explore(tiny_run)
    try:
        assert address.startswith("127.0.0.1:")
        info = httpx.get(f"http://{address}/api/info", timeout=30).json()
        assert info["run"] == tiny_run.name
        page = httpx.get(f"http://{address}/", timeout=30)
        assert "vaekit explorer" in page.text
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    assert "warning" not in process.stderr.read().lower()


def test_vaekit_explore_warns_when_bound_beyond_loopback(tiny_run):
    import httpx

    process, address, lines = start_explore(tiny_run, "--host", "0.0.0.0")
    try:
        assert any("warning: listening on 0.0.0.0" in line for line in lines)
        # Ctrl-C once it serves: a signal during start-up on a loaded machine can land before
        # the server's own handler is installed
        port = address.rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=60).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_vaekit_explore_refuses_a_busy_port_and_a_bad_run(tiny_run, tmp_path, vaekit_cli):
    with running(build(tiny_run)[1]) as url:
        port = url.rsplit(":", 1)[1]
        result = vaekit_cli("explore", tiny_run, "--port", port)
    assert result.returncode == 2 and "choose another --port" in result.stderr
    assert "Traceback" not in result.stderr
    result = vaekit_cli("explore", tmp_path / "nothing")
    assert result.returncode == 2 and "no such run folder" in result.stderr
