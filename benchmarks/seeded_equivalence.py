"""Seeded equivalence: the same tiny digits runs trained by two versions of vaekit, compared.

Each configuration (the objectives, priors, free bits, a conditional model) is trained for a few
epochs on the built-in digits by the sources of this worktree and by those of a reference commit
(extracted with `git archive`, nothing checked out), each in a fresh process on one thread. The
per-step log (every column, by name) and the final weights are compared: bit-identical where the
arithmetic order is unchanged, else the largest difference is printed.

    python benchmarks/seeded_equivalence.py [--reference 0f6a429] [--epochs 2]

About 1 to 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "elbo": {},
    "beta-linear": {"beta": 2.0, "kl_schedule": "linear", "kl_warmup_epochs": 1.0},
    "free-bits-dim": {"free_bits": 0.5},
    "free-bits-groups": {"free_bits": 0.5, "free_bits_group_size": 3},
    "iwae": {"objective": "iwae", "iwae_samples": 3},
    "uniform": {"prior": "uniform"},
    "mixture": {"prior": "mixture", "prior_components": 3},
    "vamp": {"prior": "vamp", "prior_components": 7},
    "conditional": {"conditional": True},
}

ARM = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from vaekit.config import TrainConfig
from vaekit.train import train
from safetensors.torch import load_file
out = Path(sys.argv[1])
overrides = json.loads(sys.argv[2])
config = TrainConfig(data="digits", hidden=[32], latent_dim=6, epochs=int(sys.argv[3]),
                     batch_size=64, seed=3, progress=False, device="cpu", num_samples=4,
                     **overrides)
train(config, overrides={"out": str(out)}, log=lambda *a, **k: None)
checkpoints = sorted((out / "checkpoints").iterdir())
optimizer = load_file(str(checkpoints[-1] / "optimizer.safetensors"))
weights = load_file(str(out / "model.safetensors"))
metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
torch.save({"step_log": optimizer["step_log"], "weights": weights,
            "test_elbo": [m["test_elbo"] for m in metrics]}, out / "result.pt")
"""


def run_arm(src: Path, out: Path, overrides: dict, epochs: int) -> dict:
    import torch

    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", ARM, str(out), json.dumps(overrides), str(epochs)],
                   env=env, check=True)
    return torch.load(out / "result.pt")


def compare(name: str, reference: dict, current: dict) -> str:
    ref_log, cur_log = reference["step_log"], current["step_log"]
    lines = []
    if ref_log.shape != cur_log.shape:
        return f"{name:18s} step logs differ in shape: {tuple(ref_log.shape)} vs " \
               f"{tuple(cur_log.shape)}"
    log_diff = float((ref_log - cur_log).abs().max()) if ref_log.numel() else 0.0
    weight_diff = max(float((reference["weights"][k] - current["weights"][k]).abs().max())
                      for k in reference["weights"])
    same_keys = set(reference["weights"]) == set(current["weights"])
    identical = log_diff == 0 and weight_diff == 0 and same_keys and \
        reference["test_elbo"] == current["test_elbo"]
    lines.append(f"{name:18s} steps {len(cur_log):4d}  step-log max |diff| {log_diff:.3g}  "
                 f"weights max |diff| {weight_diff:.3g}  test ELBO {current['test_elbo'][-1]:.4f}"
                 f"  {'bit-identical' if identical else 'DIFFERENT'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default="0f6a429")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(["git", "archive", args.reference, "src"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        reference_src = tmp / "src"
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        print(f"reference {args.reference} against this worktree (HEAD {commit}, with any "
              f"uncommitted changes), {args.epochs} epochs of digits each")
        for name in names:
            reference = run_arm(reference_src, tmp / f"ref-{name}", CONFIGS[name], args.epochs)
            current = run_arm(ROOT / "src", tmp / f"cur-{name}", CONFIGS[name], args.epochs)
            print(compare(name, reference, current), flush=True)


if __name__ == "__main__":
    main()
