"""Do vaekit's error bars hold on real models? Many seeds of the same evaluation, compared.

    python benchmarks/error_bars.py [--run RUN_DIR ...] [--seeds 20] [--k 1000] [--limit 1000]
                                    [--no-record]

Without --run, trains the two runs of the error-bars issue first (a few minutes each on two
cores): the default Fashion-MNIST MLP VAE (784-400-20, Bernoulli, binarised) and a Gaussian one
on dequantised 8-bit pixels. Each run is evaluated on the same first --limit test images with
--seeds different seeds (the draws change, the data do not). For log p(x) and its jackknife
estimate the script prints the spread of the seeds' estimates, the median reported standard
error (replicates, and the delta method's), their ratio, and how often ±1.96 s.e. covers the
mean of the seeds. Goal: replicate s.e. within ±25 % of the spread, coverage 90-98 %.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, record, today  # noqa: E402

RUNS = {  # name -> vaekit train options
    "fashion-bernoulli": ["--data", "fashion-mnist"],
    "fashion-gaussian-8bit": ["--data", "fashion-mnist", "--likelihood", "gaussian",
                              "--epochs", "10"],
}


def train(name: str, folder: Path) -> Path:
    out = folder / name
    subprocess.run([sys.executable, "-m", "vaekit", "train", *RUNS[name], "--no-progress",
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def study(run_dir: Path, seeds: int, k: int, limit: int) -> dict:
    import numpy as np
    import torch

    from vaekit.estimate import evaluate
    from vaekit.runs import load_run, load_run_dataset

    run = load_run(run_dir)
    raw = load_run_dataset(run).test_x[:limit]
    rows = []
    started = time.process_time()
    for seed in range(seeds):
        with torch.inference_mode():
            summary = evaluate(run.model, raw, run.pipeline, k=k, seed=seed, naive=False
                               ).summary()
        rows.append(summary)
        print(f"  seed {seed}: log p(x) {summary['log_px']:.4f} s.e. {summary['log_px_se']:.4f}"
              f" (delta {summary['log_px_se_delta']:.4f}), jackknife "
              f"{summary['log_px_jackknife']:.4f} s.e. {summary['log_px_jackknife_se']:.4f}",
              flush=True)
    cpu = time.process_time() - started
    out = {"run": run_dir.name, "n": len(raw), "k": k, "seeds": seeds, "cpu_s": cpu,
           "pareto_k_high": float(np.mean([r["pareto_k_high"] for r in rows])),
           "slope": float(np.median([r["log_px_se_slope"] for r in rows]))}
    for name, se_names in (("log_px", ("log_px_se", "log_px_se_delta")),
                           ("log_px_jackknife", ("log_px_jackknife_se",))):
        values = np.array([r[name] for r in rows])
        centre, spread = values.mean(), values.std(ddof=1)
        for se_name in se_names:
            se = np.array([r[se_name] for r in rows])
            covered = np.abs(values - centre) <= 1.96 * se
            out[se_name] = {"spread": float(spread), "median_se": float(np.median(se)),
                            "ratio": float(np.median(se) / spread),
                            "coverage": float(covered.mean()), "estimate": float(centre)}
    out["jackknife_minus_is"] = out["log_px_jackknife_se"]["estimate"] - out["log_px_se"]["estimate"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| run | n | k | seeds | figure | mean over seeds | spread (sd) | median s.e. | "
             "s.e. / spread | ±1.96 s.e. covers the mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"log_px_se": "log p(x), replicate s.e.",
              "log_px_se_delta": "log p(x), delta-method s.e.",
              "log_px_jackknife_se": "jackknife, replicate s.e."}
    for r in results:
        for key, label in labels.items():
            f = r[key]
            lines.append(f"| {r['run']} | {r['n']} | {r['k']} | {r['seeds']} | {label} | "
                         f"{f['estimate']:.4f} | {f['spread']:.4f} | {f['median_se']:.4f} | "
                         f"{f['ratio']:.2f} | {100 * f['coverage']:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", help="a trained run (repeatable; default: "
                        "train the two of the issue)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = [Path(r) for r in args.run] if args.run else [train(name, Path(scratch))
                                                              for name in RUNS]
        results = []
        for run_dir in runs:
            print(f"{run_dir.name}: {args.seeds} seeds, k = {args.k}, {args.limit} test images",
                  flush=True)
            results.append(study(run_dir, args.seeds, args.k, args.limit))
    text = table(results)
    notes = [f"- {r['run']}: jackknife - IS_k = {r['jackknife_minus_is']:+.4f} nats, "
             f"{r['pareto_k_high']:.0f} of {r['n']} examples above the Pareto k threshold, "
             f"fitted variance slope {r['slope']:.2f}, {r['cpu_s']:.0f} CPU-s"
             for r in results]
    print(text)
    print("\n".join(notes))
    if not args.no_record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        record("Error bars over seeds (benchmarks/error_bars.py)",
               f"{today()}, commit {commit}, {machine()}.\n\n{text}\n\n" + "\n".join(notes)
               + "\n\nGoal: replicate s.e. within ±25 % of the seeds' spread and ±1.96 s.e. "
               "covering the mean of the seeds in 90-98 % of them.")


if __name__ == "__main__":
    main()
