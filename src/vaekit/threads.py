"""CPU threads: a fair share of a busy machine instead of a fight for it.

PyTorch starts one OpenMP thread per core and its threads spin while they wait for each other.
On a machine whose cores are taken by other processes, a spinning thread holds a core the
thread it waits for needs, and every parallel region waits for a descheduled thread: training
the digits MLP fell from 28,000 to 250 images/s at load 7 on 2 cores, where a fair share is
about 7,000 (benchmarks/cpu_contention.py). So, unless the user chose (OMP_NUM_THREADS set):

- waiting threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE; read by OpenMP when
  torch is first imported, so this module must not import torch and is called before), and
- the intra-op threads are the cores this process may use (os.sched_getaffinity, not the
  machine's count) less the load of the other processes, at least one.

Torch-free: the CLI calls it before importing torch.
"""

from __future__ import annotations

import math
import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or taskset limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def fair_threads(cores: int, load: float) -> int:
    """Threads for a process starting beside `load` runnable others on `cores` cores: the cores
    they leave free, rounded, at least one and at most the cores."""
    if not math.isfinite(load) or load < 0:
        return cores
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def prepare_openmp() -> None:
    """Before torch is imported: sleeping, not spinning, waits (unless the user chose)."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def choose_threads() -> str | None:
    """Set torch's intra-op threads to a fair share of the usable cores, unless OMP_NUM_THREADS
    says how many; returns a line saying what was chosen when it is fewer than the cores."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    cores = usable_cores()
    try:
        load = os.getloadavg()[0]  # runnable processes, averaged over the last minute
    except (AttributeError, OSError):
        load = 0.0
    threads = fair_threads(cores, load)
    torch.set_num_threads(threads)
    if threads < cores:
        return (f"using {threads} of {cores} CPU cores: the load average is {load:.1f} (set "
                "OMP_NUM_THREADS=N to choose)")
    return None
