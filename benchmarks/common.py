"""Shared pieces of the benchmarks: machine facts, the reference VAE loop, results files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"

# The 784-400-20 MLP VAE: FLOPs of one training image, counted from the matrix shapes.
# forward: x W1 (784x400), h W2 (400x40: mean and log-variance), z W3 (20x400), h W4 (400x784);
# backward: the weight gradient of each layer (same FLOPs as its forward) and the input gradient
# of every layer but the first (the data need no gradient).
LAYERS = [(784, 400), (400, 40), (20, 400), (400, 784)]
FORWARD_FLOPS = sum(2 * i * o for i, o in LAYERS)
TRAIN_FLOPS_PER_IMAGE = 2 * FORWARD_FLOPS + sum(2 * i * o for i, o in LAYERS[1:])


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def today() -> str:
    return datetime.date.today().isoformat()


def matmul_peak(batch: int = 128, repeats: int = 300) -> float:
    """FLOP/s of exactly the matrix products of one training step of the 784-400-20 VAE."""
    import time

    import torch

    x = torch.randn(batch, 784)
    weights = [torch.randn(i, o) for i, o in LAYERS]
    acts = {i: torch.randn(batch, i) for i, _ in LAYERS}
    outs = {o: torch.randn(batch, o) for _, o in LAYERS}
    acts[784] = x

    def step():
        for (i, o), w in zip(LAYERS, weights):
            acts[i] @ w  # forward
            acts[i].T @ outs[o]  # weight gradient
        for (i, o), w in zip(LAYERS[1:], weights[1:]):
            outs[o] @ w.T  # input gradient

    for _ in range(20):
        step()
    best = float("inf")
    for _ in range(5):  # best of five blocks: the machine's capability, not its noise
        started = time.perf_counter()
        for _ in range(repeats // 5):
            step()
        best = min(best, (time.perf_counter() - started) / (repeats // 5))
    return TRAIN_FLOPS_PER_IMAGE * batch / best


def run_json(args: list[str], env: dict | None = None) -> dict:
    """Run a Python subprocess that prints one JSON object as its last stdout line."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{args} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def record(section: str, body: str) -> None:
    """Replace (or add) `## section` in RESULTS.md with body."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = f"## {section}"
    lines = text.splitlines()
    if header in lines:
        start = lines.index(header)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [header, "", *body.strip().splitlines(), ""]
    else:
        lines += ["", header, "", *body.strip().splitlines(), ""]
    RESULTS.write_text("\n".join(lines).rstrip() + "\n")
