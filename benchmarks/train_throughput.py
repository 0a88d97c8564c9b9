"""Training throughput: vaekit against the common PyTorch loop, on the 784-400-20 MLP VAE.

Both train the same model (ReLU, Bernoulli on dynamically binarised Fashion-MNIST, Adam 1e-3,
batch 128), in separate processes run alternately (A, B, A, B, ...), so each has its own peak
RSS and the machine's state affects both alike. Prints images/s of each, the ratio (median of
pairs), each as a fraction of the fp32 matmul throughput measured in this run on the model's
own matrix shapes, and records the figures in RESULTS.md. Then, in fresh processes, a
torch.profiler breakdown of vaekit's training step by kind of operation against the time its
matrix products would take at the measured peak, and where vaekit's peak RSS goes.

    python benchmarks/train_throughput.py [--pairs 3] [--epochs 2] [--no-profile]
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
    STEP_SETUP,
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
                        latent_dim=20, likelihood="bernoulli", lr=1e-3, lr_decay=1.0,
                        progress=False,
                        out={out!r}), log=lambda *a, **k: None)
rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
images = sum(r["images_per_second"] * r["train_seconds"] for r in rows)
seconds = sum(r["train_seconds"] for r in rows)
print(json.dumps({{"images_per_second": images / seconds, "images": images,
                  "train_seconds": seconds, "peak_rss_mib": peak_rss_mib()}}))
"""


PROFILE_ARM = STEP_SETUP + """
from torch.profiler import ProfilerActivity, profile

steps(0, 30)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    steps(30, {steps})
print(json.dumps({{e.key: e.self_cpu_time_total / 1e6 / {steps} for e in prof.key_averages()}}))
"""

RSS_ARM = """
import json, sys
sys.path.insert(0, {here!r})
from common import peak_rss_mib
marks = {{}}
import torch
marks["import torch"] = peak_rss_mib()
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
marks["first torch.optim optimizer (imports torch._dynamo and sympy)"] = peak_rss_mib()
from vaekit.data import load_dataset
dataset = load_dataset("fashion-mnist", download=False)
marks["Fashion-MNIST in memory (uint8, 70,000 x 784)"] = peak_rss_mib()
print(json.dumps(marks))
"""

# Operations of a training step by kind, for the profile table (self CPU time).
STEP_GROUPS = [
    ("matrix products (mm, addmm)", ("aten::mm", "aten::addmm")),
    ("Adam, fused", ("aten::_fused_adam_",)),
    ("Bernoulli log-probability (BCE with logits) and its gradient",
     ("aten::binary_cross_entropy_with_logits", "aten::binary_cross_entropy_with_logits_backward",
      "aten::log_sigmoid_forward", "aten::log_sigmoid_backward", "aten::sigmoid", "aten::exp",
      "aten::log1p", "aten::softplus", "aten::neg")),
    ("noise: binarisation uniforms, normals of the reparameterisation",
     ("aten::uniform_", "aten::normal_")),
    ("binarise, copies, gather of the batch",
     ("aten::copy_", "aten::_to_copy", "aten::index_select", "aten::lt", "aten::gt",
      "aten::to", "aten::clone")),
    ("ReLU and its gradient", ("aten::clamp_min", "aten::relu", "aten::threshold_backward")),
    ("reductions (sums over pixels and dimensions, means)", ("aten::sum", "aten::mean")),
]


def step_profile(peak: float) -> list[str]:
    """Where a vaekit training step's time goes, against its matrix products at the peak."""
    steps = 200
    seconds = run_json(["-c", PROFILE_ARM.format(steps=steps)])
    total = sum(seconds.values())
    ideal = TRAIN_FLOPS_PER_IMAGE * 128 / peak
    lines = [
        "",
        f"Where a vaekit training step goes (torch.profiler, self CPU time, mean of {steps} "
        f"steps of batch 128; the step's {TRAIN_FLOPS_PER_IMAGE * 128 / 1e6:.0f} MFLOP of "
        f"matrix products alone would take {ideal * 1e3:.2f} ms at the peak above):",
        "",
        "| operations | ms per step | share | / matrix products at the peak |",
        "|---|---|---|---|",
    ]
    left = dict(seconds)
    for label, names in STEP_GROUPS:
        value = sum(left.pop(name, 0.0) for name in names)
        lines.append(f"| {label} | {value * 1e3:.3f} | {value / total:.1%} | {value / ideal:.2f} |")
    rest = sum(left.values())
    lines.append(f"| everything else ({len(left)} kinds: small tensor ops, autograd, dispatch) "
                 f"| {rest * 1e3:.3f} | {rest / total:.1%} | {rest / ideal:.2f} |")
    lines.append(f"| total | {total * 1e3:.3f} | 100% | {total / ideal:.2f} |")
    return lines


def rss_breakdown(vaekit_peak: float) -> list[str]:
    marks = run_json(["-c", RSS_ARM.format(here=str(HERE))])
    lines = ["", "Where vaekit's peak RSS goes (peak RSS of a fresh process after each stage, "
             "MiB):", ""]
    lines += [f"- {name}: {value:.0f}" for name, value in marks.items()]
    lines.append(f"- the whole training run above: {vaekit_peak:.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the step profile and the RSS breakdown")
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
    if not args.no_profile:
        lines += step_profile(peak)
        lines += rss_breakdown(max(v["peak_rss_mib"] for _, v in pairs))
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("train_throughput", text)


if __name__ == "__main__":
    main()
