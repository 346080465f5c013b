"""Never lose work (issue 12): a run SIGKILLed at random points resumes to the uninterrupted result.

Covers the harness's cells (teachers, a DiffusionOPD student, evaluations, variance experiment,
grids, results.json) and the trainers' checkpoint/resume on a test-only preset (tests/fault_run.py)
with one method (opd) and one seed. Three kills at seeded random write events (half just before a
file is written, half just after), then a rerun that must finish with a valid result file whose
scores, per-image scores, adapter weights, compute counters and curves equal an uninterrupted run's.
About 2 minutes on an idle 2-core CPU (five processes, each loading the models).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_bench.benchmarks import sha256_file
from opd_bench.result_schema import check_results

SCRIPT = Path(__file__).with_name("fault_run.py")


def run(out, kill_at=0, mode="before"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), str(kill_at), mode],
                          capture_output=True, text=True, env=env, timeout=600)


def comparable(results: dict, run_dir: Path) -> dict:
    """What must not depend on interruptions: everything but dates, timings and the command.

    Adapters are compared by their recorded folder hash (weights and config, written in the same
    order by every process) and by a fresh hash of their weights."""
    weights = {m: {s: (a["path"], a["sha256"], sha256_file(run_dir / a["path"] / "adapter_model.safetensors"))
                   for s, a in per_seed.items()}
               for m, per_seed in results["artifacts"].items()}
    compute = {m: {k: v for k, v in c.items() if k != "wall_seconds"} for m, c in results["compute"].items()}
    curves = {m: {s: [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows] for s, rows in per_seed.items()}
              for m, per_seed in results["curves"].items()}
    return {"results": results["results"], "per_image": results["per_image"], "weights": weights,
            "compute": compute, "curves": curves, "variance": results["variance"]["rows"], "seeds": results["seeds"]}


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    events = int(reference.stdout.split("events")[-1])
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())

    out = tmp_path / "killed"
    points = sorted(random.Random(12).sample(range(1, events - 5), 3))
    done = 0
    for i, point in enumerate(points):
        # a resumed process redoes at least the events the reference had left, so each kill happens
        killed = run(out, kill_at=point - done, mode=("before", "after")[i % 2])
        assert killed.returncode == -signal.SIGKILL, f"kill {i} at event {point} did not happen: {killed.stderr[-2000:]}"
        done = point
    final = run(out)
    assert final.returncode == 0, final.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    check_results(results)
    assert comparable(results, out) == comparable(expected, tmp_path / "reference")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_parallel_run_killed_with_sigkill_leaves_no_worker_behind_and_resumes(tmp_path):
    """After kill -9 of `opd-bench run --jobs 2` no worker goes on writing into the folder (the
    mechanism, PR_SET_PDEATHSIG, is the next test's), and the rerun finishes the run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "opd_bench", "run", "--preset", "smoke", "--out", str(out), "--no-report",
               "--jobs", "2", "--threads", "1"]
    run_main = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("teachers/*/metrics.jsonl")):  # the workers are training
        time.sleep(0.2)
    workers = _children(run_main.pid)
    assert len(workers) >= 2, "the run started no workers"
    run_main.kill()
    run_main.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
    assert not (out / "results.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_results(json.loads((out / "results.json").read_text()))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_stopping_the_pool_ends_its_workers_at_once():
    """What Ctrl-C does to a parallel run: each worker is terminated, not left to finish its cell
    (shutdown() forgets the workers, so they must be taken before it)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from opd_bench.parallel import _stop

    pool = ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn"))
    for _ in range(2):
        pool.submit(time.sleep, 120)  # a cell of two minutes
    workers = [process.pid for process in pool._processes.values()]
    time.sleep(1)
    _stop(pool)
    deadline = time.time() + 20  # the pool's own thread reaps them, so watch their pids
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert len(workers) == 2 and not any(_alive(pid) for pid in workers)


def test_a_worker_that_dies_is_named_with_its_cell_and_the_way_on():
    """A worker the kernel kills (out of memory) broke the pool with Python's own message, naming
    neither the cell nor what to do, and the CLI showed a traceback."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from opd_bench.cli import _USER_ERRORS
    from opd_bench.parallel import Cell, WorkerDiedError, _result

    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    future = pool.submit(os._exit, 9)  # ends the worker as abruptly as a kill does
    with pytest.raises(WorkerDiedError, match=r"^a worker process died while it ran train opd seed 2 \(killed.*fewer --jobs"):
        _result(future, Cell("train", "opd", 2))
    pool.shutdown()
    assert WorkerDiedError.__name__ in _USER_ERRORS  # one line from the CLI, no traceback


class _TwoArgumentError(Exception):
    def __init__(self, what, where):  # pickles as cls(*args) with one argument: cannot be read back
        super().__init__(f"{what} at {where}")


def _raise_an_error_that_cannot_travel():
    raise _TwoArgumentError("bad input", "step 3")


def test_a_cell_whose_error_cannot_be_sent_back_is_named_with_that_error():
    """Not a dead worker: the pool breaks as well when a cell's exception cannot be unpickled, and
    the out-of-memory advice would mislead; the line names the error class instead."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from opd_bench.parallel import Cell, WorkerDiedError, _result

    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    future = pool.submit(_raise_an_error_that_cannot_travel)
    with pytest.raises(WorkerDiedError, match=r"^train opd seed 2 failed in its worker and its error could not be sent back \(TypeError: _TwoArgumentError"):
        _result(future, Cell("train", "opd", 2))
    pool.shutdown()


PARENT = """
import multiprocessing, os, signal, time
from opd_bench import parallel

def child(parent):
    parallel._die_with(parent)
    time.sleep(120)

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(3)  # the worker has asked to die with this process
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_worker_dies_when_its_main_process_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr[-2000:]
    worker = int(parent.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker)  # without the request it would sleep on for two minutes
