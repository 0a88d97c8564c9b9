"""Fault injection: SIGKILL `vaekit train` at random moments, resume, check that nothing is lost.

Every trial trains a small run and kills it one to three times (each resumed run may be killed
again), then resumes it to the end. A kill lands at a random moment, or at a moment picked to be
inside a write: as soon as a checkpoint's staging folder appears (inside `write_checkpoint`), as
soon as a temporary file appears in the run folder (inside an atomic write of model.safetensors,
metrics.jsonl, a PNG or config.json), or right after a new checkpoint is renamed into place
(pruning the old one). Nothing in vaekit is slowed or instrumented: these are the real writes.

After every kill the run folder must be whole: every file a reader can name parses (config.json,
model.safetensors loads into the model, metrics.jsonl, the PNGs), every `step-*` checkpoint
verifies against its manifest, and the only debris are dot-named temporaries. After the final
resume the run must equal an uninterrupted run with the same seed: model.safetensors byte for
byte, the last checkpoint's weights, Adam moments and per-step losses (loss, reconstruction,
KL of every step) bit for bit, metrics.jsonl and state.json equal except for timings, and no
debris left.

    python benchmarks/fault_injection.py                 # 200 kills, recorded in RESULTS.md
    python benchmarks/fault_injection.py --kills 5 --no-record   # the reduced form CI runs

Runs on CPU with OMP_NUM_THREADS=1 (bit-exactness compares runs made with the same threads).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RUN_FILES = {"config.json", "pipeline.safetensors", "model.safetensors", "metrics.jsonl",
             "samples.png", "reconstructions.png", "curves.png", "checkpoints", ".lock",
             "README.md"}  # README.md: the model card
TIMING_KEYS = {"train_seconds", "eval_seconds", "images_per_second"}
STRATEGIES = {  # how the moment of a kill is chosen, and how often
    "random-moment": 0.40,  # uniform over the time an uninterrupted run takes, start-up included
    "inside-checkpoint-write": 0.30,  # a checkpoints/.staging-* folder exists
    "inside-file-write": 0.15,  # a .NAME.*.tmp exists in the run folder
    "right-after-checkpoint": 0.15,  # a new step-* folder has just appeared
}


def write_real_csv(path: Path) -> Path:
    """600 rows of 12 correlated real features: data for the Gaussian-likelihood configuration."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=(600, 3))
    x = z @ rng.normal(size=(3, 12)) + 0.3 * rng.normal(size=(600, 12)) + 5.0
    np.savetxt(path, x, delimiter=",", fmt="%.6f",
               header=",".join(f"f{i}" for i in range(12)), comments="")
    return path


def configurations(work: Path) -> dict[str, list[str]]:
    csv = write_real_csv(work / "real.csv")
    common = ["--no-progress", "--seed", "3", "--checkpoint-every-minutes", "60"]
    return {
        # digits, MLP, Bernoulli on dynamically binarised pixels: 3 epochs x 22 steps
        "digits-bernoulli": ["--data", "digits", "--epochs", "3", "--batch-size", "64",
                             "--hidden", "64", "--latent-dim", "4", *common],
        # real-valued CSV, standardised, learned-scale Gaussian, uniform prior (Monte Carlo KL):
        # 4 epochs x 9 steps, pipeline.safetensors in the run folder
        "csv-gaussian-uniform": ["--data", str(csv), "--likelihood", "gaussian", "--prior",
                                 "uniform", "--epochs", "4", "--batch-size", "50", "--hidden",
                                 "32", "--latent-dim", "3", *common],
    }


def vaekit(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "vaekit", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


# ------------------------------------------------------------------------------------------------
# Looking at a run folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debris(run: Path) -> list[str]:
    found = [p.name for p in run.glob(".*.tmp")] if run.is_dir() else []
    root = run / "checkpoints"
    if root.is_dir():
        found += [f"checkpoints/{p.name}" for p in root.iterdir() if p.name.startswith(".")]
    return sorted(found)


def where_it_landed(run: Path) -> str:
    """Where the kill stopped the process, read from what it left behind."""
    root = run / "checkpoints"
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    if not (run / "config.json").exists():
        return "before config.json"
    if any(n.startswith(".staging-") for n in names):
        return "inside a checkpoint write"
    if any(n.startswith(".trash-") for n in names):
        return "pruning an old checkpoint"
    if list(run.glob(".*.tmp")):
        return "inside a run-folder file write"
    if not any(n.startswith("step-") for n in names):
        return "before the first checkpoint"
    return "between writes"


def folder_problems(run: Path) -> list[str]:
    """What a reader of the run folder would find broken (the folder must never be half-written)."""
    from PIL import Image

    from vaekit.errors import VaekitError
    from vaekit.runs import (list_checkpoints, load_run, read_run_document, tensors_from_file,
                             verify_checkpoint)

    problems = []
    if not run.is_dir():
        return problems
    for entry in run.iterdir():
        if entry.name not in RUN_FILES and not (entry.name.startswith(".")
                                                and entry.name.endswith(".tmp")):
            problems.append(f"unexpected entry {entry.name}")
    try:
        if (run / "config.json").exists():
            read_run_document(run)
            if (run / "model.safetensors").exists():
                load_run(run)
        if (run / "metrics.jsonl").exists():
            for line in (run / "metrics.jsonl").read_text().splitlines():
                json.loads(line)
        for name in ("samples.png", "reconstructions.png", "curves.png"):
            if (run / name).exists():
                with Image.open(run / name) as image:
                    image.load()
        for _, folder in list_checkpoints(run):
            reason = verify_checkpoint(folder)
            if reason is not None:
                problems.append(f"{folder.name}: {reason}")
                continue
            json.loads((folder / "state.json").read_text())
            tensors_from_file(folder / "model.safetensors")
            tensors_from_file(folder / "optimizer.safetensors")
    except (VaekitError, OSError, ValueError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    return problems


def outcome(run: Path) -> dict:
    """What a finished run computed: hashes, tensors and timing-free records to compare."""
    import torch

    from vaekit.runs import latest_checkpoint, load_step_log, tensors_from_file

    folder = latest_checkpoint(run, warn=lambda *a: None)
    state = json.loads((folder / "state.json").read_text())
    untimed = (lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS})
    state = {k: v for k, v in state.items() if k != "train_seconds"}
    state["metrics"] = [untimed(m) for m in state["metrics"]]
    metrics = [untimed(json.loads(line))
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    tensors = {f"{name}/{key}": value for name in ("model", "optimizer")
               for key, value in tensors_from_file(folder / f"{name}.safetensors").items()}
    assert torch.equal(tensors["optimizer/step_log"], load_step_log(folder))
    return {"model_sha256": sha256(run / "model.safetensors"), "tensors": tensors,
            "state": state, "metrics": metrics}


def differences(got: dict, want: dict) -> list[str]:
    import torch

    found = []
    if got["model_sha256"] != want["model_sha256"]:
        found.append("model.safetensors differs from the uninterrupted run's")
    if set(got["tensors"]) != set(want["tensors"]):
        found.append("the last checkpoint holds other tensors")
    unequal = [name for name in sorted(set(got["tensors"]) & set(want["tensors"]))
               if not (got["tensors"][name].dtype == want["tensors"][name].dtype
                       and torch.equal(got["tensors"][name], want["tensors"][name]))]
    if "optimizer/step_log" in unequal:
        found.append("per-step losses not bit-identical")
    weights = [n for n in unequal if n != "optimizer/step_log"]
    if weights:
        found.append(f"{len(weights)} of {len(want['tensors']) - 1} weight and Adam tensors not "
                     f"bit-identical (first: {weights[0]})")
    if got["state"] != want["state"]:
        found.append("state.json differs (beyond timings)")
    if got["metrics"] != want["metrics"]:
        found.append("metrics.jsonl differs (beyond timings)")
    return found


# ------------------------------------------------------------------------------------------------
# Killing


def wait_for(process: subprocess.Popen, condition, timeout: float) -> bool:
    """Poll the run folder every half millisecond until condition() or the process ends."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if condition():
                return True
        except OSError:  # a folder renamed or removed while being listed
            pass
        time.sleep(0.0005)
    return False


def kill_at(process: subprocess.Popen, run: Path, strategy: str, rng: random.Random,
            duration: float) -> bool:
    """SIGKILL the process at a moment chosen by `strategy`; True if it was still running."""
    root = run / "checkpoints"
    names = (lambda folder: [e.name for e in os.scandir(folder)] if folder.is_dir() else [])
    if strategy == "random-moment":
        deadline = time.monotonic() + rng.uniform(0.0, duration)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    elif strategy == "inside-checkpoint-write":
        # skip a random number of saves so that kills spread over the run
        for _ in range(rng.randint(0, 6)):
            wait_for(process, lambda: any(n.startswith(".staging-") for n in names(root)),
                     duration * 2)
            wait_for(process, lambda: not any(n.startswith(".staging-") for n in names(root)),
                     duration * 2)
        wait_for(process, lambda: any(n.startswith(".staging-") for n in names(root)),
                 duration * 2)
        time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.02)]))  # somewhere inside it
    elif strategy == "inside-file-write":
        for _ in range(rng.randint(0, 4)):
            wait_for(process, lambda: any(n.endswith(".tmp") for n in names(run)), duration * 2)
            wait_for(process, lambda: not any(n.endswith(".tmp") for n in names(run)),
                     duration * 2)
        wait_for(process, lambda: any(n.endswith(".tmp") for n in names(run)), duration * 2)
    elif strategy == "right-after-checkpoint":
        before = set(names(root))
        wait_for(process, lambda: any(n.startswith("step-") and n not in before
                                      for n in names(root)), duration * 2)
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def run_trial(index: int, seed: int, config_name: str, config: list[str], work: Path,
              baseline: dict, duration: float) -> dict:
    rng = random.Random(f"{seed}-{index}")
    run = work / f"trial-{index:04d}"
    log = work / f"trial-{index:04d}.log"
    planned = rng.choice([1, 1, 2, 3])
    kills, problems = [], []
    finished = False
    for attempt in range(planned):
        strategy = rng.choices(list(STRATEGIES), weights=list(STRATEGIES.values()))[0]
        # the checkpoint cadence may change on resume; it must not change the result
        options = ["--keep-checkpoints", str(rng.choice([1, 2, 3]))]
        every = rng.choice([1, 1, 2, 3, 5, 8, None])
        if every is not None:
            options += ["--checkpoint-every-steps", str(every)]
        started = (run / "config.json").exists()
        args = ["train", "--resume", str(run), *options] if started else \
            ["train", "--out", str(run), *config, *options]
        process = vaekit(args, log)
        landed = kill_at(process, run, strategy, rng, duration)
        process.wait()
        if not landed:
            if process.returncode != 0:
                problems.append(f"attempt {attempt + 1}: exit status {process.returncode}")
            finished = process.returncode == 0
            break
        kills.append({"strategy": strategy, "where": where_it_landed(run),
                      "debris": debris(run)})
        problems += [f"after kill {len(kills)}: {p}" for p in folder_problems(run)]
    if not finished and not problems:
        started = (run / "config.json").exists()
        args = ["train", "--resume", str(run)] if started else ["train", "--out", str(run),
                                                                *config]
        process = vaekit(args, log)
        if process.wait() != 0:
            problems.append(f"final resume: exit status {process.returncode}")
    if not problems:
        problems += folder_problems(run)
        left = debris(run)
        if left:
            problems.append(f"debris left after completion: {', '.join(left)}")
        problems += differences(outcome(run), baseline)
    result = {"trial": index, "config": config_name, "kills": kills, "problems": problems}
    if not problems:
        shutil.rmtree(run, ignore_errors=True)  # keep failed trials for inspection
        log.unlink(missing_ok=True)
    return result


# ------------------------------------------------------------------------------------------------


def results_section(report: dict, machine: str, args) -> str:
    where = report["where"]
    inside = ", ".join(f"{n} {w}" for w, n in where.items()
                       if w.startswith("inside") or w.startswith("pruning"))
    other = ", ".join(f"{n} {w}" for w, n in where.items()
                      if not (w.startswith("inside") or w.startswith("pruning")))
    steps = {name: f"{count} steps" for name, count in report["steps"].items()}
    return f"""SIGKILL `vaekit train` at random moments and inside writes, resume, compare with the
uninterrupted run (see README.md). `python benchmarks/fault_injection.py --kills {args.kills}
--jobs {args.jobs} --seed {args.seed}`, with `OMP_NUM_THREADS=1`.

| | |
|---|---|
| trials | {report["trials"]} |
| SIGKILLs landed | {report["kills"]} |
| failed trials | **{report["failed_trials"]}** |
| kills inside a write | {report["kills_inside_writes"]}: {inside} |
| other kills | {other} |
| checked after every kill | every visible file parses and fits (config.json, model.safetensors, metrics.jsonl, PNGs); every `step-*` checkpoint verifies against its manifest |
| checked after the final resume | model.safetensors byte-identical to the uninterrupted run; the last checkpoint's weights, Adam moments and per-step losses (loss, reconstruction, KL of every step) bit-identical; state.json and metrics.jsonl equal but for timings; no temporaries left |
| configurations | {"; ".join(f"`{n}` ({steps[n]}): `{c}`" for n, c in report["configs"].items())}; a random `--checkpoint-every-steps` (1-8 or none) and `--keep-checkpoints` (1-3) on every start |
| wall time | {report["seconds"]:.0f} s ({args.jobs} trial(s) side by side) |
| machine | {machine} |
| date, commit | {report["date"]}, {report["commit"]} |
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs to land (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--jobs", type=int, default=1, help="trials run side by side")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--configs", default="all", help="comma-separated configuration names")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="vaekit-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    configs = configurations(work)
    if args.configs != "all":
        configs = {name: configs[name] for name in args.configs.split(",")}
    started = time.monotonic()

    baselines, durations = {}, {}
    for name, config in configs.items():
        run = work / f"baseline-{name}"
        shutil.rmtree(run, ignore_errors=True)
        begun = time.monotonic()
        process = vaekit(["train", "--out", str(run), *config], work / f"baseline-{name}.log")
        if process.wait() != 0:
            print(f"baseline {name} failed; see {work}/baseline-{name}.log", file=sys.stderr)
            return 1
        durations[name] = time.monotonic() - begun
        baselines[name] = outcome(run)
        print(f"baseline {name}: {durations[name]:.1f} s uninterrupted, "
              f"{len(baselines[name]['tensors']['optimizer/step_log'])} steps", flush=True)

    names = list(configs)
    results: list[dict] = []
    landed = 0
    lock = threading.Lock()
    index = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running: set[concurrent.futures.Future] = set()
        while True:
            with lock:
                planned_more = landed + 2 * len(running) < args.kills
            if planned_more and len(running) < args.jobs:
                name = names[index % len(names)]
                running.add(pool.submit(run_trial, index, args.seed, name, configs[name], work,
                                        baselines[name], durations[name]))
                index += 1
                continue
            if not running:
                if landed >= args.kills:
                    break
                continue
            done, running = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                result = future.result()
                with lock:
                    results.append(result)
                    landed += len(result["kills"])
                status = "ok" if not result["problems"] else "FAILED: " + "; ".join(
                    result["problems"])
                print(f"trial {result['trial']:4d} {result['config']:<22} "
                      f"{len(result['kills'])} kill(s) "
                      f"[{', '.join(k['where'] for k in result['kills'])}] {status}", flush=True)

    kills = [k for r in results for k in r["kills"]]
    where: dict[str, int] = {}
    for k in kills:
        where[k["where"]] = where.get(k["where"], 0) + 1
    failures = [r for r in results if r["problems"]]
    report = {
        "trials": len(results), "kills": len(kills), "failed_trials": len(failures),
        "kills_inside_writes": sum(k["where"].startswith("inside") or k["where"].startswith(
            "pruning") for k in kills),
        "kills_inside_checkpoint_writes": where.get("inside a checkpoint write", 0),
        "where": dict(sorted(where.items(), key=lambda kv: -kv[1])),
        "configs": {n: " ".join(c).replace(str(work), "WORK") for n, c in configs.items()},
        "baseline_seconds": durations, "seconds": time.monotonic() - started,
        "steps": {n: len(b["tensors"]["optimizer/step_log"]) for n, b in baselines.items()},
        "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "failures": failures, "work": str(work),
    }
    import torch

    report["torch"] = torch.__version__
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent)
    report["commit"] = revision.stdout.strip() or None
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import machine, record

        record("fault injection", results_section(report, machine(), args))
    if not failures and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
