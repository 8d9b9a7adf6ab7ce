"""Tensor parallelism across processes, on torch.distributed.

The driver (rank 0, the engine's own process) starts ``N - 1`` worker processes on
its host, each holding its shard of the weights and of the KV cache. Under
``torchrun`` (one or several hosts) every rank runs the user's program instead:
rank 0 becomes the driver and the others turn into workers inside ``LLM(...)``.
The scheduler, KV manager and sampler run only on the driver: each step it
broadcasts the step's ``StepInputs`` (``StepChannel``), and every rank runs the same
forward, whose all-reduces and logit gather meet in lockstep. NCCL carries the model's collectives on CUDA,
gloo on CPU; the step broadcast always goes through a gloo group, so workers read
it on the host and idle workers wait without a collective timeout.

Overlapped scheduling launches step n+1 before the driver has read step n's sampled
tokens: the driver broadcasts each step's sampled ids on the device right after
sampling, and the rows of step n+1 that need them (``pending_rows``, ``pending_src``) travel
with the step, so every rank fills them in from its own device copy.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import fields
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orbitllm.config import EngineConfig
from orbitllm.engine.step_data import FatalStepError, SchedulerOutput
from orbitllm.executor.model_runner import LaunchedStep, ModelRunner, StepResult
from orbitllm.executor.step_inputs import StepInputs
from orbitllm.layers.tensor_parallel import Shard

log = logging.getLogger(__name__)

# A collective waits this long for a stuck (not dead) peer; a dead one fails at once.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Idle workers wait for the next step this long (a server may see no request for days).
IDLE_TIMEOUT = timedelta(days=365)


class WorkerDiedError(FatalStepError):
    """A tensor-parallel worker process exited; the engine cannot go on."""


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Rank r of a host uses the r-th GPU after the one asked for; CPU ranks share the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + local_rank)


def torchrun_shard(cfg: EngineConfig) -> tuple[Shard, int] | None:
    """(this process's shard, its rank on this host) when ``torchrun`` started it,
    else None. Every rank runs the user's program; the ranks after 0 become workers."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != cfg.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size: {cfg.tensor_parallel_size} does not match "
                         f"torchrun's world size {size}")
    return Shard(rank, size), int(os.environ.get("LOCAL_RANK", rank))


def init_distributed(shard: Shard, init_method: str, device: torch.device) -> dist.ProcessGroup:
    """Join the default group (NCCL on CUDA, gloo on CPU); returns the gloo group of
    the step broadcast."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=shard.rank,
                            world_size=shard.size, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class StepChannel:
    """The driver's per-step broadcast of a ``StepInputs``: every field marked
    ``wire`` (its arrays and ints), packed into one int64 tensor (header + arrays).
    The header holds the command, the total length, the int fields and each array's
    shape, so a new wire field travels without a change here. A step larger than
    the fixed buffer sends its tail in a second broadcast, whose size the header
    announced."""

    CAPACITY = 1 << 13
    ARRAYS = [(f.name, f.metadata["wire"]) for f in fields(StepInputs)
              if f.metadata.get("wire") not in (None, int)]
    INTS = [f.name for f in fields(StepInputs) if f.metadata.get("wire") is int]
    HEADER = 2 + len(INTS) + 2 * len(ARRAYS)   # command, total, ints, (rows, columns) each
    STEP, STOP = 1, 0

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.buffer = torch.zeros(self.CAPACITY, dtype=torch.int64)

    def send(self, inputs: StepInputs) -> None:
        self._broadcast(self.pack(inputs))

    def send_stop(self) -> None:
        header = np.zeros(self.HEADER, np.int64)
        header[:2] = self.STOP, self.HEADER
        self._broadcast(header)

    def _broadcast(self, packed: np.ndarray) -> None:
        head = min(packed.size, self.CAPACITY)
        self.buffer.numpy()[:head] = packed[:head]
        dist.broadcast(self.buffer, 0, group=self.group)
        if packed.size > self.CAPACITY:
            dist.broadcast(torch.from_numpy(packed[self.CAPACITY:]), 0, group=self.group)

    def recv(self) -> StepInputs | None:
        """The next step's inputs (``sampling`` is the driver's: None), or None when
        the driver stops."""
        dist.broadcast(self.buffer, 0, group=self.group)
        packed = self.buffer.numpy()
        cmd, total = packed[:2].tolist()
        if cmd == self.STOP:
            return None
        if total > self.CAPACITY:
            tail = torch.empty(total - self.CAPACITY, dtype=torch.int64)
            dist.broadcast(tail, 0, group=self.group)
            packed = np.concatenate([packed, tail.numpy()])
        return self.unpack(packed[:total])

    @classmethod
    def pack(cls, inputs: StepInputs) -> np.ndarray:
        arrays = [getattr(inputs, name) for name, _ in cls.ARRAYS]
        total = cls.HEADER + sum(a.size for a in arrays)
        # A 1-D array's column count is -1.
        shapes = [d for a in arrays for d in (a.shape if a.ndim == 2 else (a.shape[0], -1))]
        header = np.asarray([cls.STEP, total] + [getattr(inputs, n) for n in cls.INTS] + shapes,
                            np.int64)
        return np.concatenate([header] + [a.astype(np.int64, copy=False).ravel() for a in arrays])

    @classmethod
    def unpack(cls, packed: np.ndarray) -> StepInputs:
        header = packed[:cls.HEADER].tolist()
        body = packed[cls.HEADER:].copy()   # the arrays must outlive the receive buffer
        values = dict(zip(cls.INTS, header[2:2 + len(cls.INTS)]))
        shapes = header[2 + len(cls.INTS):]
        offset = 0
        for i, (name, dtype) in enumerate(cls.ARRAYS):
            rows, cols = shapes[2 * i], shapes[2 * i + 1]
            size = rows * cols if cols >= 0 else rows
            array = body[offset:offset + size].astype(dtype, copy=False)
            values[name] = array.reshape(rows, cols) if cols >= 0 else array
            offset += size
        return StepInputs(**values)


class WorkerProcesses:
    """The driver's ``N - 1`` worker processes: started, watched and stopped by it."""

    def __init__(self, cfg: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        size = cfg.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs = [ctx.Process(target=worker_main, name=f"orbitllm-tp{rank}", daemon=True,
                                  args=(cfg, Shard(rank, size), self.init_method, os.getpid()))
                      for rank in range(1, size)]
        for p in self.procs:
            p.start()

    def exited(self) -> list:
        """The worker processes that have exited."""
        return [p for p in self.procs if p.exitcode is not None]

    def raise_if_dead(self, wait: float = 0.0) -> None:
        """Raise WorkerDiedError if a worker has exited, waiting up to ``wait`` seconds
        for one that is on its way out (its sockets close before it is reaped)."""
        deadline = time.monotonic() + wait
        while True:
            dead = self.exited()
            if dead:
                p = dead[0]
                raise WorkerDiedError(
                    f"tensor-parallel worker {p.name} (pid {p.pid}) exited with code {p.exitcode}; "
                    "the engine cannot continue and must be recreated")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def stop(self, channel: StepChannel | None) -> None:
        """Ask the workers to exit (if the channel is usable), leave the process group
        alongside them, then make sure they exit."""
        if channel is not None and all(p.is_alive() for p in self.procs):
            try:
                channel.send_stop()
            except RuntimeError:   # a peer is gone: terminate below
                pass
        close_process_group()
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


class TorchrunRanks:
    """The workers when ``torchrun`` started every rank: nothing to spawn or watch here
    (torchrun's agent stops all ranks when one fails); stopping them is the STOP step."""

    procs: list = []

    def exited(self) -> list:
        return []

    def raise_if_dead(self, wait: float = 0.0) -> None:
        return None

    def stop(self, channel: StepChannel | None) -> None:
        if channel is not None:
            channel.send_stop()
        close_process_group()


def close_process_group(timeout: float = 10.0) -> None:
    """Leave torch.distributed. NCCL's teardown can be collective (a rank waits for
    its peers' teardown), so the driver leaves right after STOP, alongside the workers,
    never after waiting for them to exit; a peer that never comes (dead or killed)
    would block it forever, so after ``timeout`` the communicators are aborted."""
    if not dist.is_initialized():
        return
    if _bounded(dist.destroy_process_group, timeout):
        return
    log.warning("tensor-parallel teardown blocked by a peer for %.0f s; aborting", timeout)
    if not _bounded(dist.distributed_c10d._abort_process_group, timeout):
        log.error("tensor-parallel teardown: the abort blocked too; this process keeps "
                  "its process group (a new tensor-parallel engine here will fail)")


def _bounded(fn: Callable[[], None], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread on this rank's GPU; False if it did not finish
    within ``timeout`` seconds. At interpreter exit (Python >= 3.12 starts no new
    threads) it runs inline instead."""
    done = threading.Event()
    gpu = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run() -> None:
        if gpu is not None:   # a new thread starts on GPU 0
            torch.cuda.set_device(gpu)
        fn()
        done.set()

    try:
        threading.Thread(target=run, name="orbitllm-tp-teardown", daemon=True).start()
    except RuntimeError:
        run()
    return done.wait(timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DriverRunner(ModelRunner):
    """Rank 0's runner: broadcasts each step to the workers before its own forward,
    turns a broken collective into WorkerDiedError, and stops the workers at
    shutdown (explicit, or at interpreter exit)."""

    def __init__(self, *args, workers: WorkerProcesses, channel: StepChannel, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers, self.channel = workers, channel
        self._stopped = False
        atexit.register(self.shutdown)
        if self.device.type == "cuda" and workers.procs:   # NCCL does not notice a dead peer
            threading.Thread(target=self._abort_on_worker_death, daemon=True).start()

    def launch(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        self.workers.raise_if_dead()
        try:
            return super().launch(sched, prev)
        except RuntimeError:   # a collective failed: most likely a worker died
            self.workers.raise_if_dead(wait=3.0)
            raise

    def finish(self, step: LaunchedStep) -> StepResult:
        try:
            return super().finish(step)
        except RuntimeError:   # on CUDA, the wait for a step whose NCCL peer died
            self.workers.raise_if_dead(wait=3.0)
            raise

    def _forward(self, inputs: StepInputs, prev_tokens: torch.Tensor | None):
        self.channel.send(inputs)
        return super()._forward(inputs, prev_tokens)

    def _abort_on_worker_death(self) -> None:
        while not self._stopped:
            if self.workers.exited():
                log.error("a tensor-parallel worker died; aborting the NCCL communicator")
                if self.model.shard.peer_reduce is not None:   # a kernel may wait for it
                    self.model.shard.peer_reduce.release()
                dist.distributed_c10d._abort_process_group()
                return
            time.sleep(0.5)

    def shutdown(self) -> None:
        if self._stopped:
            return
        atexit.unregister(self.shutdown)
        self._stopped = True
        if not self.workers.exited():
            super().shutdown()   # the graphs go before the process group; not if a
            # dead peer may have left a captured collective waiting forever
        self.workers.stop(self.channel)


def start_driver(cfg: EngineConfig, device: torch.device, launched: tuple[Shard, int] | None,
                 build_runner) -> DriverRunner:
    """Start the workers, join them, and build rank 0's runner with
    ``build_runner(shard, device, make_runner)`` (the same builder the workers run).
    ``launched``: ``torchrun_shard(cfg)``, when torchrun started every rank."""
    if dist.is_initialized():
        raise RuntimeError("tensor_parallel_size: torch.distributed is already initialized in "
                           "this process (one tensor-parallel engine per process)")
    if launched is not None and launched[0].rank > 0:
        shard, local_rank = launched
        try:
            # The driver's builder: reuses the checkpoint this process already opened.
            run_worker(shard, "env://", rank_device(device, local_rank),
                       lambda s, d: build_runner(s, d, ModelRunner))
        finally:
            close_process_group()
        raise SystemExit(0)   # this rank's part of the program ends with the driver
    if launched is not None:
        device = rank_device(device, launched[1])
        workers, init_method = TorchrunRanks(), "env://"
    else:
        device = rank_device(device, 0)
        workers = WorkerProcesses(cfg)
        init_method = workers.init_method
    channel = None
    try:
        channel = StepChannel(init_distributed(Shard(0, cfg.tensor_parallel_size),
                                               init_method, device))
        make = functools.partial(DriverRunner, workers=workers, channel=channel)
        return build_runner(Shard(0, cfg.tensor_parallel_size), device, make)
    except BaseException:
        workers.stop(None)
        raise


def worker_main(cfg: EngineConfig, shard: Shard, init_method: str, parent_pid: int) -> None:
    """A worker process: build this rank's shard, then mirror the driver's steps
    until it says stop. Exits with its parent, however the parent ends."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    from orbitllm.executor.setup import build_rank_runner, resolve_device
    try:
        run_worker(shard, init_method, rank_device(resolve_device(cfg.device), shard.rank),
                   functools.partial(build_rank_runner, cfg))
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group; the driver handles it
        pass
    except Exception:
        if os.getppid() == parent_pid:   # an orphan's broken sockets are not news
            traceback.print_exc()
        os._exit(1)
    finally:
        close_process_group()


def run_worker(shard: Shard, init_method: str, device: torch.device,
               build: Callable[[Shard, torch.device], ModelRunner]) -> None:
    """A worker rank: join the group, build this rank's shard with ``build(shard,
    device)``, mirror the driver's steps until it says stop."""
    if device.type == "cpu":   # ranks share the cores; oversubscribed threads spin
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard.size))
    channel = StepChannel(init_distributed(shard, init_method, device))
    runner = build(shard, device)
    while (inputs := channel.recv()) is not None:
        runner.mirror_step(inputs)
    runner.shutdown()   # its graphs go before the process group (close_process_group)


def _exit_with_parent(parent_pid: int) -> None:
    """SIGKILL or SIGTERM of the driver skips its clean-up: leave no orphan behind."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)
