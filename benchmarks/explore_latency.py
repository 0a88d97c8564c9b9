"""Decode latency of the explorer's API for a 28x28 model: what the page waits for per slider move.

    python benchmarks/explore_latency.py [--run RUN_DIR] [--requests 2000]

`vaekit explore` runs as users run it, in its own process; this script sends POST /api/decode
requests over loopback HTTP with a keep-alive client, one at a time as the page does, each with
a new code spread over the sliders' range, and reports the median and 99th percentile of the
round trip (goals: median < 10 ms, p99 < 50 ms). It also times the parts in-process: the
decoder alone, and the decoder plus PNG encoding. The figures go to the `explore_latency`
section of benchmarks/RESULTS.md (replaced on each run), with the machine, date and versions;
--no-record only prints them.

Without --run it makes its own runs, trained for a few seconds (latency does not depend on what
the weights have learned): Kingma & Welling's 784-400-20 MLP VAE, and the default conv VAE, on
Fashion-MNIST when it is on this machine, else on 28x28 random strokes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, record, today  # noqa: E402

SECTION = "explore_latency"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_run(folder: Path, net: str) -> Path:
    """A 28x28 run trained for a few seconds (from the real CLI)."""
    from vaekit.data import locate_idx_files
    from vaekit.errors import DataError

    try:
        locate_idx_files("fashion-mnist", None, download=False)
        data = ["--data", "fashion-mnist"]
    except DataError:
        strokes = folder / "strokes.npy"
        rng = np.random.default_rng(0)
        np.save(strokes, ((rng.random((2000, 28, 28)) < 0.2) * 255).astype(np.uint8))
        data = ["--data", str(strokes)]
    run = folder / f"{net}-28x28"
    subprocess.run([sys.executable, "-m", "vaekit", "train", *data, "--net", net,
                    "--latent-dim", "20", "--hidden", "400", "--epochs", "1",
                    "--time-limit", "5", "--no-progress", "--out", str(run)],
                   check=True, stdout=subprocess.DEVNULL)
    return run


def start_explorer(run: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "vaekit", "explore", str(run), "--port",
                                "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if "http://" in line:
            return process, "http://" + line.split("http://", 1)[1].split("/", 1)[0]
    raise RuntimeError(f"vaekit explore did not start: {process.stderr.read()}")


def http_latency(url: str, requests: int, seed: int = 0) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/api/info").json()
        low, high = info["slider_range"]
        rng = np.random.default_rng(seed)
        codes = rng.uniform(low, high, size=(requests + 100, info["latent_dim"])).tolist()
        seconds = []
        for index, z in enumerate(codes):
            started = time.perf_counter()
            response = client.post("/api/decode", json={"z": z})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if index >= 100:  # the first 100 warm up the connection, caches and allocator
                seconds.append(elapsed)
    return {"info": info, "ms": [1000 * s for s in seconds]}


def in_process_latency(run: Path, repeats: int = 2000) -> dict:
    import torch

    from vaekit.explore.server import data_url
    from vaekit.runs import load_run
    from vaekit.latent_space import LatentSpace
    from vaekit.viz import png_bytes, single_image

    loaded = load_run(run)
    space = LatentSpace.of_run(loaded)
    low, high = space.prior.range(3.0)
    codes = torch.empty(repeats, 1, space.latent_dim).uniform_(low, high)  # (R, 1, D)
    decode_ms, picture_ms = [], []
    for z in codes:
        started = time.perf_counter()
        x = space.decode(z)[0]  # (1, 28, 28)
        middle = time.perf_counter()
        data_url(png_bytes(single_image(x)))
        done = time.perf_counter()
        decode_ms.append(1000 * (middle - started))
        picture_ms.append(1000 * (done - middle))
    return {"decode_ms": decode_ms, "picture_ms": picture_ms, "threads": torch.get_num_threads()}


def versions() -> str:
    import fastapi
    import uvicorn

    import vaekit

    return f"vaekit {vaekit.__version__}, fastapi {fastapi.__version__}, uvicorn " \
           f"{uvicorn.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", type=Path, help="run folder(s) of a 28x28 "
                        "model to measure (default: train an MLP and a conv run briefly)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per run")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.run or [make_run(Path(scratch), net) for net in ("mlp", "conv")]
        for run in runs:
            process, url = start_explorer(run)
            try:
                measured = http_latency(url, args.requests)
            finally:
                process.terminate()
                process.wait(timeout=30)
            parts = in_process_latency(run)
            info, ms = measured["info"], measured["ms"]
            if info["data_shape"][-2:] != [28, 28]:
                print(f"note: {run} is not a 28x28 model ({info['data_shape']})")
            net = "conv" if "conv" in Path(run).name else "mlp"
            rows.append({
                "model": f"{info['dataset']} {'x'.join(map(str, info['data_shape']))}, "
                         f"{net}, z in R^{info['latent_dim']}",
                "median": statistics.median(ms), "p99": percentile(ms, 99), "max": max(ms),
                "decode": statistics.median(parts["decode_ms"]),
                "picture": statistics.median(parts["picture_ms"]),
                "n": len(ms), "threads": parts["threads"]})

    verdict = all(r["median"] < 10 and r["p99"] < 50 for r in rows)
    table = ["| model | requests | median ms | p99 ms | max ms | decoder alone ms | PNG + base64 "
             "ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['n']} | {r['median']:.2f} | {r['p99']:.2f} | "
                     f"{r['max']:.1f} | {r['decode']:.3f} | {r['picture']:.3f} |")
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    text = "\n".join([
        f"- machine: {machine()}; {versions()}",
        f"- date: {today()}; load average at the start {load}",
        "",
        "Round trip of POST /api/decode over loopback HTTP to `vaekit explore` in its own process "
        "(keep-alive client, one request at a time, a new code in the sliders' range each time, "
        "after 100 warm-up requests): JSON parsing and validation, decoding E[x|z], PNG and "
        "base64 encoding, HTTP. The last two columns time those parts in-process (median, "
        f"{rows[0]['threads']} torch threads).",
        "",
        *table,
        "",
        f"Goals: median < 10 ms, p99 < 50 ms: {'met' if verdict else 'NOT met'}.",
        "",
    ])
    print(text)
    if not args.no_record:
        record(SECTION, text)
        print(f"wrote the {SECTION} section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
