"""Time to quality: vaekit and the common PyTorch loop train for the same wall-clock budget, then
both are scored by the same estimator: importance-sampled log p(x), k = 1000, on the same 1000
fixed binarised Fashion-MNIST test images.

vaekit runs with its own Fashion-MNIST defaults (`vaekit train --data fashion-mnist
--time-limit S`); the reference is the PyTorch example's loop (784-400-20 MLP, Adam 1e-3, batch
128). The reference model is wrapped as a vaekit VAE (its encoder gives mean and log-variance),
so one estimator scores both.

    python benchmarks/time_to_quality.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, machine, record, run_json, today  # noqa: E402

TEST_IMAGES = 1000
K = 1000


def reference_as_vaekit(weights: Path):
    """The reference network as a VAE: same numbers, vaekit's distributions around them."""
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from torch.distributions import Independent, Normal

    from reference_vae import ReferenceVAE
    from vaekit.distributions import BernoulliLikelihood, StandardNormalPrior
    from vaekit.model import VAE

    net = ReferenceVAE()
    net.load_state_dict(load_file(weights))

    class Encoder(nn.Module):
        def forward(self, x, condition=None):  # condition: unused (not a conditional model)
            mu, logvar = net.encode(x.view(-1, 784))
            return torch.cat([mu, logvar], -1)

    class Decoder(nn.Module):
        def forward(self, z, condition=None):  # condition: unused (not a conditional model)
            logits = net.fc4(torch.relu(net.fc3(z)))  # the reference applies sigmoid after this
            return logits.view(*z.shape[:-1], 1, 28, 28)

    class LogVariancePosterior(nn.Module):
        latent_dim = 20
        params_per_example = 40

        def forward(self, params):
            mu, logvar = params.chunk(2, -1)
            return Independent(Normal(mu, (0.5 * logvar).exp()), 1)

    model = VAE(Encoder(), Decoder(), StandardNormalPrior(20), LogVariancePosterior(),
                BernoulliLikelihood((1, 28, 28)))
    model.net = net  # registers the weights with the model
    return model.eval()


def score(model) -> tuple[float, float]:
    from vaekit.data import Pipeline, load_dataset
    from vaekit.estimate import evaluate

    data = load_dataset("fashion-mnist", download=False)
    pipeline = Pipeline.build(data, "bernoulli", "dynamic", split_seed=0)
    result = evaluate(model, data.test_x[:TEST_IMAGES], pipeline, k=K, naive=False).summary()
    return result["log_px"], result["log_px_se"]


def decay_note(lr_decay: float) -> str:
    return f", lr x {lr_decay:g} after every epoch" if lr_decay != 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from vaekit.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "reference.safetensors"
        reference = run_json([str(HERE / "reference_vae.py"), "--seconds", str(args.seconds),
                              "--save", str(weights)])
        run = Path(tmp) / "vaekit"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vaekit", "train", "--data", "fashion-mnist",
                        "--time-limit", str(args.seconds), "--out", str(run), "--no-progress"],
                       check=True, capture_output=True)
        vaekit_wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((run / "config.json").read_text())["config"]
        vaekit_images = sum(r["images_per_second"] * r["train_seconds"] for r in rows)
        ref_score = score(reference_as_vaekit(weights))
        vk_score = score(load_run(run).model)
    gain = vk_score[0] - ref_score[0]
    lines = [
        f"- machine: {machine()}",
        f"- date: {today()}; budget {args.seconds:g} s of training each; log p(x) by importance "
        f"sampling, k = {K}, on the first {TEST_IMAGES} Fashion-MNIST test images (one fixed "
        "binarisation), nats per image",
        f"- vaekit's Fashion-MNIST defaults: {config['net']} {config['hidden']}, "
        f"latent {config['latent_dim']}, batch {config['batch_size']}, lr {config['lr']:g}"
        f"{decay_note(config['lr_decay'])}",
        "",
        "| | images seen | epochs | test log p(x) | Monte Carlo s.e. |",
        "|---|---|---|---|---|",
        f"| reference loop | {reference['images']:,.0f} | {reference['images'] / 60000:.1f} "
        f"| {ref_score[0]:.2f} | {ref_score[1]:.2f} |",
        f"| vaekit | {vaekit_images:,.0f} | {vaekit_images / 60000:.1f} | {vk_score[0]:.2f} "
        f"| {vk_score[1]:.2f} |",
        "",
        f"vaekit - reference: **{gain:+.2f} nats** (goal: >= +3); vaekit's whole command, data "
        f"loading, per-epoch evaluation and saving included, took {vaekit_wall:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("time_to_quality", text)


if __name__ == "__main__":
    main()
