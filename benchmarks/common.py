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


# A Trainer of the 784-400-20 VAE on Fashion-MNIST and steps(first, count), which does what
# Trainer.fit does per step without its bookkeeping: the setup of arms that time training steps.
STEP_SETUP = """
import json, sys, tempfile
from pathlib import Path
import torch
from vaekit.config import TrainConfig
from vaekit.distributed import DistContext
from vaekit.randomness import StepNoise, epoch_permutation
from vaekit.train import Trainer, build_model, prepare_data

config = TrainConfig(data="fashion-mnist", epochs=1, batch_size=128, hidden=[400], latent_dim=20,
                     likelihood="bernoulli", lr=1e-3, lr_decay=1.0, progress=False).with_presets()
dataset, pipeline, config = prepare_data(config)
trainer = Trainer(config, Path(tempfile.mkdtemp()), dataset, pipeline,
                  build_model(config, dataset.shape), torch.device("cpu"), DistContext(),
                  log=lambda *a, **k: None)
order = epoch_permutation(len(trainer.train_x), 0, 0, torch.device("cpu"))

def steps(first, count):  # what Trainer.fit does per step, without its bookkeeping
    for step in range(first, first + count):
        raw = trainer.train_x.index_select(0, order[step * 128:(step + 1) * 128])
        noise = StepNoise(0, step, 128, slice(0, 128), torch.device("cpu"))
        trainer.train_step(raw, noise.uniform(dataset.shape), noise.normal(20))
"""


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


def commit() -> str:
    """The short hash of the checkout's HEAD, for RESULTS.md."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                          text=True).stdout.strip()


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


# Importance sampling with the same VAE: the encoder runs once per example, the decoder once
# per importance sample (z W3: 20x400, h W4: 400x784); nothing else is a matrix product.
ENCODER_LAYERS = LAYERS[:2]
DECODER_LAYERS = LAYERS[2:]
IS_FLOPS_PER_EXAMPLE = sum(2 * i * o for i, o in ENCODER_LAYERS)
IS_FLOPS_PER_SAMPLE = sum(2 * i * o for i, o in DECODER_LAYERS)


def is_matmul_peak(rows: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096),
                   samples: int = 32768) -> tuple[float, int]:
    """FLOP/s of exactly the decoder's matrix products of importance sampling, (M, 20) x
    (20, 400) then (M, 400) x (400, 784), at the best of several row counts M (samples decoded
    at once): the machine's capability on these shapes, and the M that reached it."""
    import time

    import torch

    (latent, hidden), (_, pixels) = DECODER_LAYERS
    first, second = torch.randn(hidden, latent), torch.randn(pixels, hidden)  # (out, in)
    best_rate, best_rows = 0.0, rows[0]
    for m in rows:
        z, h, out = torch.randn(m, latent), torch.empty(m, hidden), torch.empty(m, pixels)
        passes = max(1, samples // m)

        def decode():
            for _ in range(passes):
                torch.mm(z, first.T, out=h)
                torch.mm(h, second.T, out=out)

        decode()
        best = float("inf")
        for _ in range(5):  # best of five blocks: the machine's capability, not its noise
            started = time.perf_counter()
            decode()
            best = min(best, time.perf_counter() - started)
        rate = IS_FLOPS_PER_SAMPLE * m * passes / best
        if rate > best_rate:
            best_rate, best_rows = rate, m
    return best_rate, best_rows


def is_matmul_seconds(examples: int, k: int, rows: int) -> float:
    """Wall time of exactly the matrix products of importance sampling with k samples on
    `examples` images, and nothing else: the encoder on the images, then the decoder's two
    products on all the samples, `rows` samples at a time (the best M of is_matmul_peak)."""
    import time

    import torch

    (latent, hidden), (_, pixels) = DECODER_LAYERS
    (inputs, _), (_, outputs) = ENCODER_LAYERS
    encoder = [torch.randn(o, i) for i, o in ENCODER_LAYERS]  # (out, in), as nn.Linear
    first, second = torch.randn(hidden, latent), torch.randn(pixels, hidden)
    x = torch.randn(examples, inputs)
    z, h, out = torch.randn(rows, latent), torch.empty(rows, hidden), torch.empty(rows, pixels)
    passes, rest = divmod(examples * k, rows)
    started = time.perf_counter()
    torch.mm(torch.mm(x, encoder[0].T), encoder[1].T)  # (N, 40)
    for _ in range(passes):
        torch.mm(z, first.T, out=h)
        torch.mm(h, second.T, out=out)
    if rest:
        torch.mm(z[:rest], first.T, out=h[:rest])
        torch.mm(h[:rest], second.T, out=out[:rest])
    return time.perf_counter() - started


def load_average() -> float:
    return os.getloadavg()[0]


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
