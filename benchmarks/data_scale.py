"""Image folders at scale: decode rate, cache open time and memory, in one run.

    OMP_NUM_THREADS=1 nice python benchmarks/data_scale.py --n 3000
    OMP_NUM_THREADS=1 nice python benchmarks/data_scale.py --n 200000 --work /big/disk  # CelebA

Writes N synthetic JPEGs of 178 x 218 (CelebA's size: smooth gradients, shapes and noise, quality
90) and measures, each phase in a fresh process so that its memory is its own:

    reference   what vaekit did before the cache (every image decoded at full size and held,
                then resized): time and peak memory; only for N <= --reference-max
    single      the first decode into the cache in one process (workers=1)
    parallel    the first decode into a second cache with every core (the same run's images)
    open        a second load_dataset of the cached folder (what a second `vaekit train` does):
                in memory (--data-memory auto), memory-mapped (--data-memory 0) the first time
                (which writes the split's file) and again
    train       training steps of the conv net at 64 x 64 from memory and from the map
    fashion     training steps of the 784-400-20 MLP on Fashion-MNIST from memory and forced
                through the map (--data-memory 0), three alternating processes each
    processes   `vaekit train` for --process-seconds on one process and on two under torchrun,
                in memory and mapped: peak RssAnon of all the processes together

Memory is RssAnon (resident memory less the file-backed pages, such as a map's), sampled every
10 ms over the process and its children (the decoding pool), peak reported. The issue's goals
(2 cores): parallel >= 1.6 x single; open < 2 s; peak RssAnon of a conv 64 x 64 run <= 1.5 GiB,
growing <= 100 MiB from 20,000 to 200,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SRC = HERE.parent / "src"


def rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                children = []
            out.extend(children)
            todo.extend(children)
    return out


class PeakAnon:
    """Peak RssAnon of this process, and of this process plus its children, sampled."""

    def __init__(self, every: float = 0.01):
        self.every, self.own, self.tree = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            own = rss_anon_kib(me)
            self.own = max(self.own, own)
            self.tree = max(self.tree, own + sum(rss_anon_kib(c) for c in descendants(me)))
            self._stop.wait(self.every)

    def __enter__(self):
        self.baseline = rss_anon_kib(os.getpid())  # after the imports: a run has them too
        self._thread.start()
        return self

    @property
    def added_mib(self) -> float:
        """Peak of the process tree over this process's memory at the start, MiB."""
        return (self.tree - self.baseline) / 1024

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --- phases (each run in its own process) -------------------------------------------------------


def _write_chunk(task):
    folder, start, stop = task
    import numpy as np
    from PIL import Image, ImageDraw

    for i in range(start, stop):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:218, 0:178]
        base = rng.uniform(40, 200, 3)
        slope = rng.uniform(-0.6, 0.6, (2, 3))
        pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] * 0.5
        pixels += rng.normal(0, 6, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        cx, cy, r = rng.integers(50, 130), rng.integers(60, 160), rng.integers(20, 50)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in
                                                                  rng.integers(0, 256, 3)))
        image.save(Path(folder) / f"{i:06d}.jpg", quality=90)
    return stop - start


def write_images(folder: Path, n: int) -> float:
    import multiprocessing

    folder.mkdir(parents=True, exist_ok=True)
    present = len(list(folder.glob("*.jpg")))
    if present == n:
        return 0.0
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    tasks = [(str(folder), s, min(s + 500, n)) for s in range(0, n, 500)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_chunk, tasks):
            pass
    return time.perf_counter() - started


def phase_reference(folder: Path, size: int) -> dict:
    """vaekit before the cache (read_image_folder until this benchmark's commit): hold every
    full-size decoded image, then crop and resize each."""
    import numpy as np
    import torch  # noqa: F401 (as in the other phases)
    from PIL import Image

    with PeakAnon() as peak:
        started = time.perf_counter()
        images = []
        for path in sorted(folder.glob("*.jpg")):
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        out = []
        for image in images:
            side = min(image.size)
            left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
            out.append(np.asarray(image.convert("RGB").crop((left, top, left + side, top + side))
                                  .resize((size, size), Image.Resampling.BICUBIC)))
        np.stack(out)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_anon_mib": peak.tree / 1024, "added_mib": peak.added_mib}


def phase_decode(folder: Path, size: int, workers: int) -> dict:
    import torch  # noqa: F401 (loaded by every run before its data)
    from vaekit.image_folder import cache_images, list_image_folder

    import resource

    def cpu_seconds() -> float:
        return sum(u.ru_utime + u.ru_stime for u in (
            resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))

    with PeakAnon() as peak:
        started, cpu = time.perf_counter(), cpu_seconds()
        files, _, _ = list_image_folder(folder)
        cache = cache_images(folder, files, size, 3, workers=workers, progress=False,
                             log=lambda line: None)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "images": cache.shape[0],
            "workers": workers,
            "peak_anon_mib": peak.tree / 1024, "parent_peak_anon_mib": peak.own / 1024,
            "added_mib": peak.added_mib, "parent_added_mib": (peak.own - peak.baseline) / 1024,
            "cache_mib": cache.nbytes / 2**20}


def phase_open(folder: Path, size: int, memory: str) -> dict:
    import torch  # noqa: F401 (imported before the clock: a run has torch loaded already)
    from vaekit.data import load_dataset

    with PeakAnon() as peak:
        before = rss_anon_kib(os.getpid())
        started = time.perf_counter()
        dataset = load_dataset(str(folder), image_size=size, channels=3, data_memory=memory)
        seconds = time.perf_counter() - started
        dataset.fingerprint()
        time.sleep(0.05)
    return {"seconds": seconds, "mapped": dataset.mapped, "n_train": len(dataset.train_x),
            "peak_anon_mib": peak.own / 1024, "anon_added_mib": (peak.own - before) / 1024}


def timed_steps(config, warmup: int, steps: int) -> tuple[float, object, int]:
    """What Trainer.fit does per step (the batch from the data, its noise, an update), timed
    over `steps` steps after `warmup`: (images/s, the dataset, the steps timed)."""
    import torch

    from vaekit.distributed import DistContext
    from vaekit.randomness import StepNoise, epoch_permutation
    from vaekit.train import Trainer, build_model, prepare_data

    dataset, pipeline, config = prepare_data(config.with_presets())
    trainer = Trainer(config, Path(tempfile.mkdtemp()), dataset, pipeline,
                      build_model(config, dataset.shape), torch.device("cpu"), DistContext(),
                      log=lambda *a, **k: None)
    batch, cpu = config.batch_size, torch.device("cpu")
    order = epoch_permutation(len(trainer.train_x), 0, 0, cpu)
    steps = max(1, min(steps, len(order) // batch - warmup))

    def run(first, count):
        for step in range(first, first + count):
            raw = trainer.batch_rows(order[step * batch:(step + 1) * batch])
            noise = StepNoise(0, step, batch, slice(0, batch), cpu)
            trainer.train_step(raw, noise.uniform(dataset.shape), noise.normal(config.latent_dim))
    run(0, warmup)
    started = time.perf_counter()
    run(warmup, steps)
    return batch * steps / (time.perf_counter() - started), dataset, steps


def phase_train(folder: Path, size: int, memory: str, steps: int) -> dict:
    from vaekit.config import TrainConfig

    with PeakAnon() as peak:
        rate, dataset, steps = timed_steps(TrainConfig(
            data=str(folder), image_size=size, channels=3, net="conv", epochs=1, batch_size=64,
            latent_dim=64, progress=False, data_memory=memory), 2, steps)
    return {"images_per_second": rate, "steps": steps, "mapped": dataset.mapped,
            "peak_anon_mib": peak.own / 1024}


def phase_fashion(memory: str, steps: int) -> dict:
    """The 784-400-20 MLP on Fashion-MNIST (Debian's files, the cache or a download), batch 128:
    training steps from memory and forced through the map (--data-memory 0)."""
    from vaekit.config import TrainConfig

    rate, dataset, steps = timed_steps(TrainConfig(
        data="fashion-mnist", epochs=1, batch_size=128, hidden=[400], latent_dim=20,
        progress=False, data_memory=memory), 20, steps)
    return {"images_per_second": rate, "mapped": dataset.mapped, "steps": steps}


def processes_peak(command: list[str], env: dict) -> dict:
    """Run a command; the peak over time of the summed RssAnon of its process tree, and of
    the largest process in it (the training processes under torchrun), MiB."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    total = largest = 0
    while process.poll() is None:
        pids = descendants(process.pid)
        sizes = [rss_anon_kib(pid) for pid in [process.pid, *pids]]
        total, largest = max(total, sum(sizes)), max(largest, max(sizes))
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return {"total_mib": total / 1024, "largest_mib": largest / 1024}


def measure_processes(args: argparse.Namespace, folder: Path, cache: Path) -> dict:
    """`vaekit train` on the folder, conv at 64 x 64, for a few seconds: one process and two
    under torchrun, data in memory and mapped; peak RssAnon of all the processes together."""
    import socket

    env = {**os.environ, "VAEKIT_CACHE": str(cache), "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": "1"}
    out = {}
    for processes in (1, 2):
        for memory in ("auto", "0"):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            launcher = [sys.executable, "-m", "vaekit"] if processes == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--master-port", str(port), "-m", "vaekit"]
            run_dir = Path(tempfile.mkdtemp()) / "run"
            out[f"{processes}-{memory}"] = processes_peak(
                [*launcher, "train", "--data", str(folder), "--image-size", str(args.size),
                 "--channels", "3", "--net", "conv", "--epochs", "1", "--batch-size", "64",
                 "--time-limit", str(args.process_seconds), "--data-memory", memory,
                 "--no-progress", "--num-samples", "4", "--out", str(run_dir)], env)
            shutil.rmtree(run_dir.parent, ignore_errors=True)
    return out


def run_phase(args: argparse.Namespace, phase: str, cache: Path, *extra) -> dict:
    env = {**os.environ, "VAEKIT_CACHE": str(cache), "PYTHONPATH": str(SRC),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--phase", phase, "--work", str(args.work),
               "--n", str(args.n), "--size", str(args.size), *map(str, extra)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(results: dict, size: int) -> list[str]:
    """The figures of a run, one line each (printed, and recorded in RESULTS.md)."""
    n = results["n"]
    rate = {k: results[k]["images"] / results[k]["seconds"] for k in ("single", "parallel")}
    lines = []
    if "fashion" in results:
        arms = results["fashion"]
        memory = sorted(r["images_per_second"] for r in arms["memory"])
        mapped = sorted(r["images_per_second"] for r in arms["mapped"])
        lines.append(f"Fashion-MNIST, 784-400-20 MLP, batch 128, {arms['memory'][0]['steps']} "
                     f"steps, {len(memory)} alternating processes each: in memory "
                     f"{', '.join(f'{v:.0f}' for v in memory)} img/s, forced through the map "
                     f"(--data-memory 0) {', '.join(f'{v:.0f}' for v in mapped)} img/s: median "
                     f"ratio {mapped[len(mapped) // 2] / memory[len(memory) // 2]:.2f} x "
                     "(goal >= 0.9)")
    lines += [f"{n:,} JPEGs of 178 x 218 -> 3 x {size} x {size}"]
    if "reference" in results:
        ref = results["reference"]
        lines.append(f"  before the cache (hold all, then resize): {ref['seconds']:.2f} s, "
                     f"{n / ref['seconds']:.0f} img/s, peak RssAnon {ref['peak_anon_mib']:.0f} "
                     f"MiB (+{ref['added_mib']:.0f} MiB over the process at the start)")
    for key in ("single", "parallel"):
        r = results[key]
        lines.append(f"  first decode, {r['workers']} worker(s): {r['seconds']:.2f} s, "
                     f"{rate[key]:.0f} img/s, peak RssAnon {r['peak_anon_mib']:.0f} MiB with the "
                     f"workers (+{r['added_mib']:.0f} MiB; the parent alone "
                     f"+{r['parent_added_mib']:.0f} MiB); cache {r['cache_mib']:.0f} MiB; CPU "
                     f"{r['cpu_seconds']:.2f} s ({r['images'] / r['cpu_seconds']:.0f} img per "
                     "CPU-second)")
    lines.append(f"  parallel / single: {rate['parallel'] / rate['single']:.2f} x (goal >= 1.6 "
                 "on 2 otherwise idle cores)")
    # --data-memory auto holds data of at most 1 GiB in memory and maps larger data: say which
    auto = "--data-memory auto: " + ("mapped" if results["open_memory"]["mapped"] else "in memory")
    auto_mapped = results["open_memory"]["mapped"]  # then it wrote the split file first
    for key, what in (("open_memory", auto + (", writing the split file" if auto_mapped else "")),
                      ("open_mapped_first", "--data-memory 0, " + (
                          "the split file written" if auto_mapped else "writing the split file")),
                      ("open_mapped", "--data-memory 0, the split file written")):
        r = results[key]
        lines.append(f"  second open ({what}): {r['seconds']:.3f} s (goal < 2 s), RssAnon added "
                     f"{r['anon_added_mib']:.0f} MiB, peak {r['peak_anon_mib']:.0f} MiB")
    if "processes" in results:
        p = results["processes"]
        data_mib = results["parallel"]["cache_mib"]
        lines.append(f"  vaekit train --net conv, peak RssAnon of all processes ({data_mib:.0f} MiB "
                     f"of images): 1 process {p['1-auto']['total_mib']:.0f} MiB ({auto}), "
                     f"{p['1-0']['total_mib']:.0f} MiB mapped; 2 under torchrun "
                     f"{p['2-auto']['total_mib']:.0f} MiB ({auto}), {p['2-0']['total_mib']:.0f}"
                     f" MiB mapped (the launcher included; largest process "
                     f"{p['2-auto']['largest_mib']:.0f} and {p['2-0']['largest_mib']:.0f} MiB)")
    if "train_memory" in results:
        memory, mapped = results["train_memory"], results["train_mapped"]
        arm = "--data-memory auto: " + ("mapped" if memory["mapped"] else "in memory")
        lines.append(f"  conv {size} x {size} training, batch 64, {memory['steps']} steps: "
                     f"{arm} {memory['images_per_second']:.1f} img/s (peak RssAnon "
                     f"{memory['peak_anon_mib']:.0f} MiB), --data-memory 0 "
                     f"{mapped['images_per_second']:.1f} img/s (peak RssAnon "
                     f"{mapped['peak_anon_mib']:.0f} MiB): "
                     f"{mapped['images_per_second'] / memory['images_per_second']:.2f} x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images to write (default 2000)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vaekit-scale")
    parser.add_argument("--reference-max", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--process-seconds", type=float, default=15,
                        help="seconds of `vaekit train` on one and two processes (0: skip)")
    parser.add_argument("--fashion-steps", type=int, default=300,
                        help="MLP steps on Fashion-MNIST from memory and the map (0: skip)")
    parser.add_argument("--no-record", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.work / f"jpegs-{args.n}"
    if args.phase:
        sys.path.insert(0, str(SRC))
        phases = {"reference": lambda: phase_reference(folder, args.size),
                  "decode": lambda: phase_decode(folder, args.size, int(args.extra[0])),
                  "open": lambda: phase_open(folder, args.size, args.extra[0]),
                  "train": lambda: phase_train(folder, args.size, args.extra[0],
                                               int(args.extra[1])),
                  "fashion": lambda: phase_fashion(args.extra[0], int(args.extra[1]))}
        print(json.dumps(phases[args.phase]()))
        return

    from common import machine, today

    args.work.mkdir(parents=True, exist_ok=True)
    wrote = write_images(folder, args.n)
    caches = {k: args.work / f"cache-{args.n}-{k}" for k in ("single", "parallel")}
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    results = {"n": args.n, "write_seconds": wrote}
    if args.n <= args.reference_max:
        results["reference"] = run_phase(args, "reference", caches["single"])
    results["single"] = run_phase(args, "decode", caches["single"], 1)
    results["parallel"] = run_phase(args, "decode", caches["parallel"], args.workers)
    results["open_memory"] = run_phase(args, "open", caches["parallel"], "auto")
    results["open_mapped_first"] = run_phase(args, "open", caches["parallel"], "0")
    results["open_mapped"] = run_phase(args, "open", caches["parallel"], "0")
    if args.fashion_steps:
        arms = {"memory": [], "mapped": []}
        for _ in range(3):  # alternating, so that the machine's other load falls on both arms
            for arm, memory in (("memory", "auto"), ("mapped", "0")):
                arms[arm].append(run_phase(args, "fashion", caches["parallel"], memory,
                                           args.fashion_steps))
        results["fashion"] = arms
    if args.process_seconds:
        results["processes"] = measure_processes(args, folder, caches["parallel"])
    if args.train_steps:
        results["train_memory"] = run_phase(args, "train", caches["parallel"], "auto",
                                            args.train_steps)
        results["train_mapped"] = run_phase(args, "train", caches["parallel"], "0",
                                            args.train_steps)
    lines = summary(results, args.size)
    header = (f"machine: {machine()}; date {today()}, commit {commit()}; load average at the end "
              f"{os.getloadavg()[0]:.1f}")
    print("\n".join([header, *lines]))
    print(json.dumps(results))
    if not args.no_record:
        record(args.n, header, lines)


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


def record(n: int, header: str, lines: list[str]) -> None:
    from common import record as write_section

    write_section(f"data_scale: image folders at scale, N = {n:,} (benchmarks/data_scale.py)",
                  "\n".join([f"- {header}", f"- command: `OMP_NUM_THREADS=1 nice python "
                             f"benchmarks/data_scale.py --n {n}`", "", "```", *lines, "```"]))


if __name__ == "__main__":
    main()
