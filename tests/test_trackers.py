"""`opd-bench run --log-to`: every training cell's metrics mirrored to TensorBoard or W&B."""

import hashlib
import json
import sys
import types

import pytest
from click.testing import CliRunner

from opd_bench import trackers
from opd_bench.cli import main
from opd_bench.training import MetricsLog


@pytest.fixture(autouse=True)
def _no_tracker_left_on(monkeypatch):
    monkeypatch.setattr(trackers, "_ACTIVE", {"names": (), "root": None})


def _write(run_dir, records, resume_step=None):
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step,
                     mirror=trackers.open_for(run_dir, {"lr": 1e-3}, resume_step=resume_step))
    for record in records:
        log.write(record)
    log.close()


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_numeric_metric_per_cell_and_a_resume_replaces_the_lost_steps(tmp_path):
    trackers.configure(["tensorboard"], tmp_path)
    cell = tmp_path / "methods" / "opd" / "seed0"
    _write(cell, [{"step": 0, "eval/ocr": 0.25, "images": 0}, {"step": 1, "loss": 2.0, "kl": 0.5, "mode": "analytic", "images": 8},
                  {"step": 2, "loss": 1.5, "kl": 0.4, "images": 16}, {"step": 2, "eval/ocr": 0.5, "images": 16},
                  {"step": 3, "loss": 1.25, "kl": 0.3, "images": 24}])
    assert _scalars(tmp_path / "tensorboard" / "methods" / "opd" / "seed0") == {
        "eval/ocr": [(0, 0.25), (2, 0.5)], "loss": [(1, 2.0), (2, 1.5), (3, 1.25)], "kl": [(1, 0.5), (2, 0.4), (3, 0.3)],
        "images": [(1, 8.0), (2, 16.0), (3, 24.0)],  # once a step: an evaluation line's counters repeat its step's
    }  # strings are not scalars
    # killed after its step-1 checkpoint: steps 2-3 are logged again by the resumed run, with other values
    _write(cell, [{"step": 2, "loss": 1.0, "kl": 0.2}, {"step": 3, "loss": 0.5, "kl": 0.1}], resume_step=1)
    shown = _scalars(tmp_path / "tensorboard" / "methods" / "opd" / "seed0")
    assert shown["loss"] == [(1, 2.0), (2, 1.0), (3, 0.5)] and shown["eval/ocr"] == [(0, 0.25)]  # step 2's was purged
    assert [r["loss"] for r in map(json.loads, (cell / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [2.0, 1.0, 0.5]
    # trained again from the start: only the new curve shows (the events live outside the cell folder)
    _write(cell, [{"step": 1, "loss": 9.0}])
    shown = _scalars(tmp_path / "tensorboard" / "methods" / "opd" / "seed0")
    assert {tag: points for tag, points in shown.items() if points} == {"loss": [(1, 9.0)]}


def test_wandb_gets_one_resumable_run_per_cell(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    trackers.configure(["wandb"], tmp_path / "run1")
    cell = tmp_path / "run1" / "teachers" / "pref-abc"
    _write(cell, [{"step": 1, "loss": 3.0, "reward/pref/mean": 2.5}])
    _write(cell, [{"step": 2, "loss": 2.0}], resume_step=1)
    (_, first), (_, again) = [c for c in calls if c[0] == "init"]
    assert first["project"] == "my-project" and first["group"] == "run1" and first["name"] == "teachers/pref-abc"
    assert first["resume"] == "allow" and first["config"] == {"lr": 1e-3} and again["id"] == first["id"]
    assert [c for c in calls if c[0] != "init"] == [
        ("log", {"loss": 3.0, "reward/pref/mean": 2.5}, 1), ("finish",), ("log", {"loss": 2.0}, 2), ("finish",)]
    # trained again from the start (--force, a deleted cell): a new W&B run, which W&B does not
    # truncate to its old last step; a resume then continues that new one
    _write(cell, [{"step": 1, "loss": 9.0}])
    _write(cell, [{"step": 2, "loss": 8.0}], resume_step=1)
    *_, (_, fresh), (_, resumed) = [c for c in calls if c[0] == "init"]
    assert fresh["id"] != first["id"] and resumed["id"] == fresh["id"]
    # a cell resumed from before the id was saved keeps the id it had then: a hash of its path
    (cell / trackers.WandbTracker.ID_FILE).unlink()
    _write(cell, [{"step": 2, "loss": 8.0}], resume_step=1)
    old_id = hashlib.sha1(f"{(tmp_path / 'run1').resolve()}/teachers/pref-abc".encode()).hexdigest()[:16]
    assert [c for c in calls if c[0] == "init"][-1][1]["id"] == old_id


def test_a_tracker_that_fails_to_start_closes_the_ones_started_and_every_one_is_closed(tmp_path, monkeypatch):
    closed = []

    class Started:
        def __init__(self, *args):
            pass

        def log(self, record):
            pass

        def close(self):
            closed.append("started")

    class Broken(Started):
        def __init__(self, *args):
            raise RuntimeError("no network")

        def close(self):
            closed.append("broken")
            raise RuntimeError("cannot close")

    monkeypatch.setattr(trackers.TRACKERS, "resolve", lambda name: {"a": Started, "b": Broken}[name])
    monkeypatch.setattr(trackers, "_ACTIVE", {"names": ("a", "b"), "root": tmp_path})
    with pytest.raises(RuntimeError, match="no network"):
        trackers.open_for(tmp_path / "cell", {}, None)
    assert closed == ["started"]
    both = trackers._Both([Broken.__new__(Broken), Started()])
    with pytest.raises(RuntimeError, match="cannot close"):
        both.close()
    assert closed == ["started", "broken", "started"]  # the one after the failing close was closed too


def test_no_tracker_unless_configured_and_only_for_cells_of_the_run(tmp_path):
    assert trackers.open_for(tmp_path / "methods" / "opd" / "seed0", {}, None) is None
    trackers.configure(["tensorboard"], tmp_path / "run")
    assert trackers.open_for(tmp_path / "elsewhere", {}, None) is None
    trackers.configure([], tmp_path / "run")
    assert trackers.open_for(tmp_path / "run" / "methods" / "opd" / "seed0", {}, None) is None


def test_a_misspelt_or_missing_tracker_stops_the_run_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "run"
    misspelt = CliRunner().invoke(main, ["run", "--preset", "smoke", "--log-to", "tensorbord", "--out", str(out)])
    assert misspelt.exit_code == 1 and "Did you mean 'tensorboard'?" in misspelt.output and not out.exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    missing = CliRunner().invoke(main, ["run", "--preset", "smoke", "--log-to", "wandb", "--out", str(out)])
    assert missing.exit_code == 1 and "pip install wandb" in missing.output and not out.exists()
    assert len(missing.output.strip().splitlines()) == 1


def test_worker_processes_of_a_parallel_run_log_to_the_same_trackers(tmp_path):
    from opd_bench.harness import Harness

    harness = Harness(tmp_path / "run", preset="smoke", seeds=[0], progress=False, log_to=["tensorboard"])
    assert harness.options["log_to"] == ["tensorboard"]  # what each worker builds its Harness with
    assert "log_to" not in harness.identity  # mirroring the logs changes no number
