"""Training throughput: vaekit against the common PyTorch loop, on the 784-400-20 MLP VAE.

Both train the same model (ReLU, Bernoulli on dynamically binarised Fashion-MNIST, Adam 1e-3,
batch 128), in separate processes run alternately (A, B, A, B, ...), so each has its own peak
RSS and the machine's state affects both alike. Prints images/s of each, the ratio (median of
pairs), each as a fraction of the fp32 matmul throughput measured in this run on the model's
own matrix shapes, and records the figures in RESULTS.md.

    python benchmarks/train_throughput.py [--pairs 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HERE,
    TRAIN_FLOPS_PER_IMAGE,
    machine,
    matmul_peak,
    record,
    run_json,
    today,
)

VAEKIT_ARM = """
import json, sys
from pathlib import Path
sys.path.insert(0, {here!r})
from common import peak_rss_mib
from vaekit.config import TrainConfig
from vaekit.train import train
run = train(TrainConfig(data="fashion-mnist", epochs={epochs}, batch_size=128, hidden=[400],
                        latent_dim=20, likelihood="bernoulli", lr=1e-3, progress=False,
                        out={out!r}), log=lambda *a, **k: None)
rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
images = sum(r["images_per_second"] * r["train_seconds"] for r in rows)
seconds = sum(r["train_seconds"] for r in rows)
print(json.dumps({{"images_per_second": images / seconds, "images": images,
                  "train_seconds": seconds, "peak_rss_mib": peak_rss_mib()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    peak = matmul_peak()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.pairs):
            reference = run_json([str(HERE / "reference_vae.py"), "--epochs", str(args.epochs)])
            code = VAEKIT_ARM.format(here=str(HERE), epochs=args.epochs,
                                     out=str(Path(tmp) / f"run{index}"))
            vaekit = run_json(["-c", code])
            pairs.append((reference, vaekit))
            print(f"pair {index + 1}: reference {reference['images_per_second']:,.0f} img/s, "
                  f"vaekit {vaekit['images_per_second']:,.0f} img/s", flush=True)
    peak_after = matmul_peak()
    peak = max(peak, peak_after)
    ratios = [v["images_per_second"] / r["images_per_second"] for r, v in pairs]
    ref_ips = statistics.median(r["images_per_second"] for r, _ in pairs)
    vk_ips = statistics.median(v["images_per_second"] for _, v in pairs)
    peak_ips = peak / TRAIN_FLOPS_PER_IMAGE
    lines = [
        f"- machine: {machine()}",
        f"- date: {today()}; {args.pairs} alternating pairs of {args.epochs} epochs each",
        f"- FLOPs per training image (counted from the shapes): {TRAIN_FLOPS_PER_IMAGE:,}",
        f"- fp32 matmul throughput on these shapes: {peak / 1e9:.1f} GFLOP/s "
        f"= {peak_ips:,.0f} images/s if nothing but the matrix products ran",
        "",
        "| | images/s (median) | fraction of matmul peak | peak RSS (MiB) |",
        "|---|---|---|---|",
        f"| reference loop (DataLoader, sigmoid + BCE) | {ref_ips:,.0f} | {ref_ips / peak_ips:.0%} "
        f"| {max(r['peak_rss_mib'] for r, _ in pairs):.0f} |",
        f"| vaekit | {vk_ips:,.0f} | {vk_ips / peak_ips:.0%} "
        f"| {max(v['peak_rss_mib'] for _, v in pairs):.0f} |",
        "",
        f"vaekit / reference (median of per-pair ratios): **{statistics.median(ratios):.2f}x** "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("train_throughput", text)


if __name__ == "__main__":
    main()
