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
from pathlib import Path

from opd_bench.benchmarks import sha256_file
from opd_bench.leaderboard import check_results

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
