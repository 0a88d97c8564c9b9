"""Small tables: the test ELBO of the old generic preset, of training longer, and of the
small-table preset (early stopping), on scikit-learn's breast-cancer table written as CSV.

    old default   --epochs 20 --batch-size 128 --patience 0 (what a CSV got before the preset)
    300 epochs    --epochs 300 --batch-size 128 --patience 0
    preset        no options: the small-table preset (a seeded fifth of the 455 training rows
                  held out, stop 100 epochs after the best validation ELBO, best weights restored)

Each arm is `vaekit train` on the same CSV (569 rows, 30 features, text labels; split 455 /
114), seeds 0..S-1. Prints the train and test ELBO of the weights each run ends with, its
epochs and seconds, and records them in RESULTS.md.

    python benchmarks/small_data.py [--seeds 1]

About 2 minutes per seed on 2 idle cores (most of it the preset's few hundred short epochs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit, machine, record, today  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")
ARMS = {
    "old default (20 epochs)": ["--epochs", "20", "--batch-size", "128", "--patience", "0",
                                "--validation-fraction", "0"],
    "300 epochs": ["--epochs", "300", "--batch-size", "128", "--patience", "0",
                   "--validation-fraction", "0"],
    "small-table preset": [],
}


def write_breast_cancer(path: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*data.feature_names, "label"])
        for row, target in zip(data.data, data.target):
            writer.writerow([repr(float(v)) for v in row] + [data.target_names[target]])


def run_arm(table: Path, options: list[str], seed: int, folder: Path) -> dict:
    out = folder / f"run-{len(list(folder.iterdir()))}"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vaekit", "train", "--data", str(table),
                             "--seed", str(seed), "--no-progress", "--out", str(out), *options],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    epochs = [r for r in rows if "early_stopping" not in r]
    said = next((line for line in result.stdout.splitlines()
                 if line.startswith("early stopping:")), "")
    train_elbo = next(r["train_elbo"] for r in epochs if r["epoch"] == last["epoch"])
    return {"test_elbo": last["test_elbo"], "train_elbo": train_elbo, "epochs": len(epochs),
            "kept_epoch": last["epoch"], "seconds": time.monotonic() - started, "said": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table = folder / "breast_cancer.csv"
        write_breast_cancer(table)
        runs_dir = folder / "runs"
        runs_dir.mkdir()
        said = ""
        for name, options in ARMS.items():
            results = [run_arm(table, options, seed, runs_dir) for seed in range(args.seeds)]
            said = next((r["said"] for r in results if r["said"]), said)
            test = [r["test_elbo"] for r in results]
            spread = f" (seeds: {', '.join(f'{t:.1f}' for t in test)})" if len(test) > 1 else ""
            line = (f"- {name}: test ELBO {statistics.mean(test):.2f}{spread}, train ELBO "
                    f"{statistics.mean(r['train_elbo'] for r in results):.2f} (of the weights "
                    f"kept: epoch {results[0]['kept_epoch']} of {results[0]['epochs']} trained), "
                    f"{statistics.mean(r['seconds'] for r in results):.0f} s")
            print(line, flush=True)
            lines.append(line)
    if said:
        print(said)
        lines.append(f"\nThe preset's line (seed 0): `{said}`")
    if not args.no_record:
        record("Small tables: breast cancer, 455 training rows (benchmarks/small_data.py)",
               f"{today()}, commit {commit()}, {machine()}; `vaekit train` on scikit-learn's "
               f"breast-cancer table as CSV (30 features, text labels, 455 train / 114 test "
               f"rows), {args.seeds} seed(s); nats per example, Gaussian likelihood (a density "
               "of the original units, so values above 0 are possible); times on a machine "
               "shared with other work.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
