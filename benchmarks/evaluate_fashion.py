"""`vaekit evaluate --k 5000` over the whole Fashion-MNIST test set: wall time and peak memory.

    python benchmarks/evaluate_fashion.py [--run RUN_DIR] [--k 5000] [--limit N] [--no-record]

Without --run, first trains the default MLP VAE for 10 epochs (`vaekit train --data
fashion-mnist --epochs 10`) into a temporary folder. The evaluation runs as its own process;
its peak resident memory is that process's own (wait4), so the training does not count.
Goal (log-likelihood issue): peak memory under 2 GiB at k = 5000 on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, record, today  # noqa: E402


def vaekit_command() -> list[str]:
    script = shutil.which("vaekit")
    return [script] if script else [sys.executable, "-m", "vaekit"]


def measured(command: list[str]) -> tuple[str, float, float, float]:
    """Run a command; its stdout, wall seconds, CPU seconds and peak RSS in MiB (its own,
    via wait4: the CPU time shows the work even on a machine shared with other jobs)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return stdout, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained Fashion-MNIST run (default: train one)")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run = args.run
        if run is None:
            run = str(Path(scratch) / "fashion")
            subprocess.run([*vaekit_command(), "train", "--data", "fashion-mnist", "--epochs",
                            "10", "--out", run, "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL)
        command = [*vaekit_command(), "evaluate", run, "--k", str(args.k), "--json",
                   "--no-progress"] + (["--limit", str(args.limit)] if args.limit else [])
        stdout, seconds, cpu, peak = measured(command)
    result = json.loads(stdout)
    naive_gap = result["log_px"] - result["log_px_naive"]
    naive_se = (result["log_px_se"] ** 2 + result["log_px_naive_se"] ** 2) ** 0.5
    shown = " ".join(["vaekit"] + command[len(vaekit_command()):]).replace(run, "RUN_DIR")
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    text = "\n".join([
        f"- machine: {machine()}; OMP_NUM_THREADS={threads}",
        f"- date: {today()}",
        f"- command: `{shown}` on a run trained by `vaekit train --data fashion-mnist "
        "--epochs 10`",
        "",
        "| examples | k | wall time (s) | CPU time (s) | examples/s (wall) | decoded samples/s "
        "(wall) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
        f"| {result['n']:,} | {result['k']:,} | {seconds:,.0f} | {cpu:,.0f} | "
        f"{result['n'] / seconds:,.1f} | {2 * result['n'] * result['k'] / seconds:,.0f} | "
        f"{peak:,.0f} |",
        "",
        "| figure (nats per example) | value | s.e. |",
        "|---|---|---|",
        f"| log p(x), importance sampled | {result['log_px']:.3f} | {result['log_px_se']:.3f} |",
        f"| log p(x), naive (prior samples) | {result['log_px_naive']:.3f} | "
        f"{result['log_px_naive_se']:.3f} |",
        f"| ELBO | {result['elbo']:.3f} | {result['elbo_se']:.3f} |",
        f"| ELBO gap | {result['elbo_gap']:.3f} | {result['elbo_gap_se']:.3f} |",
        f"| bits per dimension | {result['bits_per_dim']:.4f} | {result['bits_per_dim_se']:.1e} |",
        "",
        f"Checks: log p(x) above the ELBO: {result['log_px'] > result['elbo']}; the naive "
        f"estimate below log p(x) by {naive_gap:.1f} nats = {naive_gap / naive_se:,.0f} standard "
        f"errors (> 10: {naive_gap > 10 * naive_se}); peak memory under 2 GiB: {peak < 2048}. "
        "Decoded samples count both estimators (2 k per example).",
    ])
    print(text)
    if not args.no_record:
        record("evaluate: log p(x) of the Fashion-MNIST test set, k = 5000", text)


if __name__ == "__main__":
    main()
