"""The model family on Fashion-MNIST, measured in one script.

1. Dynamically binarised Fashion-MNIST, one network for all (MLP 784-200-200-50, the sizes of
   Burda et al. 2016 for one stochastic layer, with ReLU, vaekit's default: with their tanh the
   VampPrior trailed the VAE), the same epochs, batch and seed: the plain VAE,
   IWAE training with k = 5 and k = 50 (Burda et al. 2016) and the VampPrior (Tomczak &
   Welling 2018, 500 pseudo-inputs), trained as its authors train it, with KL warm-up, beside
   the plain VAE given the same warm-up and the VampPrior without it. Each is scored by log p(x) estimated by importance sampling
   with k = 5000 samples from q(z|x) on the first N test images (the same images, with the same
   fixed binarisation, for every model), with its standard error over the images, and by its
   difference from the plain VAE with the standard error of the paired differences.
2. 8-bit Fashion-MNIST (every grey level kept) with the mixture of discretised logistics
   (Salimans et al. 2017): bits per dimension, from the test ELBO (whole test set) and by
   importance sampling (the first N test images).
3. Conditional VAEs (latent dimension 20, beta = 1 and beta = 4): a small CNN trained here on
   the real images must recognise the class requested of each generated sample; accuracy with
   its binomial standard error, beside the same judge's accuracy on the model's reconstructions
   of real test images (the ceiling the blur of the model's means allows) and on real images.

The importance-sampling estimate is vaekit's (`estimate.evaluate`, as `vaekit evaluate`):
log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x), the IWAE_k bound, whose expectation
rises to log p(x) with k (slightly low at any finite k); noise fixed per example and sample.

Run from the repository root (about 30-40 minutes on one core of a 2-core machine):

    OMP_NUM_THREADS=1 nice python benchmarks/model_family.py

--quick runs every step with tiny sizes (a smoke test, minutes); --no-record prints only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, today  # noqa: E402

from vaekit.config import TrainConfig  # noqa: E402
from vaekit.data import load_dataset  # noqa: E402
from vaekit.estimate import evaluate  # noqa: E402
from vaekit.runs import load_run  # noqa: E402
from vaekit.train import train  # noqa: E402

STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{(time.monotonic() - STARTED) / 60:5.1f} min] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Importance sampling: vaekit's own estimator (the one behind `vaekit evaluate`)


def importance_log_px(run, raw: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
    """log p(x) [log p(x | y) with labels] of every example of raw in the data's own units:
    estimate.evaluate's importance-sampled figure, k samples of q(z|x) per example. (N,)"""
    evaluation = evaluate(run.model, raw, run.pipeline, k=k, naive=False, labels=labels)
    return evaluation.per_example["log_px"] + run.pipeline.log_jacobian


def mean_and_se(values: Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


# ------------------------------------------------------------------------------------------------
# Runs


def train_run(folder: Path, name: str, **options) -> Path:
    """Train (or reuse a finished run of exactly these options in) folder/name."""
    run_dir = folder / name
    if (run_dir / "model.safetensors").exists() and (run_dir / "metrics.jsonl").exists():
        saved = json.loads((run_dir / "config.json").read_text())["config"]
        rows = metrics(run_dir)
        if all(saved[key] == value for key, value in options.items()) and rows \
                and rows[-1]["epoch"] == options["epochs"] and rows[-1]["complete"]:
            say(f"{name}: reusing the finished run in {run_dir}")
            return run_dir
        raise SystemExit(f"{run_dir} holds another or an unfinished run; remove it first")
    say(f"{name}: training ({', '.join(f'{k}={v}' for k, v in options.items())})")
    train(TrainConfig(**options, out=str(run_dir), progress=False,
                      checkpoint_every_minutes=30.0), log=lambda *a, **k: None)
    return run_dir


def family(epochs: int) -> tuple[dict, dict]:
    """The shared network options and the binarised models: {name: (run folder, options)}."""
    network = dict(data="fashion-mnist", net="mlp", hidden=[200, 200], activation="relu",
                   latent_dim=50, batch_size=128, lr=1e-3, epochs=epochs, seed=0)
    warmup = dict(kl_schedule="linear", kl_warmup_epochs=0.4 * epochs)
    binarised = {
        "VAE (ELBO)": ("vae", dict()),
        "IWAE, k = 5": ("iwae-5", dict(objective="iwae", iwae_samples=5)),
        "IWAE, k = 50": ("iwae-50", dict(objective="iwae", iwae_samples=50)),
        "VAE, KL warm-up": ("vae-warmup", warmup),
        "VampPrior K = 500, KL warm-up": ("vamp-500-warmup",
                                          dict(prior="vamp", prior_components=500, **warmup)),
        "VampPrior K = 500, no warm-up": ("vamp-500", dict(prior="vamp", prior_components=500)),
    }
    return network, binarised


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_minutes(run_dir: Path) -> float:
    return sum(row.get("train_seconds") or 0.0 for row in metrics(run_dir)) / 60


# ------------------------------------------------------------------------------------------------
# The classifier that judges conditional samples


class Classifier(nn.Module):
    """A small CNN on grey levels in [0, 1]: two 3x3 conv + max-pool stages, 128 hidden units."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 10) logits


def train_classifier(dataset, epochs: int, seed: int = 0) -> tuple[Classifier, float]:
    torch.manual_seed(seed)
    classifier = Classifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    x = dataset.train_x.float() / 255  # (N, 1, 28, 28)
    y = dataset.train_y
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            index = order[start:start + 128]
            loss = nn.functional.cross_entropy(classifier(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = classifier(dataset.test_x.float() / 255).argmax(-1)
    return classifier, (predictions == dataset.test_y).double().mean().item()


def judge_conditional(run_dir: Path, classifier: Classifier, dataset, per_class: int) -> dict:
    """How often the classifier names the requested class of generated samples, and the true
    class of the model's reconstructions of real test images."""
    run = load_run(run_dir)
    names = run.label_names
    labels = torch.arange(len(names)).repeat_interleave(per_class)  # (10 * per_class,)
    test_x, test_y = dataset.test_x[:3000], dataset.test_y[:3000]
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        samples = run.pipeline.display(run.model.sample(len(labels), labels, mean=True))
        correct = (classifier(samples).argmax(-1) == labels).double()
        reconstructions = run.model.reconstruct(run.pipeline.fixed(test_x, 0), test_y)
        rebuilt = (classifier(reconstructions).argmax(-1) == test_y).double()
        real = (classifier(dataset.test_x.float() / 255).argmax(-1) == dataset.test_y).double()
    accuracy = correct.mean().item()
    return {
        "names": names, "samples": samples, "elbo": metrics(run_dir)[-1]["test_elbo"],
        "accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(labels)),
        "per_class": [correct[labels == c].mean().item() for c in range(len(names))],
        "reconstruction_accuracy": rebuilt.mean().item(),
        "reconstruction_per_class": [rebuilt[test_y == c].mean().item()
                                     for c in range(len(names))],
        "real_per_class": [real[dataset.test_y == c].mean().item() for c in range(len(names))],
    }


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every model")
    parser.add_argument("--is-examples", type=int, default=1000,
                        help="test images scored by importance sampling (the first N)")
    parser.add_argument("--is-samples", type=int, default=5000, help="k of the IS estimate")
    parser.add_argument("--mixture-is-samples", type=int, default=500,
                        help="k of the IS estimate of the 8-bit logistic-mixture model")
    parser.add_argument("--per-class", type=int, default=100,
                        help="conditional samples generated per class")
    parser.add_argument("--runs", default="runs/model-family", help="folder for the runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.is_examples, args.is_samples = 1, 20, 100
        args.mixture_is_samples, args.per_class = 50, 10
        args.runs = args.runs.rstrip("/") + "-quick"
    folder = Path(args.runs)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    network, binarised = family(args.epochs)
    runs = {name: train_run(folder, slug, **network, **options)
            for name, (slug, options) in binarised.items()}

    # --- 1. log p(x) by importance sampling on the same test images ------------------------
    n, k = args.is_examples, args.is_samples
    fashion = load_dataset("fashion-mnist")
    scores = {}
    for name, run_dir in runs.items():
        run = load_run(run_dir)
        started = time.monotonic()
        scores[name] = importance_log_px(run, fashion.test_x[:n], k)
        say(f"{name}: IS log p(x) = {scores[name].mean():.2f} on {n} test images "
            f"({time.monotonic() - started:.0f} s)")
    baseline = scores["VAE (ELBO)"]
    table = ["| model (same network, same epochs) | test ELBO, all 10,000 | test log p(x), IS "
             f"k = {k}, first {n} | difference from the VAE (paired) | training |",
             "|---|---|---|---|---|"]
    for name, run_dir in runs.items():
        elbo = metrics(run_dir)[-1]["test_elbo"]
        mean, se = mean_and_se(scores[name])
        if name == "VAE (ELBO)":
            difference = "(reference)"
        else:
            d_mean, d_se = mean_and_se(scores[name] - baseline)
            difference = f"{d_mean:+.2f} +- {d_se:.2f}"
        table.append(f"| {name} | {elbo:.2f} | {mean:.2f} +- {se:.2f} | {difference} | "
                     f"{training_minutes(run_dir):.1f} min |")
    vamp_gain = mean_and_se(scores["VampPrior K = 500, KL warm-up"] - scores["VAE, KL warm-up"])
    lead = [v["test_elbo"] - p["test_elbo"] for v, p in
            zip(metrics(runs["VampPrior K = 500, no warm-up"]), metrics(runs["VAE (ELBO)"]))]

    # --- 2. 8-bit Fashion-MNIST with the mixture of discretised logistics -------------------
    mixture_dir = train_run(folder, "logistic-mixture-8bit", **network,
                            likelihood="logistic-mixture", likelihood_components=5)
    run = load_run(mixture_dir)
    dims = 784
    mixture_row = metrics(mixture_dir)[-1]
    mixture_scores = importance_log_px(run, fashion.test_x[:n], args.mixture_is_samples)
    bpd = -mixture_scores / (dims * math.log(2))  # (n,) bits per dimension of each image
    bpd_mean, bpd_se = mean_and_se(bpd)
    say(f"logistic mixture: ELBO {mixture_row['test_bits_per_dim']:.3f} bits/dim, IS "
        f"{bpd_mean:.3f} +- {bpd_se:.3f}")

    # --- 3. conditional samples judged by a classifier of real images ------------------------
    classifier, real_accuracy = train_classifier(fashion, epochs=1 if args.quick else 3)
    say(f"classifier: {real_accuracy:.3f} on the real test images")
    conditional_epochs = args.epochs if args.quick else 4 * args.epochs
    conditional = {}
    for beta in (1.0, 4.0):
        options = {**network, "latent_dim": 20, "epochs": conditional_epochs, "beta": beta,
                   "conditional": True}
        run_dir = train_run(folder, f"conditional-beta-{beta:g}", **options)
        conditional[beta] = judge_conditional(run_dir, classifier, fashion, args.per_class)
        say(f"conditional, beta {beta:g}: {conditional[beta]['accuracy']:.3f} of samples, "
            f"{conditional[beta]['reconstruction_accuracy']:.3f} of reconstructions")
    names = conditional[1.0]["names"]
    from vaekit.viz import class_rows_image, save_png

    for beta, result in conditional.items():
        grid = result["samples"].view(len(names), args.per_class, 1, 28, 28)[:, :10]
        save_png(class_rows_image(grid.reshape(-1, 1, 28, 28), names),
                 folder / f"conditional-beta-{beta:g}-samples.png")
    conditional_rows = ["| conditional VAE | test ELBO of log p(x \\| y) | samples recognised "
                        "as the requested class | reconstructions recognised |", "|---|---|---|---|"]
    for beta, result in conditional.items():
        conditional_rows.append(
            f"| beta = {beta:g} | {result['elbo']:.2f} | {result['accuracy']:.1%} +- "
            f"{result['accuracy_se']:.1%} | {result['reconstruction_accuracy']:.1%} |")
    per_class_rows = ["| class | real test images | " + " | ".join(
        f"samples, beta = {b:g} | reconstructions, beta = {b:g}" for b in conditional) + " |",
        "|---|---|" + "---|---|" * len(conditional)]
    for c, name in enumerate(names):
        cells = [f"{result['per_class'][c]:.0%} | {result['reconstruction_per_class'][c]:.0%}"
                 for result in conditional.values()]
        per_class_rows.append(f"| {name} | {conditional[1.0]['real_per_class'][c]:.0%} | "
                              + " | ".join(cells) + " |")

    # --- report ------------------------------------------------------------------------------
    body = f"""
Machine: {machine()}. Date: {today()}. Command: `OMP_NUM_THREADS=1 nice python
benchmarks/model_family.py{' --quick' if args.quick else ''}` ({(time.monotonic() - STARTED) / 60:.0f} minutes in all).

Fashion-MNIST, dynamically binarised for training (the test images binarised once, seeded).
Every model: MLP 784-200-200-50 with ReLU (the sizes of Burda et al.'s one-stochastic-layer
network), latent dimension 50, batch 128, Adam 1e-3, {args.epochs} epochs, seed 0; KL warm-up:
beta rising linearly from 0 to 1 over the first {warmup['kl_warmup_epochs']:g} epochs (Tomczak &
Welling train the VampPrior with warm-up). log p(x) is estimated by
importance sampling with k = {k} samples of q(z|x) per image on the first {n} test images
(identical images and binarisation for every model); +- is one standard error over those
images; the difference column pairs each image's estimates, which removes the spread between
images.

{chr(10).join(table)}

With the same warm-up, the VampPrior against the VAE (paired): {vamp_gain[0]:+.2f} +-
{vamp_gain[1]:.2f} nats. Without warm-up the VampPrior used fewer nats of its latent code (test
KL {metrics(runs["VampPrior K = 500, no warm-up"])[-1]["test_kl"]:.1f} against the VAE's
{metrics(runs["VAE (ELBO)"])[-1]["test_kl"]:.1f}); its test ELBO minus the VAE's, epoch by epoch:
{', '.join(f'{d:+.2f}' for d in lead)}.

8-bit Fashion-MNIST (the 256 grey levels, no binarisation), same network, mixture of 5
discretised logistics per pixel (Salimans et al. 2017), {args.epochs} epochs:
{mixture_row['test_bits_per_dim']:.3f} bits/dim from the test ELBO over all 10,000 test images
(an upper bound; {mixture_row['test_elbo']:.1f} nats per image), {bpd_mean:.3f} +- {bpd_se:.3f}
bits/dim by importance sampling with k = {args.mixture_is_samples} on the first {n}.

Conditional VAEs (same network but latent dimension 20, the label one-hot into encoder and
decoder, binarised data, {conditional_epochs} epochs), judged by a small CNN trained here on the
real training images ({real_accuracy:.1%} on the real test images): the share of
{10 * args.per_class} generated samples ({args.per_class} per class, the mean E[x | z, y] of
z ~ p(z)) it labels as the class they were asked for, +- one binomial standard error, and the
share of the model's reconstructions of the first 3,000 real test images (given their labels) it
labels correctly, which bounds what the blur of the model's means allows. beta = 4 makes class
information in z cost four times as much, so the decoder relies on the label it gets for free;
it costs log-likelihood.

{chr(10).join(conditional_rows)}

Per class (Sandal and Shirt are hard for this judge even in reconstructions: the blurred means
lose sandal straps, and shirts resemble pullovers and T-shirts even when real):

{chr(10).join(per_class_rows)}
"""
    print(body)
    if not args.no_record and not args.quick:
        record("Model family (benchmarks/model_family.py)", body)
        say("recorded in benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
