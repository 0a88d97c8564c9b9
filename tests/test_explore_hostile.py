"""The explorer against hostile clients and hostile runs, over real sockets on 127.0.0.1.

Idle and half-open connections, a request head sent a byte at a time, a chunked body that never
ends; a run whose class folder names are not UTF-8; evaluation.json and metrics.jsonl nested
deeper than any parser's recursion. Every socket count and wait here is bounded (at most 80
sockets, a few seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import train_tiny

pytest.importorskip("fastapi")

from vaekit.explore.connections import MAX_PER_CLIENT  # noqa: E402
from vaekit.explore.server import build, running  # noqa: E402

SHORT = {"header_timeout": 1.0, "body_timeout": 1.5}


@pytest.fixture(scope="module")
def app(tiny_run):
    return build(tiny_run)[1]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def get(url: str, path: str = "/api/info") -> int:
    with urllib.request.urlopen(url + path, timeout=10) as response:
        response.read()
        return response.status


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds`, and what it sent before."""
    sock.settimeout(0.2)
    received, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def test_idle_and_half_open_connections_cannot_crowd_out_requests(app):
    with running(app) as url:  # the default limits: header timeout 10 s
        idle = []
        try:
            for number in range(70):
                sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)
                if number % 2:
                    sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127")  # a head never finished
                idle.append(sock)
            statuses = [get(url) for _ in range(5)]
        finally:
            for sock in idle:
                sock.close()
    assert statuses == [200] * 5
    assert len(idle) == 70 > MAX_PER_CLIENT


def test_a_request_head_sent_slowly_is_cut_off(app):
    with running(app, **SHORT) as url:
        sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)
        started = time.monotonic()
        closed = False
        try:
            for byte in b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
                sock.sendall(bytes([byte]))  # each byte keeps uvicorn's keep-alive timer off
                time.sleep(0.1)
                if time.monotonic() - started > 4:
                    break
        except OSError:
            closed = True  # the server closed it while we were still sending
        if not closed:
            closed, _ = closed_within(sock, 3)
        sock.close()
        assert closed and time.monotonic() - started < 6
        assert get(url) == 200


def test_a_chunked_body_that_never_ends_is_cut_off(app):
    with running(app, **SHORT) as url:
        sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)
        sock.sendall(b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: "
                     b"application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        started, received, closed = time.monotonic(), b"", False
        sock.settimeout(0.1)
        while time.monotonic() - started < 6:
            try:
                sock.sendall(b"1\r\n \r\n")  # one space at a time, for ever
                data = sock.recv(4096)
                if not data:
                    closed = True
                    break
                received += data
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        sock.close()
        assert closed, "the endless body was not cut off"
        assert received.startswith(b"HTTP/1.1 408"), received[:100]
        assert b"did not arrive within" in received
        assert get(url) == 200


def test_a_client_cannot_hold_more_than_its_share_of_connections(app):
    with running(app, max_per_client=4, header_timeout=60) as url:
        socks = [socket.create_connection(("127.0.0.1", port_of(url)), timeout=5)
                 for _ in range(8)]
        try:
            time.sleep(0.5)
            # The oldest idle ones were closed to make room for the newest four.
            states = [closed_within(sock, 0.3)[0] for sock in socks]
            assert states[:4] == [True] * 4 and states[4:] == [False] * 4
            assert get(url) == 200
        finally:
            for sock in socks:
                sock.close()


@pytest.fixture(scope="module")
def non_utf8_run(tmp_path_factory) -> Path:
    """A run on an image folder whose class folders' names are not UTF-8."""
    root = tmp_path_factory.mktemp("non-utf8")
    data = root / "images"
    data.mkdir()
    for index, name in enumerate([b"caf\xe9", b"\xff\xfe", b"plain"]):
        sub = Path(os.fsdecode(bytes(data) + b"/" + name))
        sub.mkdir()
        for i in range(6):
            Image.new("L", (8, 8), 30 * index + i).save(sub / f"{i}.png")
    return train_tiny(root / "run", data=str(data), epochs=1, batch_size=8)


def test_class_names_that_are_not_utf8_are_escaped(non_utf8_run, tmp_path):
    document = json.loads((non_utf8_run / "config.json").read_text())
    assert document["data"]["label_names"] == ["caf\\xe9", "plain", "\\xff\\xfe"]
    # A run written before names were escaped holds lone surrogates in config.json.
    old = Path(shutil.copytree(non_utf8_run, tmp_path / "old"))
    text = (old / "config.json").read_text().replace("caf\\\\xe9", "caf\\udce9")
    (old / "config.json").write_text(text)
    for run in (non_utf8_run, old):
        with running(build(run)[1]) as url:
            with urllib.request.urlopen(url + "/api/info", timeout=10) as response:
                info = json.loads(response.read())
            with urllib.request.urlopen(url + "/api/gallery?limit=10", timeout=10) as response:
                gallery = json.loads(response.read())
            assert get(url, "/api/openapi.json") == 200
        assert info["label_names"][0] == "caf\\xe9"
        assert {item["label"] for item in gallery["items"]} <= set(info["label_names"])


@pytest.mark.parametrize("name", ["evaluation.json", "metrics.jsonl"])
@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"elbo": NaN}',
                                     "\xff not utf-8"])
def test_a_hostile_evaluation_or_metrics_file_does_not_stop_the_explorer(tiny_run, tmp_path,
                                                                         name, content):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / name).write_bytes(content.encode("latin-1"))
    with running(build(run)[1]) as url:
        with urllib.request.urlopen(url + "/api/info", timeout=10) as response:
            info = json.loads(response.read())
    if name == "evaluation.json":
        assert info["evaluation"] is None
    else:
        assert info["test_elbo"] is None
