"""Start-up: wall time of `vaekit --help` (torch must not be imported for it). Goal: < 0.5 s.

    python benchmarks/startup.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, record, today  # noqa: E402


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    script = shutil.which("vaekit")
    commands = {"vaekit --help": [script, "--help"] if script else
                [sys.executable, "-m", "vaekit", "--help"],
                "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"]}
    rows = []
    for name, command in commands.items():
        timed(command)  # warm the file cache
        times = [timed(command) for _ in range(args.repeats)]
        rows.append(f"| `{name}` | {statistics.median(times):.3f} | {max(times):.3f} |")
    text = "\n".join([f"- machine: {machine()}", f"- date: {today()}; {args.repeats} runs each",
                      "", "| command | median (s) | max (s) |", "|---|---|---|", *rows])
    print(text)
    if not args.no_record:
        record("startup", text)


if __name__ == "__main__":
    main()
