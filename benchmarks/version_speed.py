"""Speed of two versions of vaekit on the same work: a training step and an IS evaluation.

The sources of this worktree and of a reference commit (extracted with `git archive`) run the
same work in fresh one-thread processes, alternately (reference, this, reference, ...): 300
training steps of the 784-400-20 MLP VAE on dynamically binarised Fashion-MNIST (batch 128,
after 30 steps of warm-up), and `estimate.evaluate` with k = 1000 on 100 fixed-binarised test
images (the naive estimator off). Each arm reports the CPU time of its own process
(time.process_time), which a busy shared machine disturbs much less than wall time; medians of
the arms and the median of the per-pair ratios are printed.

    python benchmarks/version_speed.py [--reference 0f6a429] [--pairs 5]

About 30 s per arm on an idle core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import STEP_SETUP  # noqa: E402

ARM = STEP_SETUP + """
import time
from vaekit.estimate import evaluate
torch.set_num_threads(1)
torch.set_flush_denormal(True)

steps(0, 30)
started = time.process_time()
steps(30, 300)
train_ms = (time.process_time() - started) / 300 * 1000
started = time.process_time()
result = evaluate(trainer.model, dataset.test_x[:100], pipeline, k=1000, naive=False)
evaluate_s = time.process_time() - started
print(json.dumps({"train_step_ms": train_ms, "evaluate_s": evaluate_s,
                  "log_px": float(result.per_example["log_px"].mean())}))
"""


def run_arm(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", ARM], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default="0f6a429")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.reference, "src"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        pairs = []
        for index in range(args.pairs):
            reference, current = run_arm(Path(tmp) / "src"), run_arm(ROOT / "src")
            pairs.append((reference, current))
            print(f"pair {index + 1}: train step {reference['train_step_ms']:.2f} / "
                  f"{current['train_step_ms']:.2f} ms, evaluate {reference['evaluate_s']:.2f} / "
                  f"{current['evaluate_s']:.2f} s (reference / this)", flush=True)
    for key, unit in (("train_step_ms", "ms"), ("evaluate_s", "s")):
        ref = statistics.median(r[key] for r, _ in pairs)
        cur = statistics.median(c[key] for _, c in pairs)
        ratio = statistics.median(c[key] / r[key] for r, c in pairs)
        print(f"{key}: reference {ref:.3f} {unit}, this {cur:.3f} {unit}, this / reference "
              f"(median of pairs) {ratio:.3f}")
    same = all(r["log_px"] == c["log_px"] for r, c in pairs)
    print(f"log p(x) identical in every pair: {same}")


if __name__ == "__main__":
    main()
