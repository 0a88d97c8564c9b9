"""Sample quality of the model family on Fashion-MNIST, beside test log p(x), and its cost.

1. Every model of benchmarks/model_family.py (dynamically binarised Fashion-MNIST, MLP
   784-200-200-50): its runs are reused from --runs when model_family.py has trained them with
   the same options, else trained here with them. For each: test log p(x) by importance
   sampling (vaekit's estimator, k = --is-samples on the first --is-examples test images) and
   the sample-quality scores of `vaekit evaluate --sample-quality` (sample_quality.py): N
   samples at each temperature, the decoder's mean E[x|z] and a draw x ~ p(x|z), against a
   reference of 10,000 training images, beside the floor (the 10,000 real test images).
2. Cost: CPU seconds (time.process_time, one thread) of the sample-quality evaluation of 10,000
   samples at one temperature (both pixel kinds, the floor and the reference included; the
   feature network already cached) against importance sampling at k = 1000 on 1,000 test
   images of the same model, both measured in this run.

Default (4 models, about 15 CPU-minutes on one core of a shared 2-core machine):

    OMP_NUM_THREADS=1 nice python benchmarks/sample_quality.py

The full table (all six models, IWAE k = 50 takes 6 minutes to train, and IS at k = 5000):

    OMP_NUM_THREADS=1 nice python benchmarks/sample_quality.py --models all --is-samples 5000

--quick: tiny sizes (a smoke test); --no-record prints only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, today  # noqa: E402
from model_family import family, importance_log_px, mean_and_se, say, train_run  # noqa: E402

from vaekit.data import load_dataset  # noqa: E402
from vaekit.features import features_for  # noqa: E402
from vaekit.runs import load_run  # noqa: E402
from vaekit.sample_quality import (  # noqa: E402
    _compute_reference_and_floor,
    evaluate_sample_quality,
    reference_indices,
)

DEFAULT_MODELS = "vae,iwae-5,vamp-500-warmup,vamp-500"
COLUMNS = (("frechet_distance", 1.0, "FD"), ("kid", 1e3, "KID x 1e3"),
           ("precision", 1.0, "precision"), ("recall", 1.0, "recall"),
           ("density", 1.0, "density"), ("coverage", 1.0, "coverage"))


def cell(score: dict, scale: float) -> str:
    value, low, high = (scale * score[key] for key in ("value", "low", "high"))
    digits = 1 if abs(value) >= 10 else 3
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def score_cells(scores: dict) -> str:
    return " | ".join(cell(scores[key], scale) for key, scale, _ in COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="run folders of "
                        "model_family.py, comma-separated, or 'all'")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (model_family's default)")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--temperatures", default="1.0,0.8")
    parser.add_argument("--is-examples", type=int, default=1000)
    parser.add_argument("--is-samples", type=int, default=1000)
    parser.add_argument("--runs", default="runs/model-family")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples, args.is_examples, args.is_samples = 1, 500, 50, 50
        args.runs = args.runs.rstrip("/") + "-quick"
    torch.set_num_threads(1)
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    network, binarised = family(args.epochs)
    wanted = [slug for slug, _ in binarised.values()] if args.models == "all" \
        else args.models.split(",")
    chosen = {name: (slug, options) for name, (slug, options) in binarised.items()
              if slug in wanted}
    folder = Path(args.runs)
    folder.mkdir(parents=True, exist_ok=True)
    fashion = load_dataset("fashion-mnist")

    started = time.process_time()
    features = features_for(fashion, log=say)
    feature_seconds = time.process_time() - started
    say(f"features: {features.info['kind']}, test accuracy {features.info['test_accuracy']:.3f}"
        f" ({'cached' if features.info['cached'] else f'trained in {feature_seconds:.0f} CPU s'})")

    rows, cost = [], None
    for name, (slug, options) in chosen.items():
        run = load_run(train_run(folder, slug, **network, **options))
        clock = time.process_time()
        log_px = importance_log_px(run, fashion.test_x[:args.is_examples], args.is_samples)
        is_seconds = time.process_time() - clock
        mean, se = mean_and_se(log_px)
        say(f"{name}: log p(x) {mean:.2f} +- {se:.2f} (IS k = {args.is_samples}, "
            f"{args.is_examples} images, {is_seconds:.0f} CPU s)")
        if cost is None:  # the cost goal, on the first model
            clock = time.process_time()
            _compute_reference_and_floor(run, fashion, features, reference_indices(fashion),
                                         min(args.samples, len(fashion.test_x)), bootstrap=100,
                                         seed=0)
            reference_seconds = time.process_time() - clock  # paid by a dataset's first run
            evaluate_sample_quality(run, fashion, samples=args.samples)  # caches the reference
            clock = time.process_time()
            evaluate_sample_quality(run, fashion, samples=args.samples)
            quality_seconds = time.process_time() - clock
            if args.is_samples == 1000 and args.is_examples == 1000:
                is_reference_seconds = is_seconds
            else:
                clock = time.process_time()
                importance_log_px(run, fashion.test_x[:1000], 1000)
                is_reference_seconds = time.process_time() - clock
            cost = (name, quality_seconds, reference_seconds, is_reference_seconds)
            say(f"cost: sample quality of {args.samples} samples {quality_seconds:.1f} CPU s "
                f"(+ {reference_seconds:.1f} s for the reference and floor, once per dataset); "
                f"IS k = 1000 on 1000 images {is_reference_seconds:.1f} CPU s")
        clock = time.process_time()
        quality = evaluate_sample_quality(run, fashion, samples=args.samples,
                                          temperatures=temperatures)
        say(f"{name}: sample quality at T = {args.temperatures} "
            f"({time.process_time() - clock:.0f} CPU s)")
        rows.append((name, mean, se, quality))

    floor = rows[0][3]["floor"]
    header = ("| model | test log p(x), nats | T | scored | " +
              " | ".join(title for _, _, title in COLUMNS) + " |")
    table = [header, "|" + "---|" * (4 + len(COLUMNS))]
    table.append(f"| real test images (floor), n = {floor['mean']['n']:,} | | | as they are | "
                 f"{score_cells(floor['mean'])} |")
    table.append(f"| real test images (floor) | | | binarised (seeded) | "
                 f"{score_cells(floor['sampled'])} |")
    for name, mean, se, quality in rows:
        for scores in quality["scores"]:
            scored = "E[x\\|z]" if scores["pixels"] == "mean" else "x ~ p(x\\|z)"
            table.append(f"| {name} | {mean:.2f} +- {se:.2f} | {scores['temperature']:g} | "
                         f"{scored} | {score_cells(scores)} |")
    info = rows[0][3]["features"]
    name, quality_seconds, reference_seconds, is_reference_seconds = cost
    import os
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    body = "\n".join([
        f"Machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end. Date: "
        f"{today()}. Commit: {commit}. Command: `OMP_NUM_THREADS=1 nice python "
        f"benchmarks/sample_quality.py{' --quick' if args.quick else ''}"
        f"{'' if args.models == DEFAULT_MODELS else ' --models ' + args.models}`.",
        "",
        f"Fashion-MNIST, the model family of benchmarks/model_family.py ({args.epochs} epochs, "
        "MLP 784-200-200-50, dynamically binarised). test log p(x): importance sampling with "
        f"k = {args.is_samples} on the first {args.is_examples} test images (+- one standard "
        f"error over the images). Scores: {args.samples:,} samples per row against "
        f"{rows[0][3]['reference']['n']:,} training images, in the features of a "
        f"{info['kind']} vaekit trained on Fashion-MNIST ({info['dimensions']} features, test "
        f"accuracy {info['test_accuracy']:.3f}); [95 % bootstrap interval, "
        f"{rows[0][3]['bootstrap']} resamples]. E[x|z] rows score the decoder's mean against "
        "the grey training images; x ~ p(x|z) rows a binary draw against the training images "
        "binarised (seeded), the images the likelihood scores. T: temperature of the prior.",
        "",
        *table,
        "",
        f"Cost ({name}, one thread, CPU time): the sample-quality evaluation of "
        f"{args.samples:,} samples at one temperature (E[x|z] and x ~ p(x|z): decoding, "
        f"features, every score with {rows[0][3]['bootstrap']} bootstrap replicates) took "
        f"**{quality_seconds:.1f} s**; importance sampling at k = 1000 on 1,000 test images of "
        f"the same model took **{is_reference_seconds:.1f} s** (ratio "
        f"{quality_seconds / is_reference_seconds:.2f}; goal: below 1, "
        f"{'met' if quality_seconds < is_reference_seconds else 'not met'}). Once per dataset "
        f"and pipeline, the first run also pays {reference_seconds:.1f} s for the reference "
        f"and the floor (features of {rows[0][3]['reference']['n']:,} training and "
        f"{floor['mean']['n']:,} test images, grey and binarised, and their scores), then "
        "cached beside the feature network; training the feature network, once per dataset: "
        + (f"{feature_seconds:.0f} CPU s." if not features.info["cached"] else
           "cached before this run."),
    ])
    print("\n" + body)
    if not args.no_record:
        record("Sample quality (benchmarks/sample_quality.py)", body)
        say("recorded in benchmarks/RESULTS.md")
    json.dumps([row[3] for row in rows], allow_nan=False)


if __name__ == "__main__":
    main()
