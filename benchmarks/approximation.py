"""The approximation class and the hierarchy on binarised Fashion-MNIST, paired on the same images.

Trains, with the same MLP width (400), epochs, batch, learning rate and seed:

    diagonal          784-400-20 VAE, q(z|x) a diagonal Gaussian (the reference)
    full-covariance   the same nets, q(z|x) = N(mu, L L^T)
    iaf               the same nets, q(z|x) an inverse autoregressive flow (--flow-steps 2)
    iaf-8             the same with --flow-steps 8 (not run unless asked: --families)
    hierarchy         a two-group top-down hierarchy (--latent-groups 16,32, width 400), with a
                      linear KL warm-up over the first tenth of the epochs

and scores each on the first N test images (one fixed binarisation, the same for all) by
vaekit's importance-sampled log p(x) (k samples from q(z|x)) and by its ELBO from the same draws,
so the gap log p(x) - ELBO = KL(q || p(z|x)) of each family is measured on the same images; every
row also gives its difference from the reference, with the standard error of the paired
differences, and its training time.

Run from the repository root (the defaults take about 25 minutes on one core of a 2-core CPU):

    OMP_NUM_THREADS=1 nice python benchmarks/approximation.py --epochs 10 --test-images 1000 --k 1000

The issue's full protocol (100 epochs, all 10,000 test images, k = 5000) is
`--epochs 100 --test-images 10000 --k 5000`: hours on a CPU, minutes on a GPU.
--quick runs every step with tiny sizes (a smoke test); --no-record prints only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, today  # noqa: E402

from vaekit.config import TrainConfig  # noqa: E402
from vaekit.data import load_dataset  # noqa: E402
from vaekit.estimate import evaluate  # noqa: E402
from vaekit.runs import load_run  # noqa: E402
from vaekit.train import train  # noqa: E402

FAMILIES = {
    "diagonal": dict(latent_dim=20),
    "full-covariance": dict(latent_dim=20, posterior="full-covariance"),
    "iaf": dict(latent_dim=20, posterior="iaf", flow_steps=2),
    "iaf-8": dict(latent_dim=20, posterior="iaf", flow_steps=8),
    "hierarchy": dict(latent_groups=[16, 32], kl_schedule="linear"),
}


def paired(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    difference = (values - reference).double()
    return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--folder", default="runs/benchmarks/approximation")
    parser.add_argument("--families", default="diagonal,full-covariance,iaf,hierarchy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.test_images, args.k = 1, 50, 20
    folder = Path(args.folder)
    dataset = load_dataset("fashion-mnist")
    raw = dataset.test_x[:args.test_images]
    rows, scores = [], {}
    for name in args.families.split(","):
        options = dict(FAMILIES[name])
        if options.get("kl_schedule") == "linear":
            options["kl_warmup_epochs"] = max(args.epochs / 10, 0.5)
        config = TrainConfig(data="fashion-mnist", epochs=args.epochs, batch_size=128,
                             hidden=[400], lr=args.lr, lr_decay=1.0, likelihood="bernoulli",
                             progress=False, out=str(folder / f"{name}-{args.epochs}"),
                             **options)
        started = time.monotonic()
        run_dir = Path(config.out)
        if not (run_dir / "model.safetensors").exists():
            train(config, log=lambda *a, **k: None)
        seconds = time.monotonic() - started
        run = load_run(run_dir)
        started = time.monotonic()
        evaluation = evaluate(run.model, raw, run.pipeline, k=args.k, naive=False)
        is_seconds = time.monotonic() - started
        per = evaluation.per_example
        scores[name] = per
        log_px, elbo = per["log_px"].double(), per["elbo"].double()
        rows.append((name, float(log_px.mean()), float(log_px.std() / math.sqrt(len(log_px))),
                     float(elbo.mean()), float((log_px - elbo).mean()), seconds, is_seconds))
        print(f"{name:16s} log p(x) {rows[-1][1]:9.2f} ± {rows[-1][2]:.2f}  ELBO "
              f"{rows[-1][3]:9.2f}  gap {rows[-1][4]:6.2f}  train {seconds:6.0f} s  IS "
              f"{is_seconds:5.0f} s", flush=True)
    reference = scores.get("diagonal")
    lines = ["| family | log p(x) (nats) | ELBO | gap log p(x) − ELBO | log p(x) − diagonal "
             "(paired s.e.) | gap − diagonal's | train s | IS s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, mean, se, elbo, gap, seconds, is_seconds in rows:
        if reference is not None and name != "diagonal":
            d_mean, d_se = paired(scores[name]["log_px"], reference["log_px"])
            ref_gap = reference["log_px"] - reference["elbo"]
            g_mean, g_se = paired(scores[name]["log_px"] - scores[name]["elbo"], ref_gap)
            versus, gap_versus = f"{d_mean:+.2f} ({d_se:.2f})", f"{g_mean:+.2f} ({g_se:.2f})"
        else:
            versus = gap_versus = "—"
        lines.append(f"| {name} | {mean:.2f} ± {se:.2f} | {elbo:.2f} | {gap:.2f} | {versus} | "
                     f"{gap_versus} | {seconds:.0f} | {is_seconds:.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record and not args.quick:
        record("Approximation class and hierarchy, binarised Fashion-MNIST",
               f"{today()}, {machine()}; `benchmarks/approximation.py --epochs {args.epochs} "
               f"--test-images {args.test_images} --k {args.k}` (MLP width 400, batch 128, "
               f"lr {args.lr:g} constant, seed 0; IS with k = {args.k} on the first "
               f"{args.test_images} test images, the same fixed binarisation for every row)."
               f"\n\n{table}\n")


if __name__ == "__main__":
    main()
