"""The explorer's web server: a JSON API over `latent_space.LatentSpace`, and one static page.

    GET  /                    the page (static/index.html with explorer.js and explorer.css)
    GET  /api/info            the run: name, data, prior, dimensions by use, ELBO and log p(x)
    GET  /api/gallery         test examples to pick from
    POST /api/decode          a code z -> E[x | z] as a PNG
    POST /api/encode          a test example -> its posterior mean code
    POST /api/encode/upload   an uploaded image -> its posterior mean code
    POST /api/sample          z ~ p(z), decoded
    POST /api/interpolate     the path between two codes, decoded
    GET  /api/openapi.json    the OpenAPI description of the API

Safety. The server listens on loopback unless told otherwise. It answers only requests whose Host
header names localhost, an IP address or a name given with --allow-host, so a web page on a
domain its author controls cannot reach the explorer by pointing that domain at 127.0.0.1 (DNS
rebinding), and refuses requests that pages of other sites send (the Origin header). Request
bodies are limited before they are read; uploaded images are checked for format and pixel
dimensions from their header before any pixel is decoded; every field is validated (length,
finiteness, range) and a bad one gets a 4xx with one line saying why. Only the page's own three
files are served, from memory, by name. Nothing a request sends is written to disk or unpickled.
The checks live in their own modules: guard.py (hosts, origins, body sizes, requests in flight,
security headers), schemas.py (every request and response model), uploads.py (uploaded images).

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
time, and the request models are built per run (their lengths and bounds depend on it).
"""

import base64
import errno
import ipaddress
import math
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__, jsonio
from ..errors import VaekitError
from ..latent_space import LatentSpace, interpolation_path
from ..safefiles import printable
from ..viz import is_image_shape, png_bytes, single_image
from .guard import MAX_IN_FLIGHT, Guard  # noqa: F401  (MAX_IN_FLIGHT: the server's limits)
from .schemas import (  # noqa: F401  (the limits, read by tests and clients from here)
    ERRORS,
    MAX_DETAIL_TEMPERATURE,
    MAX_STEPS,
    Encoded,
    Gallery,
    Info,
    InterpolationPath,
    Picture,
    Sampled,
    request_models,
)
from .uploads import MAX_IMAGE_SIDE, MAX_UPLOAD_BYTES, UPLOAD_FORMATS, image_to_raw

MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 2**10  # the upload plus its multipart framing
GALLERY_LIMIT = 100  # test examples per gallery request
SLIDER_WIDTH = 3.0  # sliders span +-3 prior standard deviations (the whole cube when uniform)
# The API accepts codes within +-10 prior standard deviations: the prior puts no mass to speak of
# beyond (about 1e-23 per coordinate) and the decoder was never trained there.
CODE_WIDTH = 10.0
STATIC_FILES = {"index.html": "text/html; charset=utf-8",
                "explorer.js": "text/javascript; charset=utf-8",
                "explorer.css": "text/css; charset=utf-8"}
# ------------------------------------------------------------------------------------------------
# The app


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_evaluation(run_dir: Path) -> dict | None:
    """evaluation.json's finite numbers (elbo, log_px, log_px_se, k, n, and subset_of: the
    split's size when n is a random subset), or None if absent/unusable."""
    path = Path(run_dir) / "evaluation.json"
    if not path.exists():
        return None
    try:  # size- and depth-limited: a planted file cannot stop the explorer from starting
        document = jsonio.read_json(path, "evaluation.json")
    except (OSError, VaekitError):
        return None
    if not isinstance(document, dict):
        return None
    found = {}
    subset = document.get("subset")
    if isinstance(subset, dict):
        document["subset_of"] = subset.get("of")
    for key, kind in (("elbo", float), ("log_px", float), ("log_px_se", float), ("k", int),
                      ("n", int), ("subset_of", int)):
        value = document.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and (kind is float or float(value).is_integer()):
            found[key] = kind(value)
    return found or None


def last_test_elbo(run_dir: Path) -> tuple[float | None, int | None]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None, None
    try:
        lines = jsonio.read_text(path, "metrics.jsonl").splitlines()
    except (OSError, VaekitError):
        return None, None
    for line in reversed(lines):
        try:
            record = jsonio.loads(line, str(path))
        except VaekitError:
            continue
        value = record.get("test_elbo") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            epoch = record.get("epoch")
            return float(value), epoch if isinstance(epoch, int) else None
    return None, None


def run_info(run, space: LatentSpace) -> dict:
    prior = space.prior
    test_elbo, epochs = last_test_elbo(run.path)
    names = None if space.label_names is None else [printable(n) for n in space.label_names]
    # Names come from the run's folders and files: any bytes, shown as valid text (JSON).
    return dict(
        run=printable(run.name), dataset=printable(run.data["name"]),
        data_shape=list(space.data_shape),
        images=is_image_shape(space.data_shape), n_test=len(space.test_x),
        label_names=names, latent_dim=space.latent_dim, prior=run.config.prior,
        prior_description=prior.description, likelihood=run.config.likelihood,
        scoring=printable(run.pipeline.description), slider_range=prior.range(SLIDER_WIDTH),
        code_range=prior.range(CODE_WIDTH), interpolation_modes=list(prior.interpolation_modes),
        dims_by_use=space.dims_by_use, kl_per_dimension=space.kl_per_dimension.tolist(),
        unused=space.unused, test_elbo=test_elbo, epochs=epochs,
        evaluation=read_evaluation(run.path), max_upload_bytes=MAX_UPLOAD_BYTES,
        max_image_side=MAX_IMAGE_SIDE, max_steps=MAX_STEPS, gallery_limit=GALLERY_LIMIT,
        groups=space.groups, detail_dim=space.detail_dim, lower_groups=space.lower_groups)


def describe_error(error: dict) -> str:
    if tuple(error.get("loc", ())) == ("body",) and error.get("type") in (
            "model_attributes_type", "dict_type", "model_type"):
        return "body: expected a JSON object, sent with content-type: application/json"
    where = ""
    for part in error.get("loc", ()):
        if part in ("body", "query"):
            continue
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return f"{where or 'request'}: {error.get('msg', 'invalid')}"


def create_app(space: LatentSpace, info: dict, allowed_hosts=(), score_upload=None) -> FastAPI:
    """The explorer for one latent space; info is run_info's dictionary. score_upload(raw):
    log p(x) of an uploaded image and its test-set percentile (scoring.SingleExampleScorer)."""
    app = FastAPI(title=f"vaekit explorer: {info['run']}", version=__version__,
                  description="Decode codes, encode images and walk the latent space of a "
                  "trained VAE. Codes are lists of latent_dim numbers inside code_range (see "
                  "/api/info).", openapi_url="/api/openapi.json", docs_url=None, redoc_url=None)
    code_range = tuple(info["code_range"])
    DecodeRequest, EncodeRequest, SampleRequest, InterpolateRequest = \
        request_models(space, code_range)
    pipeline, model = space.pipeline, space.model
    if info["images"]:
        limits = None
    else:  # vectors: one colour scale for every picture, the test set's range
        limits = (float(space.test_x.min()), float(space.test_x.max()))
    sample_lock = threading.Lock()  # the seeded draw borrows the global RNG
    gallery_cache: dict[int, str] = {}
    # The gallery pages through the test set in a seeded random order: an image folder's test
    # split is ordered by class, and the first page showed one class only.
    gallery_order = torch.randperm(len(space.test_x), generator=torch.Generator().manual_seed(0))
    static = {name: (resources.files("vaekit.explore").joinpath("static", name).read_bytes(),
                     media) for name, media in STATIC_FILES.items()}

    def picture(x: torch.Tensor) -> str:
        return data_url(png_bytes(single_image(x, limits)))

    def encoded(index: int | None, x: torch.Tensor) -> dict:
        z = space.codes(x)  # (1, D)
        return {"index": index, "z": z[0].tolist(), "input": picture(pipeline.display(x)[0]),
                "image": picture(space.decode(z)[0])}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        errors = exc.errors()
        detail = describe_error(errors[0]) if errors else "invalid request"
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        body, media = static["index.html"]
        return Response(body, media_type=media)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, f"no file {name!r} here")
        body, media = static[name]
        return Response(body, media_type=media)

    @app.get("/api/info", response_model=Info, summary="The run and its latent space")
    def get_info():
        return info

    @app.get("/api/gallery", response_model=Gallery, responses=ERRORS,
             summary="Test examples to pick from")
    def gallery(offset: Annotated[int, Query(ge=0, le=max(len(space.test_x) - 1, 0))] = 0,
                limit: Annotated[int, Query(ge=1, le=GALLERY_LIMIT)] = 24):
        stop = min(offset + limit, len(space.test_x))
        items = []
        for position in range(offset, stop):
            index = int(gallery_order[position])  # shuffled: a split ordered by class
            if index not in gallery_cache:
                gallery_cache[index] = picture(space.test_x[index].float() / 255.0
                                               if pipeline.kind == "image8"
                                               else space.test_x[index])
            label = None
            if space.test_y is not None:
                number = int(space.test_y[index])
                names = info["label_names"] or []  # printable already
                label = names[number] if number < len(names) else str(number)
            items.append({"index": index, "label": label, "image": gallery_cache[index]})
        return {"total": len(space.test_x), "items": items}

    @app.post("/api/decode", response_model=Picture, responses=ERRORS,
              summary="E[x | z] for a code z")
    def decode(request: DecodeRequest):
        z = torch.tensor(request.z, dtype=torch.float32)  # (D,)
        seed = getattr(request, "detail_seed", None)
        chosen = getattr(request, "detail", None)
        if seed is not None and chosen is not None:
            raise HTTPException(422, "give the lower groups' detail or a detail_seed, not both")
        if chosen is None and seed is None:
            return {"image": picture(space.decode(z[None])[0])}
        if chosen is not None:
            detail = torch.tensor(chosen, dtype=torch.float32)[None]  # (1, D_lower)
        else:
            generator = torch.Generator().manual_seed(seed)
            detail = request.detail_temperature * torch.randn(
                1, space.detail_dim, generator=generator)  # (1, D_lower)
        return {"image": picture(space.decode(z[None], detail)[0]),
                "detail": detail[0].tolist()}

    @app.post("/api/encode", response_model=Encoded, responses=ERRORS,
              summary="The posterior mean code of a test example")
    def encode(request: EncodeRequest):
        return encoded(request.index, space.inputs([request.index]))

    @app.post("/api/encode/upload", response_model=Encoded, responses=ERRORS,
              summary="The posterior mean code of an uploaded image")
    def encode_upload(file: Annotated[UploadFile, File(description=(
                          f"an image ({', '.join(UPLOAD_FORMATS)}), at most "
                          f"{MAX_UPLOAD_BYTES} bytes and {MAX_IMAGE_SIDE} pixels a side"))],
                      invert: Annotated[bool, Form(description="swap dark and light (for "
                                                   "dark strokes on a light ground)")] = False):
        if not info["images"]:
            raise HTTPException(422, "this run's data are not images; encode a test example "
                                "from the gallery instead")
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is over {MAX_UPLOAD_BYTES} bytes; choose a "
                                "smaller image")
        raw = image_to_raw(data, space.data_shape, invert)  # (1, C, H, W) uint8
        x = pipeline.fixed(raw.to(space.device), 0, split="upload")
        scored = score_upload(raw.to(space.device)) if score_upload is not None else None
        return {**encoded(None, x), **(scored or {})}

    @app.post("/api/sample", response_model=Sampled, responses=ERRORS,
              summary="A code drawn from the prior, decoded")
    def sample(request: SampleRequest):
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        devices = [space.device] if space.device.type == "cuda" else []
        with sample_lock, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            z = model.prior.sample()  # (D,)
        return {"seed": seed, "z": z.tolist(), "image": picture(space.decode(z[None])[0])}

    @app.post("/api/interpolate", response_model=InterpolationPath, responses=ERRORS,
              summary="Codes on the path between two codes, decoded")
    def interpolate(request: InterpolateRequest):
        modes = space.prior.interpolation_modes
        mode = request.mode or modes[0]
        if mode not in modes:
            raise HTTPException(422, f"mode: {mode!r} does not suit the "
                                f"{space.prior.description} prior; use {' or '.join(modes)}")
        start = torch.tensor(request.start, dtype=torch.float32)
        end = torch.tensor(request.end, dtype=torch.float32)
        path = interpolation_path(start, end, request.steps, mode)  # (S, D)
        path = path.clamp(*code_range)  # rounding must not step outside the accepted range
        decoded = space.decode(path)  # (S, *shape)
        return {"mode": mode, "codes": path.tolist(), "images": [picture(x) for x in decoded]}

    names = frozenset({"localhost", *(h.lower().rstrip(".") for h in allowed_hosts)})
    app.add_middleware(Guard, allowed_hosts=names, max_body=MAX_BODY_BYTES)
    return app


# ------------------------------------------------------------------------------------------------
# Serving


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise VaekitError(f"--host {host}: not an address this computer can listen on "
                          f"({getattr(exc, 'strerror', exc)}); use 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise VaekitError(f"--host {host}: not an address of this computer; use 127.0.0.1 "
                              "(or an address this computer has)") from None
        raise VaekitError(f"cannot listen on {host} port {port} ({exc.strerror}); choose another "
                          "--port (0 picks a free one)") from None
    return sock


def make_server(app, log_level: str = "warning", **limits):
    """A uvicorn server for the app; run it with server.run(sockets=[bind_socket(...)]).

    limits: connections.limited_protocol's timeouts and caps (tests shorten them). No
    limit_concurrency: uvicorn counts idle connections in it (see connections.py); requests in
    progress are capped by the Guard instead.
    """
    import uvicorn

    from .connections import limited_protocol

    config = uvicorn.Config(app, log_level=log_level, http=limited_protocol(**limits),
                            timeout_keep_alive=5, server_header=False, access_log=False)
    return uvicorn.Server(config)


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, **limits):
    """Serve the app from a background thread while the block runs; yields its base URL."""
    sock = bind_socket(host, port)
    server = make_server(app, **limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the explorer's server stopped while starting")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def build(run_dir, allowed_hosts=(), device: str = "cpu"):
    """(run, app) for a run folder: the model, its test set and the explorer over them."""
    from ..runs import load_run
    from ..device import resolve_device

    from ..scoring import SingleExampleScorer

    run = load_run(run_dir, resolve_device(device))
    space = LatentSpace.of_run(run)
    return run, create_app(space, run_info(run, space), allowed_hosts,
                           score_upload=SingleExampleScorer(run))


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, allowed_hosts=(),
          device: str = "cpu", log=print) -> None:
    """Serve the explorer of a run until interrupted."""
    names = [*allowed_hosts, host] if not is_loopback(host) else list(allowed_hosts)
    sock = bind_socket(host, port)  # first: a busy port or a wrong address fails at once
    try:
        run, app = build(run_dir, names, device)
    except BaseException:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    if not is_loopback(host):
        log(f"warning: listening on {host}, not only on this computer: anyone who can reach "
            f"this address can use the explorer and load its CPU; use --host 127.0.0.1 unless "
            "you mean to share it")
    shown = f"[{host}]" if ":" in host else host
    log(f"vaekit explore: {printable(run.name)} on http://{shown}:{bound_port}/  (Ctrl-C to "
        "stop)")
    try:
        make_server(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then passes Ctrl-C on
        pass
    log("vaekit explore: stopped")
