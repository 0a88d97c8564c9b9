"""Training speed on a busy CPU: vaekit's thread choice against PyTorch's defaults.

`vaekit train` on the built-in digits (the 64-400-20 MLP, batch 64) beside N busy-loop
processes (`while True: pass`, at this script's priority), with:

    torch default   OMP_NUM_THREADS = the usable cores (what PyTorch picks by itself; vaekit
                    then changes nothing), OpenMP's default spin-then-sleep waits
    passive         the same threads, OMP_WAIT_POLICY=PASSIVE (waiting threads sleep)
    1 thread        OMP_NUM_THREADS=1
    vaekit          nothing set: vaekit picks threads from the affinity and the load average
                    and sets the passive wait policy (vaekit/threads.py)

Each arm is one fresh process training --epochs E; images/s is the mean over its epochs
(metrics.jsonl). Arms alternate within each load so that the machine's state affects all
alike; the load average is printed beside. Figures go to RESULTS.md.

    python benchmarks/cpu_contention.py [--busy 0,7] [--epochs 3] [--repeats 1]

About 2 minutes on 2 idle cores (longer on a loaded machine: the busy loops are the point).
"""

from __future__ import annotations

import argparse
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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


ARMS = {
    "torch default": {"OMP_NUM_THREADS": str(usable_cores())},
    "passive": {"OMP_NUM_THREADS": str(usable_cores()), "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "vaekit": {},
}


def train_rate(env_extra: dict, epochs: int) -> tuple[float, str]:
    """images/s of one `vaekit train` on digits, and what vaekit said about threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                            "OMP_WAIT_POLICY")}
    env.update(env_extra, PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        result = subprocess.run([sys.executable, "-m", "vaekit", "train", "--epochs",
                                 str(epochs), "--no-progress", "--out", str(out)],
                                env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(result.stderr[-2000:])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    images = sum(r["images_per_second"] * r["train_seconds"] for r in rows)
    seconds = sum(r["train_seconds"] for r in rows)
    said = next((line for line in result.stderr.splitlines() if "CPU cores" in line), "")
    return images / seconds, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy", default="0,7", help="busy-loop processes per load (comma list)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = []
    for busy in [int(b) for b in args.busy.split(",")]:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(busy)]
        try:
            time.sleep(3 if busy else 0)  # let the load average see them
            rates = {name: [] for name in ARMS}
            said = ""
            for _ in range(args.repeats):
                for name, env in ARMS.items():
                    rate, note = train_rate(env, args.epochs)
                    rates[name].append(rate)
                    said = note or said
            load = os.getloadavg()[0]
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        reference = statistics.median(rates["torch default"])
        row = ", ".join(f"{name} {statistics.median(r):,.0f}"
                        + ("" if name == "torch default"
                           else f" ({statistics.median(r) / reference:.2f} x)")
                        for name, r in rates.items())
        line = f"- {busy} busy loops (load average {load:.1f}): images/s {row}" + \
            (f"; vaekit said: \"{said}\"" if said else "")
        print(line, flush=True)
        lines.append(line)
    if not args.no_record:
        record("CPU contention: thread settings beside busy loops (benchmarks/cpu_contention.py)",
               f"{today()}, commit {commit()}, {machine()}; `vaekit train` on digits, "
               f"{args.epochs} epochs per arm, {args.repeats} repeat(s), the machine shared with "
               "other work (the load average includes it).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
