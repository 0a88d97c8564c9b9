"""A folder of colour icons with transparency, trained the old way and with today's defaults.

The icons are benchmarks/colour_icons.py's (48 x 48 RGBA, six shapes, random RGB stored under
transparent pixels). Two runs, each for the same --time-limit on this machine:

    old     --net conv --likelihood logistic-mixture --background none (the recipe of the
            README before --background: alpha dropped, a 10-component mixture per pixel)
    new     --net conv with the defaults (--likelihood auto: discretized-logistic for colour
            images; --background white)

For each: images/s, user and system CPU seconds of training, peak RSS, the last test ELBO and
KL, and the reconstruction error (mean squared error per value in [0, 1], at the posterior
mean, pictures as `vaekit reconstruct` shows them) on the test images composited on white,
beside the mean-image baseline (every test image predicted by the mean training image). A
reconstruction error under the baseline means the code carries the image.

    OMP_NUM_THREADS=1 nice python benchmarks/colour_folder.py [--seconds 240] [--n 3000]

takes about 2 x --seconds plus a minute to make and decode the icons; --no-record prints only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from colour_icons import make_icons  # noqa: E402
from common import load_average, machine, record, today  # noqa: E402

from vaekit.config import TrainConfig  # noqa: E402
from vaekit.data import load_dataset  # noqa: E402
from vaekit.runs import load_run, load_run_dataset  # noqa: E402
from vaekit.train import train  # noqa: E402

ARMS = {
    "old": {"likelihood": "logistic-mixture", "background": "none"},
    "new": {},
}


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def reconstruction_error(run_dir: Path, truth: torch.Tensor) -> float:
    """MSE per value in [0, 1] of the run's test reconstructions against truth (N, C, H, W)."""
    run = load_run(run_dir)
    dataset = load_run_dataset(run)
    with torch.inference_mode():
        x = run.pipeline.fixed(dataset.test_x, 0)
        shown = run.pipeline.display(run.model.reconstruct(x))  # (N, C, H, W)
    return float(((shown - truth) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--icons", default=None, help="folder of icons (made if absent)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="colour-folder-"))
    icons = Path(args.icons) if args.icons else work / "icons"
    if not icons.exists():
        make_icons(icons, args.n)
    white = load_dataset(str(icons), background=(255, 255, 255))
    truth = white.test_x.float() / 255.0  # (N, C, H, W) composited on white
    mean_image = white.train_x.float().mean(0, keepdim=True) / 255.0  # (1, C, H, W)
    baseline = float(((mean_image - truth) ** 2).mean())
    print(f"mean-image baseline: MSE {baseline:.5f} per value on {len(truth)} test icons")
    rows = {}
    for name, options in ARMS.items():
        config = TrainConfig(data=str(icons), net="conv", time_limit=args.seconds, epochs=1000,
                             progress=False, out=str(work / name), **options)
        lines: list[str] = []
        user0, sys0 = cpu_seconds()
        started = time.monotonic()
        run_dir = train(config, log=lambda line: lines.append(str(line)))
        wall = time.monotonic() - started
        user1, sys1 = cpu_seconds()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                   .splitlines()]
        last = metrics[-1]
        images = sum(m["images_per_second"] * m["train_seconds"] for m in metrics)
        seconds = sum(m["train_seconds"] for m in metrics)
        rows[name] = {
            "options": options or "defaults", "likelihood": load_run(run_dir).config.likelihood,
            "epochs": last["epoch"], "images_per_second": images / seconds,
            "user_seconds": user1 - user0, "system_seconds": sys1 - sys0, "wall_seconds": wall,
            "test_elbo": last["test_elbo"], "test_kl": last["test_kl"],
            "reconstruction_mse": reconstruction_error(run_dir, truth),
            "chosen": next((line for line in lines if "likelihood auto" in line), ""),
        }
        print(name, json.dumps(rows[name]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    text = [f"{today()}, {machine()}, commit {commit}, load average {load_average():.1f} at the "
            "end (a shared machine: speeds are of this load).", "",
            f"`OMP_NUM_THREADS=1 nice python benchmarks/colour_folder.py --seconds "
            f"{args.seconds:g} --n {args.n}`: {len(white.train_x)} train / {len(truth)} test "
            f"icons 3x48x48, each arm trained for {args.seconds:g} s; mean-image baseline MSE "
            f"{baseline:.5f} per value; peak RSS of the process {peak:.0f} MiB.", "",
            "| arm | likelihood | epochs | img/s | user s | sys s | test ELBO | KL | recon MSE "
            "| MSE / baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        text.append(f"| {name} | {row['likelihood']} | {row['epochs']} | "
                    f"{row['images_per_second']:.0f} | {row['user_seconds']:.0f} | "
                    f"{row['system_seconds']:.0f} | {row['test_elbo']:.0f} | "
                    f"{row['test_kl']:.1f} | {row['reconstruction_mse']:.5f} | "
                    f"{row['reconstruction_mse'] / baseline:.2f} |")
    print("\n".join(text))
    if not args.no_record:
        record("Colour image folders (colour_folder.py)", "\n".join(text))


if __name__ == "__main__":
    main()
