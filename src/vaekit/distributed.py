"""torch.distributed plumbing: one process or many, with the same calls.

Launched by `torchrun` (or by `vaekit train --nproc N`, which calls torch.distributed.run), each
process reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment and
joins a process group: nccl on GPUs, gloo on CPU. Alone, every call here is a no-op.

A failure on one process stops every process with that process's message, never a hang:

  - Work without collectives inside (loading data, rank 0 writing the run folder, a process's
    share of an evaluation) runs in `same_outcome()`. One all-reduce after the block tells every
    process whether any failed; all then raise `ProcessFailed` with the first failure's message.
  - Any other failure (a GPU out of memory in the middle of a step) is posted by `stop_together()`
    to the launcher's key-value store before the process exits. A process whose next collective
    breaks reads the notice and stops with that message; one still blocked `GRACE_SECONDS` later
    (nccl waits rather than breaks) is ended by its watchdog thread.

The process that failed prints the message; the others stop quietly (under torchrun each also
leaves it in the launcher's error file, so torchrun's failure summary names it).

Internal test hook, not a user option: VAEKIT_TEST_FAILURE="RANK:POINT[:COUNT[:hang]]" makes the
process of that rank fail (or hang) the COUNT-th time it reaches POINT: the name given to
`same_outcome` ("setup", "save", ...) or "sync" (the stop/checkpoint agreement of training).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, VaekitError, record_for_launcher

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # longest wait: rank 0 saving a checkpoint
GRACE_SECONDS = 5.0  # a process still blocked this long after another failed is ended
POLL_SECONDS = 0.2  # how often the watchdog looks for another process's failure
TEST_FAILURE_ENV = "VAEKIT_TEST_FAILURE"


class ProcessFailed(VaekitError):
    """A process of a distributed run failed; raised on every process, with its message."""

    def __init__(self, message: str, rank: int, world_size: int, here: int):
        super().__init__(f"rank {rank} of {world_size}: {message}")
        self.rank = rank
        self.reported_elsewhere = rank != here  # the failing process prints it, the others not


def describe(error: BaseException) -> str:
    """One line for a failure: a VaekitError's own message, else the exception's type and text."""
    if isinstance(error, VaekitError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass
class DistContext:
    """Who this process is among how many, and the collectives the library needs.

    Built by `from_env`; a default instance is a single process, where every call is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group
    initialised_here: bool = False
    failed: bool = False  # set when a failure left stop_together (skips the nccl teardown)
    _store: object = field(default=None, repr=False)  # the launcher's store, for failure notices
    _failure_key: str = ""
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _faults: dict = field(default_factory=dict, repr=False)  # test hook: point -> (count, action)
    _reached: dict = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        """True inside a process group (under torchrun, even with a single process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this backend's collectives take their tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def rows(self, global_batch: int) -> slice:
        """This process's rows of every global batch (and of its noise): equal, disjoint shares
        whose union is the batch, so the processes together compute what one process would."""
        local = global_batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    @staticmethod
    def from_env(device_type: str = "cpu") -> "DistContext":
        """Join the process group torchrun describes in the environment; alone, a context of one."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return DistContext()
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in env]
        if missing:
            if world == 1:
                return DistContext()  # RANK=0 WORLD_SIZE=1 alone: nothing to join
            raise ConfigError(f"WORLD_SIZE={world} is set but {missing[0]} is not; launch the "
                              "processes with torchrun (or vaekit train --nproc N)")
        if dist.is_initialized():
            context = DistContext(rank, world, local_rank, dist.get_backend())
        else:
            backend = "nccl" if device_type == "cuda" else "gloo"
            if backend == "nccl":
                if local_rank >= torch.cuda.device_count():
                    raise ConfigError(f"local rank {local_rank} has no GPU: only "
                                      f"{torch.cuda.device_count()} visible; start at most that "
                                      "many processes per machine, or pass --device cpu")
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
            context = DistContext(rank, world, local_rank, backend, initialised_here=True)
        context._faults = _parse_test_failures(env.get(TEST_FAILURE_ENV, ""), rank)
        context._start_watchdog(env)
        return context

    def shutdown(self) -> None:
        self._stopped.set()
        # After a failure an nccl group may still hold collectives its peers never joined, and
        # destroying it can block; the process exits anyway and the driver frees the rest.
        if self.initialised_here and dist.is_initialized() \
                and not (self.failed and self.backend == "nccl"):
            dist.destroy_process_group()

    # --- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes, in place (a no-op alone)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_over_processes(self, means: Tensor, count: int) -> Tensor:
        """Global means from each process's means of `count` examples: sums and counts are
        summed, then divided (never a mean of means, so unequal counts are weighted right)."""
        if not self.enabled:
            return means
        totals = torch.cat([means.detach().double().reshape(-1) * count,
                            torch.tensor([float(count)], dtype=torch.float64,
                                         device=means.device)])  # (M + 1,)
        self.all_reduce_sum(totals)
        return (totals[:-1] / totals[-1]).to(means.dtype).reshape(means.shape)

    def any_of(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag True on every process if it is True on any (stop/save decisions agree)."""
        if not self.enabled:
            return list(flags)
        self._fault_point("sync")
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in values.tolist()]

    def broadcast_object(self, value):
        """Rank 0's value on every process (only for small, trusted values: run names)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_bytes(self, data: bytes | None, size: int, src: int) -> bytes:
        """`data` (size bytes) of process src on every process, sent as a tensor (no pickle)."""
        if not self.enabled or size == 0:
            return data if data is not None else b""
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src=src)
        return buffer.cpu().numpy().tobytes()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # --- failures ------------------------------------------------------------------------------
    @contextmanager
    def same_outcome(self, point: str):
        """Run a block that holds no collective; if it raises on any process, raise on all.

        Every process raises ProcessFailed with the message of the lowest failing rank (which
        also keeps its own exception as the cause; a bug keeps its traceback there).
        """
        if not self.enabled:
            yield
            return
        error = None
        try:
            self._fault_point(point)
            yield
        except Exception as exc:  # KeyboardInterrupt and SystemExit are not failures to share
            error = exc
        origin, message = self._first_failure(error)
        if origin is None:
            return
        if origin == self.rank and not isinstance(error, VaekitError):
            raise error
        raise ProcessFailed(message, origin, self.world_size, self.rank) from error

    def _first_failure(self, error: BaseException | None) -> tuple[int | None, str]:
        payload = describe(error).encode() if error is not None else b""
        lengths = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        lengths[self.rank] = len(payload) + 1 if error is not None else 0
        dist.all_reduce(lengths)  # each process fills its own entry: the sum is the vector
        failed = [rank for rank, length in enumerate(lengths.tolist()) if length]
        if not failed:
            return None, ""
        origin = failed[0]
        size = int(lengths[origin]) - 1
        message = self.broadcast_bytes(payload if self.rank == origin else None, size, origin)
        return origin, message.decode(errors="replace")

    @contextmanager
    def stop_together(self, *collective: type[BaseException]):
        """Around a whole distributed run: a failure here is posted for the other processes.

        Exceptions in `collective` are raised on every process alike (an agreed interruption)
        and are not failures; neither is ProcessFailed, which every process already knows.
        """
        try:
            yield
        except (ProcessFailed, KeyboardInterrupt, *collective):
            raise
        except BaseException as exc:
            self.failed = True
            if not self.enabled:
                raise
            # A failing process posts its notice before it exits, so a collective broken by
            # that exit finds the notice already there.
            notice = self._failure_notice()
            if notice is not None and notice[0] != self.rank:
                raise ProcessFailed(notice[1], notice[0], self.world_size, self.rank) from exc
            self._post_failure(describe(exc))
            if isinstance(exc, VaekitError):
                raise ProcessFailed(str(exc), self.rank, self.world_size, self.rank) from exc
            raise

    def _post_failure(self, message: str) -> None:
        if self._store is None:
            return
        try:  # the first failure wins: later ones are most likely its consequences
            self._store.compare_set(self._failure_key, "",
                                    json.dumps({"rank": self.rank, "message": message}))
        except Exception:
            pass  # the store is gone (the launcher is stopping): nobody is left to tell

    def _failure_notice(self, store=None) -> tuple[int, str] | None:
        """(rank, message) of the first process that posted a failure, if any has."""
        store = store or self._store
        if store is None:
            return None
        try:
            if not store.check([self._failure_key]):
                return None
            notice = json.loads(store.get(self._failure_key))
            return int(notice["rank"]), str(notice["message"])
        except Exception:
            return None

    def _start_watchdog(self, env) -> None:
        """Connect to the launcher's store and watch it for another process's failure."""
        def connect():
            return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                 timeout=datetime.timedelta(seconds=10), wait_for_workers=False)

        try:
            self._store = connect()
            watch_store = connect()  # its own connection: a store client is not shared
        except Exception:
            return  # no store to reach (a group set up some other way): no notices
        self._failure_key = f"vaekit/failure/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        threading.Thread(target=self._watch, args=(watch_store,), name="vaekit-watchdog",
                         daemon=True).start()

    def _watch(self, store) -> None:
        while not self._stopped.wait(POLL_SECONDS):
            try:
                if not store.check([self._failure_key]):
                    continue
            except Exception:
                return  # the launcher's store is gone: nothing more to learn from it
            notice = self._failure_notice(store)
            if notice is None or notice[0] == self.rank:
                return
            if self._stopped.wait(GRACE_SECONDS):
                return  # the main thread stopped by itself (its collective broke)
            failure = ProcessFailed(notice[1], notice[0], self.world_size, self.rank)
            record_for_launcher(f"vaekit: error: {failure}")
            os._exit(2)  # blocked in a collective that will never complete

    # --- test hook -----------------------------------------------------------------------------
    def _fault_point(self, point: str) -> None:
        if point not in self._faults:
            return
        self._reached[point] = self._reached.get(point, 0) + 1
        count, action = self._faults[point]
        if self._reached[point] != count:
            return
        if action == "hang":
            threading.Event().wait()  # like a collective whose peer is gone (nccl)
        raise VaekitError(f"injected failure at {point} {count} ({TEST_FAILURE_ENV})")


def _parse_test_failures(spec: str, rank: int) -> dict:
    faults = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        parts = entry.split(":")
        try:
            if int(parts[0]) != rank:
                continue
            count = int(parts[2]) if len(parts) > 2 else 1
        except (ValueError, IndexError):
            raise ConfigError(f"{TEST_FAILURE_ENV}={spec!r}: entries are RANK:POINT[:COUNT[:hang]]"
                              ) from None
        faults[parts[1]] = (count, parts[3] if len(parts) > 3 else "fail")
    return faults


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m vaekit ARGV` as nproc processes on this machine, via torch.distributed.run.

    torchrun's own launcher does the work (a standalone rendezvous on a free port, one process
    per local rank, teardown of all when one fails); this only turns its outcome into an exit
    status. Returns that status.
    """
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc launches the processes itself; under torchrun leave it out")
    # CPU processes share the cores (torchrun's own default is one thread each).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                         "--module", "vaekit", *argv])
    # The processes print their own errors; torchrun's log lines about them would repeat them.
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed.elastic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        return _launch_failure(exc, nproc)
    except SignalException as exc:  # Ctrl-C: the processes saved the run and said so
        return 128 + int(getattr(exc, "sigval", signal.SIGTERM))
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return 0


def _launch_failure(exc, nproc: int) -> int:
    """The exit status of a failed launch, saying why where no process has said it."""
    import sys

    failures = exc.failures  # rank -> ProcessFailure
    recorded = {rank: f for rank, f in failures.items() if isinstance(f.message, dict)}
    if recorded:  # a process printed its message; vaekit's own errors exit with 2
        return 2 if any(f.exitcode == 2 for f in recorded.values()) else 1
    rank, failure = min(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else \
        f"exit status {failure.exitcode}"
    print(f"vaekit: rank {rank} of {nproc} stopped with {how}; the others were stopped "
          "(see its output above)", file=sys.stderr)
    return 1
