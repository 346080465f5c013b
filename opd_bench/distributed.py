"""Several processes (GPUs or nodes) training one model: the process group and its few collectives.

``torchrun`` and ``accelerate launch`` start one process per GPU and give each ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`current` initialises
the process group from them once (nccl on CUDA, gloo on CPU). Without them it returns a
single-process group whose collectives hand their input back, so code written against this module
runs unchanged, and bit for bit as before, in one process.

How the trainers use it (data parallel, every rank holds the whole model):

* the prompts of a step are the same on every rank (drawn from the step's seed); each rank rolls
  out its contiguous share (:meth:`ProcessGroup.shard`), whole prompt groups; GRPO gathers every
  rank's rewards and computes the advantages of the whole batch (its std may be the batch's), so
  they are exactly the 1-process ones; noise stays tied to the global sample index;
* gradients are averaged before the optimizer step (:meth:`ProcessGroup.average_gradients`), so
  every rank keeps identical weights;
* metrics are computed from all-gathered values (global means); only rank 0 writes files;
* at exit every rank meets once more, on a gloo group of its own with a timeout of days
  (``EXIT_TIMEOUT``): rank 0 evaluates alone for as long as that takes while the others wait there,
  in no nccl collective whose watchdog would abort them;
* a rank that fails alone leaves at once (:func:`leave_alone_on_error`), so the launcher, which
  stops the other ranks when a worker exits, ends the job instead of waiting out the timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import pickle
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

# Non-main ranks wait in a collective while rank 0 alone evaluates and writes; the default
# timeouts (10 min for nccl) would kill a run during a long evaluation.
DEFAULT_TIMEOUT_S = 4 * 3600
# At exit the other ranks wait for rank 0's final evaluations, which take as long as they take.
EXIT_TIMEOUT = timedelta(days=7)
BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most 16M elements


class ProcessGroup:
    """Rank, world size and the collectives the trainers need; no-ops when ``world_size == 1``."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str | torch.device = "cuda") -> torch.device:
        """This rank's device: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
        requested = torch.device(requested)
        if requested.type == "cuda" and requested.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return requested

    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo only CPU tensors
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ----------------------------------------------------------------------------- splitting
    def shard(self, items: Sequence, what: str = "prompts per step") -> tuple[list, int]:
        """This rank's contiguous share of ``items`` and the index of its first item.

        Equal shares only: the N-process run must be the same experiment as the 1-process one.
        """
        if len(items) % self.world_size:
            raise ValueError(
                f"{len(items)} {what} cannot be split evenly over {self.world_size} processes; "
                f"use a multiple of {self.world_size} (or another number of processes)"
            )
        size = len(items) // self.world_size
        start = self.rank * size
        return list(items[start : start + size]), start

    # ----------------------------------------------------------------------------- collectives
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (first dims may differ)."""
        if not self.distributed:
            return tensor
        device = tensor.device
        local = tensor.detach().to(self._comm_device())
        sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``tensor`` (a new tensor; the input is left alone)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor) / self.world_size if self.distributed else tensor

    @torch.no_grad()
    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every ``.grad`` by its mean over ranks, in a few flat all-reduces.

        A parameter without gradient on some rank counts as zero there; one without gradient on
        every rank stays ``None`` (the optimizer then skips it, as in one process).
        """
        if not self.distributed:
            return
        params = list(params)
        has_grad = self.all_reduce_sum(torch.tensor([float(p.grad is not None) for p in params]))
        live = []
        for p, present in zip(params, has_grad.tolist()):
            if present and p.grad is None:
                p.grad = torch.zeros_like(p)
            if present:
                live.append(p)
        for bucket in _buckets(live):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            flat = self.all_reduce_sum(flat) / self.world_size
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    @torch.no_grad()
    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
        """Copy rank ``src``'s values into ``params`` on every rank (identical starting weights)."""
        if not self.distributed:
            return
        for bucket in _buckets(list(params)):
            flat = torch.cat([p.detach().reshape(-1) for p in bucket]).to(self._comm_device())
            dist.broadcast(flat, src=src)
            offset = 0
            for p in bucket:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (keep tensors in it on the CPU)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 alone (e.g. what reads or writes files); its result, or its
        exception, on every rank, so that all ranks take the same branch or stop together."""
        if not self.distributed:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as error:
                try:
                    pickle.dumps(error)
                except Exception:  # an exception that cannot travel still has to stop the others
                    error = RuntimeError(f"on rank 0: {type(error).__name__}: {error}")
                outcome = (False, error)
        ok, value = self.broadcast_object(outcome)
        if not ok:
            value.raised_on_every_rank = True  # every rank stops: none is left waiting (leave_alone_on_error)
            raise value
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank]) if self.backend == "nccl" else dist.barrier()


def _buckets(params: list[torch.nn.Parameter]):
    """Consecutive runs of parameters with one dtype and device, at most BUCKET_ELEMENTS each."""
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


_exit_group = None  # the gloo group the ranks meet in at exit (created with the process group)
_abandoned = False  # this rank failed alone: it leaves without waiting for the others


@contextlib.contextmanager
def leave_alone_on_error():
    """Run the body; if it raises an error of this rank alone, the rank leaves at exit without the
    closing barrier. The other ranks are waiting in a collective it will never join: waiting for
    them would hold this process, and with it the job (a launcher stops the others when a worker
    exits), until the timeout. An error every rank raised together (``run_on_main``'s) keeps the
    barrier: they all reach it."""
    global _abandoned
    try:
        yield
    except BaseException as error:
        _abandoned = not getattr(error, "raised_on_every_rank", False)
        raise


def _destroy() -> None:
    if not dist.is_initialized() or _abandoned:  # a failed rank's exit ends the job; torch tidies up
        return
    try:
        # Tear down together: a rank that closed its connections while a peer was still inside
        # the last collective made that peer's gloo thread abort the process ("terminate called
        # without an active exception", about 1 in 10 two-process test runs under load). On a
        # group of its own, with a timeout of days: rank 0's final evaluations come first.
        dist.barrier(group=_exit_group)
    except Exception:  # a peer already gone: nothing to wait for
        pass
    dist.destroy_process_group()


SINGLE = ProcessGroup()
_current: ProcessGroup | None = None


def current() -> ProcessGroup:
    """The process group of this process, initialised from the launcher's environment on first use."""
    global _current
    if _current is None:
        _current = from_environment()
    return _current


def _timeout_seconds() -> float:
    text = os.environ.get("OPD_BENCH_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"OPD_BENCH_DIST_TIMEOUT={text!r}: give the seconds a process waits for the others, e.g. 14400")
    return seconds


def from_environment() -> ProcessGroup:
    """Join the group described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (or stay single).

    The backend is nccl when CUDA is available, gloo otherwise (``OPD_BENCH_BACKEND`` overrides);
    ``OPD_BENCH_DIST_TIMEOUT`` (seconds) bounds how long a rank waits for the others.
    A process group already initialised by the caller (e.g. an ``Accelerator``) is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = os.environ.get("OPD_BENCH_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = timedelta(seconds=_timeout_seconds())
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        global _exit_group
        _exit_group = dist.new_group(backend="gloo", timeout=EXIT_TIMEOUT)
        atexit.register(_destroy)  # we created it, so we tear it down (torch warns otherwise)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
