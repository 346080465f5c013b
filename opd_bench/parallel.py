"""Run a harness's cells side by side in worker processes (``opd-bench run --jobs N`` on a CPU).

A cell (a teacher, a (method, seed) training run, one benchmark of a final evaluation, the variance
experiment, a sample grid) writes its result to its own folder or file, and the harness skips
every cell whose result exists.
So the parallel phase only has to *fill* those results: each worker process builds its own
:class:`~opd_bench.harness.Harness` on the same folder and runs the cells it is handed, in an
order that respects what a cell needs (OPD needs every teacher; an evaluation needs its model).
The harness's ordinary one-process run then finds everything done and assembles ``results.json``.

Why processes rather than more threads: the tiny suite's matrices are small and its OCR engine
gains little from a second thread, so one process does not keep two cores busy. The standard run
took 31.9 min as 2 jobs x 1 thread against 41.0 in one process on 2 threads (docs/benchmarks.md,
"Cells side by side"). A cell's numbers depend on its torch thread count (the order of float
reductions), not on which process or in what order it ran.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

POLL_SECONDS = 10  # how often the bar re-reads the running cells' steps
MAX_AUTO_JOBS = 4  # each worker holds its own model and rewards (about 1.5 GB for the tiny suite)


@dataclass(frozen=True)
class Cell:
    kind: str  # "teacher", "train", "eval", "variance" or "samples"
    name: str  # the task (teacher), method (train) or model name (eval, samples: "base", "teacher/ocr", "opd", ...)
    seed: int | None = None
    needs: tuple[str, ...] = ()  # labels of the cells that must finish first
    adapter: Path | None = None  # eval, samples: the adapter folder of the model (None: the base)
    task: str | None = None  # eval: the one benchmark this cell scores

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.name}" + ("" if self.seed is None else f" seed {self.seed}")
                + ("" if self.task is None else f" on {self.task}"))

    @property
    def sort_key(self) -> tuple[str, str]:
        """Cells alike in length: a benchmark's evaluations, a method's runs, ..."""
        return self.kind, self.task or self.name


# Teachers gate the OPD runs, so they go first; evaluations and sample grids last, as they unblock
# nothing. The base's evaluations and grid (a minute in all) and the variance experiment go with the
# training runs: the bar estimates the time left only once every kind of cell has been timed
# (time_left), and the standard run's length stays the same (a replay of v12's cell times: 32.0 min).
_PRIORITY = {"teacher": 0, "train": 1, "variance": 1, "eval": 3, "samples": 4}


def _priority(cell: Cell) -> int:
    return 1 if cell.name == "base" else _PRIORITY[cell.kind]


def _mean_seconds(took: list[float] | None) -> float | None:
    return sum(took) / len(took) if took else None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(device: str) -> int:
    """Side-by-side cells by default: every core on the CPU (at most 4); one process on a GPU or
    under torchrun / accelerate, where the processes already share every cell."""
    from opd_bench import distributed

    if distributed.current().distributed or not str(device).startswith("cpu"):
        return 1
    return min(available_cores(), MAX_AUTO_JOBS)


def plan_cells(harness) -> list[Cell]:
    """Every cell of ``harness.run()`` whose result does not exist yet, with what each needs."""
    return _unfinished(harness, every_cell(harness))


def every_cell(harness) -> list[Cell]:
    """Every cell of ``harness.run()``, finished or not, with what each needs."""
    teachers = harness.teacher_dirs()
    cells = [Cell("teacher", task) for task in teachers]
    every_teacher = tuple(cell.label for cell in cells)
    trained = harness.finished_cells()
    planned = {method: dict(per_seed) for method, per_seed in trained.items()}
    for method in harness.methods:
        for seed in harness.seeds:
            cells.append(Cell("train", method, seed, every_teacher if method.startswith("opd") else ()))
            planned.setdefault(method, {})[seed] = harness.final_adapter(method, seed)
    methods, _, models = harness.models_to_evaluate(planned, teachers)
    for name, per_seed in models.items():
        for seed, adapter in per_seed.items():
            if name == "base":
                needs = ()
            elif name.startswith("teacher/"):
                needs = (Cell("teacher", name.split("/", 1)[1]).label,)
            else:
                needs = (Cell("train", name, seed).label,)
            # one cell per benchmark: the run's last cells are then short, so no core waits long
            # at the end for the other's one whole-model evaluation
            cells.extend(Cell("eval", name, seed, needs, adapter, task) for task in harness.suite.tasks)
            if seed == min(per_seed):  # the grid shows each model's first seed, as results.json does
                cells.append(Cell("samples", name, seed, needs, adapter))
    if any(method.startswith("opd") for method in methods):
        cells.append(Cell("variance", "opd", needs=every_teacher))
    return cells


def _unfinished(harness, cells: list[Cell]) -> list[Cell]:
    teachers = harness.teacher_dirs()
    # a need that is done, or not in the plan at all (a cell an earlier run finished), is met
    todo = {cell.label for cell in cells if not _finished(harness, cell, teachers)}
    return [replace(c, needs=tuple(n for n in c.needs if n in todo)) for c in cells if c.label in todo]


def longest_first(ready: list[Cell], seconds: dict[tuple[str, str], list[float]]) -> list[Cell]:
    """``ready`` by priority, and within one the cells expected to take longest first (from what
    cells alike took so far; one of a kind not yet timed before all), else in the plan's order:
    the short cells are left to fill the end of the run, where a core would otherwise wait."""
    def expected(cell: Cell) -> float:
        mean = _mean_seconds(seconds.get(cell.sort_key))
        return math.inf if mean is None else mean

    return sorted(ready, key=lambda c: (_priority(c), -expected(c)))


def time_left(pending: list[Cell], running: dict[Cell, float], seconds: dict[tuple[str, str], list[float]],
              jobs: int) -> float | None:
    """Seconds the unfinished cells should still take on ``jobs`` processes: each cell is expected to
    take what cells alike took so far (else cells of its kind), a running one less the seconds it has
    run (``running``: cell -> seconds so far). None while a kind of cell among them is untimed: a
    guess from the count of cells misleads, as a teacher takes minutes and a sample grid a second."""
    of_kind: dict[str, list[float]] = {}
    for (kind, _), took in seconds.items():
        of_kind.setdefault(kind, []).extend(took)
    left = [0.0]
    for cell, ran in [(cell, 0.0) for cell in pending] + list(running.items()):
        mean = _mean_seconds(seconds.get(cell.sort_key) or of_kind.get(cell.kind))
        if mean is None:
            return None
        left.append(max(mean - ran, 0.0))
    return max(sum(left) / jobs, max(left))


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return "<1 min left, " if seconds < 60 else f"~{round(seconds / 60)} min left, "


def _finished(harness, cell: Cell, teachers: dict[str, Path]) -> bool:
    from opd_bench.trainers.teachers import finished_teacher

    if cell.kind == "teacher":
        return finished_teacher(teachers[cell.name]) is not None
    if cell.kind == "train":
        return harness.trained(cell.name, cell.seed)
    if cell.kind == "eval":
        return harness.evaluation_finished(cell.name, cell.seed, cell.adapter, cell.task)
    if cell.kind == "samples":
        return harness.samples_path(cell.name, cell.seed, cell.adapter).exists()
    return harness.finished_variance(teachers) is not None


def run_cells(harness, jobs: int, threads: int, progress: bool = True) -> int:
    """Fill every unfinished cell of ``harness`` with ``jobs`` worker processes of ``threads``
    torch threads each; returns the number of cells run. Finished cells stay on disk if one fails."""
    from tqdm.auto import tqdm

    every = every_cell(harness)
    cells = _unfinished(harness, every)  # longest_first below puts the ready ones in order
    if not cells:
        return 0
    if len(cells) < len(every) and progress:
        print(f"resuming {harness.out}: {len(every) - len(cells)} of {len(every)} cells already finished", file=sys.stderr)
    from opd_bench.suites import sd

    cores = available_cores()
    if jobs * threads > cores:  # measured: 2 jobs x 2 threads on 2 cores ran the smoke cells 7x slower
        fix = f"--threads {max(1, cores // jobs)}" if jobs <= cores else f"--jobs {cores} --threads 1"
        print(f"opd-bench: {jobs} jobs x {threads} threads exceed the {cores} cores; every cell will run "
              f"several times slower (use {fix})", file=sys.stderr)
    suite_config = sd.current_config() if harness.options["suite"] == "sd" else None
    context = get_context("spawn")  # fork would copy torch's thread pools into the children
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(cells)), mp_context=context,
                               initializer=_start_worker, initargs=(harness.options, threads, suite_config, os.getpid()))
    pending, running, done = list(cells), {}, set()
    seconds: dict[tuple[str, str], list[float]] = {}  # what cells alike took so far
    started: dict[Cell, float] = {}
    # no rate or ETA from tqdm: cells differ in length by 100x, so one from the count misleads
    # (v12's bar said 68 min left at 18 min, with 14 to go); time_left estimates from cells alike
    bar = tqdm(total=len(cells), desc=f"cells ({jobs} jobs x {threads} thread{'s' if threads > 1 else ''})", unit="cell",
               disable=not progress, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    try:
        while pending or running:
            for cell in longest_first([c for c in pending if all(n in done for n in c.needs)], seconds)[: jobs - len(running)]:
                running[pool.submit(_run_cell, cell)] = cell
                started[cell] = time.perf_counter()
                pending.remove(cell)
            if not running:
                raise RuntimeError(f"cells waiting on cells that never run: {[c.label for c in pending]}")
            # a teacher runs for minutes: between completions the bar shows each training cell's step
            now = time.perf_counter()
            left = time_left(pending, {c: now - started[c] for c in running.values()}, seconds, jobs)
            bar.set_postfix_str(_minutes(left) + ", ".join(_describe(harness, c) for c in running.values()), refresh=True)
            finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                took = _result(future, cell)
                seconds.setdefault(cell.sort_key, []).append(took)
                done.add(cell.label)
                bar.update()
                bar.write(f"{cell.label}: {took:.0f} s")
    except BaseException:
        _stop(pool)
        raise
    finally:
        bar.close()
    pool.shutdown()
    return len(cells)


def _describe(harness, cell: Cell) -> str:
    """The cell's label and, for a training cell, the step its newest metrics log has reached
    (a cascade logs each stage in its own folder first)."""
    if cell.kind == "teacher":
        folder = harness.teacher_dir(cell.name)
    elif cell.kind == "train":
        folder = harness.method_dir(cell.name, cell.seed)
    else:
        return cell.label
    try:  # the bar must never stop the run: a log replaced while it is read just shows no step
        logs = sorted(folder.rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        lines = logs[-1].read_text().splitlines() if logs else []
    except OSError:
        return cell.label
    for line in reversed(lines):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line being written, or not a step record
            continue
        stage = "" if logs[-1].parent == folder else f"{logs[-1].parent.name} "
        return f"{cell.label} ({stage}step {step})"
    return cell.label


class WorkerDiedError(RuntimeError):
    """A worker process ended without an answer: killed (out of memory, a signal), failed to start,
    or raised an error that could not be unpickled here."""


def _result(future: Future, cell: Cell) -> float:
    from tqdm.auto import tqdm

    try:
        return future.result()
    except BrokenProcessPool as error:  # Python's own message names neither the cell nor what to do
        # an error that could not be read back: the worker's traceback, as text between quote marks
        lines = [line.strip() for line in str(error.__cause__ or "").splitlines() if line.strip().strip("'\"")]
        sent = lines[-1] if lines else ""
        raise WorkerDiedError(
            f"{cell.label} failed in its worker and its error could not be sent back ({sent}); the cells that finished "
            "are kept: mend the cause and rerun the same command to resume" if sent else
            f"a worker process died while it ran {cell.label} (killed, e.g. out of memory, or it failed to start: "
            "its own error, if any, is above); the cells that finished are kept: rerun the same command to resume, "
            "with fewer --jobs if memory ran out") from error
    except Exception:  # the error itself is re-raised, so the CLI shows it as in a one-process run
        tqdm.write(f"opd-bench: {cell.label} failed (the error follows); the cells that finished are kept: "
                   "mend the cause and rerun the command to resume", file=sys.stderr)
        raise


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop at once: a training cell resumes from its last checkpoint, and every result is written
    atomically, so killing a worker mid-cell loses at most that cell's last few steps."""
    # the workers are listed before shutdown(), which clears the list: listed after it, none was
    # terminated, and each went on with its cell while the command waited for it at exit
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _die_with(parent: int) -> None:
    """Linux: the kernel sends this worker SIGTERM when the run's main process dies (kill -9, out of
    memory), so no orphan goes on writing into a folder that a rerun is about to resume."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when the main process's queue closes
        return
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _start_worker(options: dict, threads: int, suite_config: dict | None, parent: int) -> None:
    import signal

    # Ctrl-C reaches every process of the terminal's group: the main process alone handles it (and
    # stops the workers); a worker interrupted mid-import only printed tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    import torch

    torch.set_num_threads(threads)
    from opd_bench.harness import Harness
    from opd_bench.suites import sd

    if suite_config is not None:
        sd.configure(suite_config)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # the loading bars of several processes would only interleave with the run's own bar
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    _WORKER["harness"] = Harness(**options, progress=False, hold_folder=False)


def _run_cell(cell: Cell) -> float:
    from opd_bench.training import return_freed_memory

    harness = _WORKER["harness"]
    started = time.perf_counter()
    teachers = harness.teacher_dirs()
    if cell.kind == "teacher":
        harness.teacher(cell.name)
    elif cell.kind == "train":
        harness.train_method(cell.name, cell.seed, teachers)
    elif cell.kind == "eval":
        harness.evaluate_cell(cell.name, cell.adapter, cell.seed, cell.task)
    elif cell.kind == "samples":
        harness.samples({cell.name: (cell.seed, cell.adapter)})
    else:
        harness.variance(teachers)
    return_freed_memory()  # a worker runs many cells; glibc would keep their freed buffers
    return time.perf_counter() - started
