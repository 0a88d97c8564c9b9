"""The hierarchical VAE's training step and importance sampling against its own matrix products.

For each model, on dynamically binarised Fashion-MNIST (batch 128), one thread, CPU time
(time.process_time, which a busy shared machine disturbs far less than wall time):

    flat        the 784-400-20 MLP VAE (the reference of train_throughput.py)
    hierarchy   the two-group top-down hierarchy, groups 16 + 32, width 400 (recipes/)

1. Training: the CPU time of vaekit's training step (Trainer.train_step, the loop's own step:
   binarisation, noise, forward, backward, Adam), 200 steps after 30 of warm-up, against the CPU
   time of exactly the step's matrix products: every product of a step, forward and backward
   (recorded at the aten level by a dispatch mode, with its shapes), each timed alone at its
   shape, at the best of 5 repetitions.
   The share is matmul time / step time: the step's throughput as a fraction of the fp32 matmul
   throughput on its own shapes (goal for the hierarchy: at least 40 %).
2. Importance sampling: the CPU time of `estimate.evaluate` (k = 1000 on 100 test images, the
   naive estimator off: what `vaekit evaluate --no-naive` runs) against its matrix products,
   recorded the same way during that very evaluation (goal for the hierarchy: at most 1.5 x).

    OMP_NUM_THREADS=1 python benchmarks/hierarchy_throughput.py [--steps 200] [--k 1000]
        [--examples 100] [--no-record]

About 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, today  # noqa: E402

MODELS = {
    "flat 784-400-20": dict(hidden=[400], latent_dim=20),
    "hierarchy 16 + 32, width 400": dict(hidden=[400], latent_groups=[16, 32], latent_dim=48),
}


class MatmulCalls(TorchDispatchMode):
    """Counts the shapes of every matrix product (mm, addmm, bmm, baddbmm at the aten level:
    nn.Linear, the decoder fast path and autograd's backward products alike) while active."""

    aten = torch.ops.aten
    PRODUCTS = {aten.mm.default: (0, 1), aten.mm.out: (0, 1), aten.addmm.default: (1, 2),
                aten.addmm.out: (1, 2), aten.bmm.default: (0, 1), aten.bmm.out: (0, 1),
                aten.baddbmm.default: (1, 2), aten.baddbmm.out: (1, 2)}

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self.PRODUCTS.get(func)
        if func is torch.ops.aten.linear.default:  # not decomposed under inference_mode
            x, weight = args[0], args[1]
            rows = x.numel() // weight.shape[1]
            self.calls[((rows, weight.shape[1]), (weight.shape[1], weight.shape[0]))] += 1
        elif operands is not None:
            a, b = (args[i] for i in operands)
            self.calls[(tuple(a.shape), tuple(b.shape))] += 1
        return func(*args, **(kwargs or {}))


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def matmul_seconds(calls: Counter, inner: int = 10) -> tuple[float, float]:
    """CPU seconds of exactly these products, each timed alone at its shape, and their FLOPs."""
    total, flops = 0.0, 0.0
    for (left, right), count in calls.items():
        a, b = torch.randn(left), torch.randn(right)
        out = torch.empty(*left[:-1], right[-1])
        product = torch.bmm if a.dim() == 3 else torch.mm

        def products():
            for _ in range(inner):
                product(a, b, out=out)

        total += best_seconds(products) / inner * count
        flops += 2 * a.numel() * right[-1] * count
    return total, flops


def measure(name: str, options: dict, steps: int, k: int, examples: int) -> dict:
    from vaekit.config import TrainConfig
    from vaekit.distributed import DistContext
    from vaekit.estimate import evaluate
    from vaekit.randomness import StepNoise, epoch_permutation
    from vaekit.train import Trainer, build_model, prepare_data

    config = TrainConfig(data="fashion-mnist", epochs=1, batch_size=128, likelihood="bernoulli",
                         lr=1e-3, lr_decay=1.0, progress=False, **options).with_presets()
    dataset, pipeline, config = prepare_data(config)
    trainer = Trainer(config, Path(tempfile.mkdtemp()), dataset, pipeline,
                      build_model(config, dataset.shape), torch.device("cpu"), DistContext(),
                      log=lambda *a, **kw: None)
    order = epoch_permutation(len(trainer.train_x), 0, 0, torch.device("cpu"))
    dims = trainer.model.latent_dim

    def run_steps(first: int, count: int) -> None:
        for step in range(first, first + count):
            raw = trainer.train_x.index_select(0, order[step * 128:(step + 1) * 128])
            noise = StepNoise(0, step, 128, slice(0, 128), torch.device("cpu"))
            trainer.train_step(raw, noise.uniform(dataset.shape), noise.normal(dims))

    run_steps(0, 30)
    with MatmulCalls() as step_calls:
        run_steps(30, 1)
    started = time.process_time()
    run_steps(31, steps)
    step_seconds = (time.process_time() - started) / steps
    step_matmul, step_flops = matmul_seconds(step_calls.calls)

    model = trainer.model.eval()
    images = dataset.test_x[:examples]
    with MatmulCalls() as is_calls:
        evaluate(model, images, pipeline, k=k, naive=False)
    started = time.process_time()
    result = evaluate(model, images, pipeline, k=k, naive=False)
    is_seconds = time.process_time() - started
    is_matmul, is_flops = matmul_seconds(is_calls.calls)
    return {"name": name, "step_ms": step_seconds * 1e3, "step_matmul_ms": step_matmul * 1e3,
            "step_gflops": step_flops / 1e9, "is_s": is_seconds, "is_matmul_s": is_matmul,
            "is_gflops": is_flops / 1e9,
            "log_px": float(result.per_example["log_px"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows = [measure(name, options, args.steps, args.k, args.examples)
            for name, options in MODELS.items()]
    lines = [
        "| model | training step (ms) | its matrix products alone (ms) | share of matmul "
        f"throughput | IS, k = {args.k}, {args.examples} images (s) | its matrix products "
        "alone (s) | IS / matrix products |",
        "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['step_ms']:.2f} | {row['step_matmul_ms']:.2f} "
            f"({row['step_gflops']:.2f} GFLOP) | {row['step_matmul_ms'] / row['step_ms']:.0%} | "
            f"{row['is_s']:.2f} | {row['is_matmul_s']:.2f} ({row['is_gflops']:.1f} GFLOP) | "
            f"{row['is_s'] / row['is_matmul_s']:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        record("hierarchy_throughput: the hierarchy's step and IS against their matrix products",
               f"- machine: {machine()}\n- date: {today()}\n- command: `OMP_NUM_THREADS=1 python "
               f"benchmarks/hierarchy_throughput.py --steps {args.steps} --k {args.k} "
               f"--examples {args.examples}` (CPU time, one thread)\n\n{body}")


if __name__ == "__main__":
    main()
