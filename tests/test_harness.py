"""The smoke comparison end to end: run, resume, result schema, report, verification, submission,
partial reruns and what --force may delete."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opd_bench.cli import main
from opd_bench.harness import Harness
from opd_bench.leaderboard import submit
from opd_bench.result_schema import SubmissionError, check_results

METHODS = ("base", "teacher/geneval", "teacher/ocr", "teacher/pref", "opd", "opd-ppo", "multi-reward", "cascade")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    # cells side by side in two worker processes (what `run` does by default on a multi-core CPU)
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(out), "--no-report",
                                       "--jobs", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_smoke_run_writes_a_valid_result_file(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    check_results(results)
    assert results["schema_version"] == 3 and results["suite"] == "tiny" and results["seeds"] == [0]
    assert results["config"]["eval"]["seed"] == 0
    assert results["curve_evaluation"] == {"limit": 1, "images_per_prompt": 1}  # the smoke preset's train_eval_limit
    assert results["environment"]["jobs"] == 2 and results["environment"]["threads"] == 1
    assert (smoke_run / ".opd-bench-run").is_file()
    for method in METHODS:
        for bench in ("geneval", "ocr", "pref", "pref_oracle"):
            cell = results["results"][method][bench]
            assert set(cell) == {"mean", "std", "per_seed", "seeds"} and cell["seeds"] == [0]
            assert len(results["per_image"][method]["0"][bench]) == 2  # eval_limit 2, one image each
        if method != "base":
            assert (smoke_run / results["artifacts"][method]["0"]["path"] / "adapter_model.safetensors").is_file()
    assert results["variance"]["ratio_ppo_over_analytic"] > 0
    for method in ("opd", "opd-ppo", "multi-reward", "cascade"):
        curve = results["curves"][method]["0"]
        assert curve[0]["step"] == 0 and "eval/geneval" in curve[-1]
        assert results["compute"][method]["optimizer_steps"] == 2
    assert results["compute"]["opd"]["teacher_forwards"] > 0 and results["compute"]["multi-reward"]["teacher_forwards"] == 0
    for grid in results["samples"]["grids"].values():
        assert (smoke_run / grid).is_file()
    # named by seed and weights: a later run that adds a smaller seed, or trains a deleted cell again,
    # draws its own grid instead of showing another under its name
    from opd_bench.io import weights_sha256

    weights = weights_sha256(smoke_run / results["artifacts"]["opd"]["0"]["path"])
    assert results["samples"]["grids"]["opd"] == f"samples/opd-seed0-{weights[:8]}.png" and results["samples"]["seeds"]["opd"] == 0
    assert results["samples"]["grids"]["base"] == "samples/base-seed0.png"


def test_rerunning_skips_finished_work(smoke_run):
    marks = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("DONE")}
    evals = {p: p.stat().st_mtime_ns for p in (smoke_run / "evals").iterdir()}
    written = (smoke_run / "results.json").read_bytes()
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(smoke_run), "--no-report"])
    assert result.exit_code == 0, result.output
    assert marks and all(p.stat().st_mtime_ns == t for p, t in marks.items())
    assert all(p.stat().st_mtime_ns == t for p, t in evals.items())
    # nothing new: the file keeps the first command's wall time, date and environment (--jobs 2)
    assert (smoke_run / "results.json").read_bytes() == written
    assert "results.json: nothing new since it was written; kept as it was" in result.output


def test_cells_side_by_side_give_the_one_process_result(smoke_run, tmp_path):
    """--jobs changes where and in what order the cells run, not what they compute (at equal threads):
    the same per-image scores, adapters (weights and config, by their folder hash), variance and curves."""
    out = tmp_path / "one-process"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(out), "--no-report",
                                       "--jobs", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    parallel, single = (json.loads((folder / "results.json").read_text()) for folder in (smoke_run, out))
    assert single["environment"]["jobs"] == 1
    for key in ("results", "per_image", "artifacts"):
        assert single[key] == parallel[key], key
    assert single["variance"]["rows"] == parallel["variance"]["rows"]
    untimed = lambda curves: {m: {s: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]  # noqa: E731
                                  for s, rows in per_seed.items()} for m, per_seed in curves.items()}
    assert untimed(single["curves"]) == untimed(parallel["curves"])


def test_the_cell_plan_orders_what_each_cell_needs(smoke_run, tmp_path):
    from opd_bench.parallel import plan_cells

    assert plan_cells(_harness(smoke_run)) == []  # a finished run has nothing left to do
    cells = {c.label: c for c in plan_cells(_harness(tmp_path / "fresh", seeds=[0, 1]))}
    teachers = ("teacher geneval", "teacher ocr", "teacher pref")
    assert all(cells[t].needs == () for t in teachers)
    assert cells["train opd seed 1"].needs == teachers and cells["train cascade seed 1"].needs == ()
    assert cells["eval teacher/ocr seed 0 on ocr"].needs == ("teacher ocr",) and "eval teacher/ocr seed 1 on ocr" not in cells
    assert cells["eval multi-reward seed 1 on pref"].needs == ("train multi-reward seed 1",)
    assert cells["eval base seed 0 on geneval"].adapter is None and cells["variance opd"].needs == teachers
    # one evaluation cell per benchmark of every model; one sample grid per model, of its first seed
    assert cells["samples opd seed 0"].needs == ("train opd seed 0",) and "samples opd seed 1" not in cells
    models = 1 + 3 + 4 * 2
    assert len(cells) == 3 + 4 * 2 + 3 * models + (1 + 3 + 4) + 1
    # a partial rerun: a cell an earlier run trained but never evaluated is evaluated, needing nothing
    partial = _harness(tmp_path / "partial", method="opd")
    earlier = tmp_path / "partial" / "methods" / "cascade" / "seed5"
    (earlier / "stage1-ocr" / "final").mkdir(parents=True)
    (earlier / "stage1-ocr" / "DONE").write_text("{}")
    (earlier / "metrics.jsonl").write_text("")  # the cascade's combined curve, written after its last stage
    cells = {c.label: c for c in plan_cells(partial)}
    assert cells["eval cascade seed 5 on ocr"].needs == () and "train cascade seed 5" not in cells
    assert "eval cascade seed 0 on ocr" not in cells and cells["eval opd seed 0 on ocr"].needs == ("train opd seed 0",)


def test_the_bar_shows_the_step_each_running_training_cell_has_reached(tmp_path):
    from opd_bench.parallel import Cell, _describe

    harness = _harness(tmp_path / "run")
    teacher, cascade = Cell("teacher", "ocr"), Cell("train", "cascade", 1)
    assert _describe(harness, teacher) == "teacher ocr"  # not started yet
    harness.teacher_dir("ocr").mkdir(parents=True)
    (harness.teacher_dir("ocr") / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "eval/ocr": 0.1}\n{"ste')
    assert _describe(harness, teacher) == "teacher ocr (step 2)"  # a half-written last line is skipped
    stage = tmp_path / "run" / "methods" / "cascade" / "seed1" / "stage1-ocr"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text('{"step": 7}\n')
    assert _describe(harness, cascade) == "train cascade seed 1 (stage1-ocr step 7)"
    assert _describe(harness, Cell("eval", "base", 0, task="ocr")) == "eval base seed 0 on ocr"


def test_cells_run_side_by_side_by_default_only_on_a_cpu_in_one_process(monkeypatch):
    from opd_bench import distributed, parallel

    monkeypatch.setattr(parallel, "available_cores", lambda: 16)
    assert parallel.default_jobs("cpu") == parallel.MAX_AUTO_JOBS and parallel.default_jobs("cuda") == 1
    monkeypatch.setattr(distributed, "current", lambda: distributed.ProcessGroup(rank=0, world_size=2))
    assert parallel.default_jobs("cpu") == 1  # under torchrun the ranks already share each cell


def test_cells_side_by_side_are_refused_where_they_cannot_run(tmp_path, monkeypatch):
    from opd_bench import policy

    monkeypatch.setattr(policy, "check_device", lambda device: None)  # as if this machine had a GPU
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(tmp_path / "gpu"), "--device", "cuda",
                                       "--jobs", "2", "--no-report"])
    assert result.exit_code == 1 and "use --jobs 1" in result.output.splitlines()[-1]
    assert not list((tmp_path / "gpu").glob("teachers/*"))


def test_a_model_that_cannot_load_fails_before_any_cell(tmp_path):
    out, missing = tmp_path / "run", tmp_path / "no-such-model"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(out), "--model", str(missing),
                                       "--jobs", "2", "--threads", "1", "--no-report"])
    assert result.exit_code == 1 and "failed;" not in result.output  # no worker started
    assert result.output.strip().startswith("Error: model folder") and str(missing) in result.output
    assert not (out / "teachers").exists() and not (out / "results.json").exists()


def test_a_cell_failing_in_a_worker_ends_the_run_with_its_own_one_line_error(tmp_path):
    out = tmp_path / "run"
    teacher = Harness(out, preset="smoke", seeds=[0], progress=False).teacher_dir("geneval")
    (teacher / "checkpoint").mkdir(parents=True)  # an unfinished teacher whose config was damaged
    (teacher / "config.json").write_text("{damaged")
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(out), "--jobs", "2", "--threads", "1", "--no-report"])
    assert result.exit_code == 1
    assert "teacher geneval failed (the error follows); the cells that finished are kept" in result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "config.json is not valid JSON" in error and f"delete {teacher} and rerun" in error
    assert (out / "run.json").is_file() and not (out / "results.json").exists()


def test_a_run_folder_with_another_preset_is_refused(smoke_run):
    result = CliRunner().invoke(main, ["run", "--preset", "standard", "--out", str(smoke_run), "--no-report"])
    assert result.exit_code == 1 and "--force" in result.output
    assert 'preset: "smoke" saved, "standard" now' in result.output  # the message names what differs


def test_json_differences_name_the_first_keys_and_count_the_rest():
    from opd_bench.io import json_differences

    assert json_differences({"a": 1, "b": {"c": [2]}}, {"a": 1, "b": {"c": [3]}}) == "b.c: [2] saved, [3] now"
    assert json_differences({"x": 1}, {}) == "x: 1 saved, absent now"
    many = json_differences({k: 0 for k in "edcba"}, {k: 1 for k in "abcde"})
    assert many == "a: 0 saved, 1 now; b: 0 saved, 1 now; c: 0 saved, 1 now; and 2 more"
    long = json_differences({"h": "f" * 64}, {"h": "a" * 64})  # a hash is cut, visibly
    assert long == f'h: "{"f" * 56}... saved, "{"a" * 56}... now'


def test_report_from_the_smoke_run_and_its_submission_is_refused(smoke_run, tmp_path):
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(smoke_run), "--out", str(report)])
    assert result.exit_code == 0, result.output
    html = (report / "index.html").read_text()
    assert "data:image/png;base64" in html and "opd-ppo" in html
    assert list(report.glob("*.png"))
    # the findings the report opens with are printed too, one line per claim
    md = (report / "report.md").read_text()
    printed = result.output.splitlines()
    start = printed.index("findings:")
    assert len(printed[start + 1:start + 6]) == 5 and all(line in md for line in printed[start + 1:start + 6])
    # issue 12: a smoke run outranked the standard run; smoke scores are not results
    for unverified in (False, True):
        with pytest.raises(SubmissionError, match="preset is 'smoke'"):
            submit(smoke_run, "smoke-test", root=tmp_path / "board", unverified=unverified)
    assert not (tmp_path / "board").exists()


def test_the_real_smoke_run_verifies_and_a_consistent_edit_does_not(smoke_run, tmp_path):
    """Covers opd_bench.verify on a real run: every model (base, 3 teachers, 4 students) reloaded from
    the run folder, its 2 test prompts per benchmark regenerated with the recorded seed and sampler,
    re-scored by the suite's rewards (geneval detector, RapidOCR, pref and pref_oracle) and compared.
    The smoke run's evaluation has only 2 prompts per benchmark, so here the sample is all of them."""
    from opd_bench.verify import VerificationError, verify_run

    report = verify_run(smoke_run)
    assert report["ok"], report["mismatches"]
    assert report["images_checked"] == len(METHODS) * 4 * 2
    assert report["max_difference_within_tolerance"] < 1e-3

    # An edit that every consistency check accepts: per-image scores, per_seed, mean and std changed together.
    edited = tmp_path / "edited"
    shutil.copytree(smoke_run, edited)
    results = json.loads((edited / "results.json").read_text())
    original = copy.deepcopy(results)
    images = results["per_image"]["opd"]["0"]["pref_oracle"]
    images[:] = [min(1.0, v + 0.05) for v in images]
    cell = results["results"]["opd"]["pref_oracle"]
    cell["per_seed"] = [sum(images) / len(images)]
    cell["mean"] = cell["per_seed"][0]
    (edited / "results.json").write_text(json.dumps(results))
    check_results(results)
    report = verify_run(edited, models=["opd"])
    assert not report["ok"] and {(m["model"], m["benchmark"]) for m in report["mismatches"]} == {("opd", "pref_oracle")}
    result = CliRunner().invoke(main, ["verify", str(edited), "--model", "opd"])
    error = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and error.startswith("Error: ") and "does not verify: 2 of 8" in error

    # One image edited: a decision's flip is tolerated and said so; a continuous score has no flip to excuse.
    def edit_one_image(bench):
        results = copy.deepcopy(original)
        images = results["per_image"]["opd"]["0"][bench]
        images[0] = min(1.0, images[0] + 0.5) if bench == "pref_oracle" else images[0] + 0.5
        cell = results["results"]["opd"][bench]
        cell["per_seed"] = [sum(images) / len(images)]
        cell["mean"] = cell["per_seed"][0]
        (edited / "results.json").write_text(json.dumps(results))

    # (the smoke run's sample is 2 images per benchmark: too few to excuse even a decision's flip)
    for bench in ("pref", "pref_oracle"):
        edit_one_image(bench)
        report = verify_run(edited, models=["opd"])
        assert not report["ok"] and [m["benchmark"] for m in report["mismatches"]] == [bench]
    result = CliRunner().invoke(main, ["verify", str(edited), "--model", "opd"])
    assert result.exit_code == 1 and "one flipped detection or OCR decision per model, seed and benchmark among 8 images" in result.output

    # A retrained or swapped adapter no longer matches its recorded hash.
    (edited / "results.json").write_text(json.dumps(original))
    adapter = edited / original["artifacts"]["cascade"]["0"]["path"] / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last weight
    with pytest.raises(VerificationError, match="cascade seed 0 .* does not match its recorded sha256"):
        verify_run(edited)


def test_prompt_counts_that_do_not_split_over_the_processes_are_named_before_any_training(tmp_path):
    harness = _harness(tmp_path / "run")  # smoke: teachers 2 prompts a step, students 1 or 3
    harness._check_split(1)
    with pytest.raises(ValueError, match=r"^opd.prompts_per_task=1, opd-ppo.prompts_per_task=1, multi-reward.prompts_per_step=3, "
                                         r"cascade.grpo.prompts_per_step=3 cannot be split over 2 processes .* multiple of 2$"):
        harness._check_split(2)
    only = _harness(tmp_path / "opd", method="opd", overrides=['teacher.ocr.prompts_per_step=3'])
    with pytest.raises(ValueError, match=r"^teacher.ocr.prompts_per_step=3, opd.prompts_per_task=1 cannot"):
        only._check_split(2)


def test_verify_tolerates_only_what_a_flipped_decision_can_give():
    from opd_bench.verify import FLIP_SAMPLE, tolerated

    def miss(recorded, recomputed):
        return {"recorded": recorded, "recomputed": recomputed}

    assert tolerated("geneval", [miss(0.0, 1.0)], FLIP_SAMPLE) and tolerated("ocr", [miss(0.5, 0.25)], FLIP_SAMPLE)
    assert not tolerated("geneval", [miss(0.0, 0.37)], FLIP_SAMPLE)  # strict GenEval is 0 or 1: 0.37 is no flip
    assert not tolerated("geneval", [miss(0.0, 1.0)], FLIP_SAMPLE - 1)  # a small sample excuses nothing
    assert not tolerated("geneval", [miss(0.0, 1.0), miss(1.0, 0.0)], 64)  # one flip per model, seed and benchmark
    assert not tolerated("pref", [miss(2.9, 3.4)], 64)  # a continuous score has no decision to flip


def test_a_partial_rerun_adds_to_the_results(smoke_run, tmp_path):
    """Issue 12: `run --method opd --seeds 1` on a finished all-methods run kept opd alone."""
    out = tmp_path / "merged"
    shutil.copytree(smoke_run, out)
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--method", "opd", "--seeds", "1", "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    before = json.loads((smoke_run / "results.json").read_text())
    after = json.loads((out / "results.json").read_text())
    check_results(after)
    assert set(after["results"]) == set(METHODS) and after["seeds"] == [0, 1] and after["methods"] == list(METHODS[4:])
    assert after["results"]["opd"]["geneval"]["seeds"] == [0, 1]
    for method in METHODS:  # the earlier cells are unchanged, the new seed is added
        for bench, cell in before["results"][method].items():
            assert after["results"][method][bench]["per_seed"][0] == cell["per_seed"][0]
            if method != "opd":
                assert after["results"][method][bench] == cell
    assert set(after["per_image"]["opd"]) == {"0", "1"} and set(after["artifacts"]["opd"]) == {"0", "1"}
    # the seed-1 cell was scored with the run's one noise seed, and verify regenerates it with that seed
    assert json.loads((out / "evals" / "opd-seed1.json").read_text())["eval_seed"] == after["config"]["eval"]["seed"] == 0
    from opd_bench.verify import verify_run

    assert verify_run(out, models=["opd"])["ok"]


def test_a_bfloat16_run_is_its_own_experiment_and_verifies_in_bfloat16(smoke_run, tmp_path):
    from opd_bench.verify import verify_run

    out = tmp_path / "bf16"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--method", "multi-reward", "--out", str(out), "--no-report",
                                       "--jobs", "1", "--dtype", "bfloat16", "--gradient-checkpointing", "--max-batch", "3"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    check_results(results)
    assert results["config"]["model"] == {"dtype": "bfloat16", "drop_t5": False}
    assert results["environment"]["gradient_checkpointing"] is True and results["environment"]["max_batch"] == 3
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    # teachers trained in another precision are other teachers: none is shared with the float32 run
    float32_teachers = {p.name for p in (smoke_run / "teachers").iterdir()}
    assert float32_teachers and float32_teachers.isdisjoint(p.name for p in (out / "teachers").iterdir())
    assert verify_run(out)["ok"]
    # the images depend on the precision: regenerated in float32, the scores no longer match
    results["config"]["model"]["dtype"] = "float32"
    (out / "results.json").write_text(json.dumps(results))
    assert not verify_run(out, models=["teacher/pref"])["ok"]
    # a rerun in the CPU's default precision is another experiment, refused in one line
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--method", "multi-reward", "--out", str(out), "--no-report"])
    assert result.exit_code == 1 and 'dtype: "bfloat16" saved, "float32" now' in result.output


def test_standard_preset_penalises_every_grpo_run_with_kl():
    from opd_bench.presets import plan

    standard = plan("standard")
    # teachers and both GRPO students share Flow-GRPO's KL penalty (docs/benchmarks.md, K0-K1)
    assert standard.teacher.kl_beta == standard.multi_reward.kl_beta == standard.cascade.grpo.kl_beta == 0.04
    assert standard.teacher_overrides == {}


def test_paper_preset_follows_the_published_settings():
    from opd_bench.presets import plan

    paper = plan("paper")
    assert (paper.teacher.group_size, paper.teacher.num_steps, paper.teacher.noise_level) == (24, 10, 0.7)
    assert (paper.opd.lora_rank, paper.opd.lora_alpha, paper.opd.lr, paper.opd.ema) == (32, 64, 3e-4, 0.9)
    assert paper.opd.noise_level == 0.0 and paper.opd.train_fraction == 0.9
    assert paper.teacher.kl_beta == 0.04 and paper.teacher_overrides == {"pref": {"kl_beta": 0.01}}
    # matched student budgets: images per optimizer step and steps are equal for every method
    per_step = {
        "opd": 3 * paper.opd.prompts_per_task * paper.opd.images_per_prompt,
        "multi-reward": paper.multi_reward.prompts_per_step * paper.multi_reward.group_size,
        "cascade": paper.cascade.grpo.prompts_per_step * paper.cascade.grpo.group_size,
    }
    assert len(set(per_step.values())) == 1
    assert paper.opd.steps == paper.multi_reward.steps == sum(n for _, n in paper.cascade.stages)
    for processes in (1, 2, 4):  # data-parallel runs need whole groups per process
        assert paper.opd.prompts_per_task % processes == 0 and paper.multi_reward.prompts_per_step % processes == 0


# What --force may delete (issue 12: `--force` deleted a folder of someone else's files, `--out .`
# would have wiped the working directory). Constructing a Harness checks the folder; nothing trains.

def _harness(out, **options):
    from opd_bench.harness import Harness

    return Harness(out, **{"preset": "smoke", "seeds": [0], "progress": False, **options})


def test_a_folder_that_holds_no_run_is_never_written_or_deleted(tmp_path):
    keep = tmp_path / "d"
    keep.mkdir()
    (keep / "f").write_text("keep")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="holds no opd-bench run"):
            _harness(keep, force=force)
        assert [p.name for p in keep.iterdir()] == ["f"] and (keep / "f").read_text() == "keep"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(keep), "--force"])
    assert result.exit_code == 1 and str(keep) in result.output and "choose a new or empty folder" in result.output
    assert result.output.strip().count("\n") == 0 and (keep / "f").read_text() == "keep"


def test_force_deletes_a_run_folder_and_an_old_run_counts_as_one(tmp_path):
    run = tmp_path / "run"
    _harness(run)
    assert (run / ".opd-bench-run").is_file() and (run / "run.json").is_file()
    (run / "stale").write_text("x")
    _harness(run)  # without --force the run is resumed, nothing deleted
    assert (run / "stale").exists()
    forced = _harness(run, force=True)
    assert (run / "stale").exists() and forced.start_over  # deleted by run(), once the input is checked
    with pytest.raises(RuntimeError, match="call run\\(\\) first"):  # no work mixed into the run it will delete
        forced.teacher("ocr")
    forced._clear_folder()
    assert not (run / "stale").exists() and (run / ".opd-bench-run").is_file() and (run / "run.json").is_file()
    old = tmp_path / "old"  # a run made before the marker existed
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"schema_version": 1, "suite": "tiny", "results": {}}))
    _harness(old, force=True)._clear_folder()
    assert not (old / "results.json").exists() and (old / ".opd-bench-run").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not _harness(empty, force=True).start_over  # nothing to delete
    assert (empty / ".opd-bench-run").is_file() and (empty / "run.json").is_file()


def test_a_force_killed_while_it_deletes_leaves_a_run_that_other_settings_cannot_adopt(tmp_path, monkeypatch):
    import shutil as shutil_module

    run = tmp_path / "run"
    _harness(run)
    for name in ("methods", "evals"):
        (run / name).mkdir()
        (run / name / "work").write_text("x")
    identity = (run / "run.json").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shutil_module, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            _harness(run, force=True)._clear_folder()
    assert (run / ".opd-bench-run").is_file() and (run / "run.json").read_bytes() == identity
    with pytest.raises(FileExistsError, match="holds a run with another"):
        _harness(run, overrides=["opd.steps=1"])  # the leftover cells are not adopted under other settings
    _harness(run, force=True)._clear_folder()  # the next --force finishes the job
    assert sorted(p.name for p in run.iterdir()) == [".opd-bench-lock", ".opd-bench-run", "run.json"]


def test_force_deletes_nothing_until_the_rest_of_the_input_is_checked(tmp_path, monkeypatch):
    from opd_bench import policy

    monkeypatch.setattr(policy, "check_device", lambda device: None)  # as if this machine had a GPU
    run = tmp_path / "run"
    _harness(run)
    (run / "teachers").mkdir()
    (run / "teachers" / "trained").write_text("an hour of work")
    identity = (run / "run.json").read_bytes()
    for extra in (["--model", str(tmp_path / "typo")], ["--device", "cuda", "--jobs", "2"]):
        result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(run), "--force", "--no-report", *extra])
        assert result.exit_code == 1 and result.output.startswith("Error: ")
        assert (run / "teachers" / "trained").read_text() == "an hour of work" and (run / "run.json").read_bytes() == identity


def test_force_never_deletes_the_working_directory_or_its_parents(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _harness(run)  # a real run folder: only the cwd rule protects it
    inner = run / "sub"
    inner.mkdir()
    for cwd, out in ((run, "."), (run, str(run)), (inner, "..")):
        monkeypatch.chdir(cwd)
        with pytest.raises(FileExistsError, match="working directory or a folder above it"):
            _harness(out, force=True)
        assert (run / ".opd-bench-run").is_file() and inner.is_dir()


def test_every_final_evaluation_shares_one_noise_seed(tmp_path):
    """With the plan's eval_seed (0 by default) the same model scores the same whatever cell seed it
    is filed under: all models see the same starting noise. eval_seed=None restores schema 2's
    per-cell noise, under which the two evaluations differ."""
    from dataclasses import replace

    paired = _harness(tmp_path / "paired")
    first, second = paired.evaluate_cell("base", None, 0), paired.evaluate_cell("base", None, 1)
    assert first["eval_seed"] == second["eval_seed"] == 0 and first["per_image"] == second["per_image"]
    own = _harness(tmp_path / "own")
    own.plan = replace(own.plan, eval_seed=None)
    again = own.evaluate_cell("base", None, 1)
    assert again["eval_seed"] == 1 and again["per_image"] != second["per_image"]


def test_cascade_forgetting_probe_scores_stage_ends_on_the_runs_own_images(smoke_run, benchmark_script, monkeypatch, capsys, tmp_path):
    """The probe's stage evaluation is the run's final evaluation: the last stage's adapter, scored
    by it, gives the cascade's recorded per-image scores exactly, so stage ends pair image by image."""
    import torch

    probe = benchmark_script("probe_cascade_forgetting")
    monkeypatch.setattr(sys, "argv", ["probe", str(smoke_run)])
    probe.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    results = json.loads((smoke_run / "results.json").read_text())
    assert {(r["stage"], r["benchmark"]) for r in rows} == {("stage0-geneval", b) for b in results["benchmarks"]}
    assert rows[0]["benchmark"] == "geneval"  # the stage's own task first
    for row in rows:
        assert row["change"] == pytest.approx(row["at_cascade_end"] - row["at_stage_end"], abs=1e-4)
    torch.set_num_threads(1)  # the smoke run's cells ran on one thread
    from opd_bench import suites
    from opd_bench.policy import Policy

    last = sorted((smoke_run / "methods" / "cascade" / "seed0").glob("stage*-*/final"))[-1]
    record = probe.stage_evaluation(tmp_path / "last.json", Policy.from_pretrained(suites.resolve_model("tiny")), last, results, 0)
    recorded = results["per_image"]["cascade"]["0"]  # stored to 6 decimals
    assert {bench: [round(v, 6) for v in values] for bench, values in record["per_image"].items()} == recorded


def test_an_evaluation_joined_from_benchmark_cells_is_the_suite_evaluated_at_once(smoke_run):
    """A parallel run scores each benchmark of a model in a cell of its own; the joined record
    holds what evaluating every benchmark in one call gives, and the parts are cleared away."""
    from opd_bench.evaluate import SamplerSettings, evaluate_suite, policy_source

    harness = _harness(smoke_run)
    saved = json.loads((smoke_run / "evals" / "base-seed0.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the smoke run's cells ran on one thread each
    try:
        whole = evaluate_suite(harness.suite, policy_source(harness.policy, SamplerSettings.of_suite(harness.suite)),
                               seed=saved["eval_seed"], limit=harness.plan.eval_limit,
                               images_per_prompt=harness.plan.eval_images_per_prompt, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert saved["scores"] == whole["scores"] and list(saved["per_image"]) == list(whole["per_image"])
    from opd_bench.harness import _score

    assert saved["per_image"] == {k: [_score(v) for v in values] for k, values in whole["per_image"].items()}
    assert saved["per_tag"] == whole["per_tag"]
    assert not (smoke_run / "evals" / "parts").exists()


def test_ready_cells_go_longest_first_within_their_priority():
    """The end of a run is filled with short cells: a kind never timed goes first (to be timed),
    then cells by what cells alike took, never ahead of a higher priority."""
    from opd_bench.parallel import Cell, longest_first

    ocr, pref, geneval = (Cell("eval", "opd", 0, task=t) for t in ("ocr", "pref", "geneval"))
    train, grid = Cell("train", "opd", 1), Cell("samples", "opd", 0)
    seconds = {("eval", "ocr"): [35.0, 33.0], ("eval", "pref"): [12.0]}
    assert longest_first([grid, pref, ocr, geneval, train], seconds) == [train, geneval, ocr, pref, grid]
    assert longest_first([pref, ocr], {}) == [pref, ocr]  # nothing timed yet: the plan's order


def test_time_left_is_estimated_from_cells_alike():
    """The bar's estimate: each unfinished cell takes what cells alike took (else cells of its
    kind), a running one less what it has run, shared over the jobs; none while a kind is untimed."""
    from opd_bench.parallel import Cell, _minutes, time_left

    ocr0, ocr1, pref0, grid = (Cell("eval", "opd", 0, task="ocr"), Cell("eval", "opd", 1, task="ocr"),
                               Cell("eval", "opd", 0, task="pref"), Cell("samples", "opd", 0))
    seconds = {("eval", "ocr"): [40.0, 44.0], ("eval", "geneval"): [14.0]}
    # ocr0 pending: 42; ocr1 has run 30 of its 42: 12; pref untimed, so the eval kind's mean: 98 / 3
    assert time_left([ocr0, pref0], {ocr1: 30.0}, seconds, jobs=2) == pytest.approx((42 + 12 + 98 / 3) / 2)
    assert time_left([ocr0], {ocr1: 60.0}, seconds, jobs=2) == 42.0  # overdue: 0 left; one cell can't be shared
    assert time_left([ocr0, grid], {}, seconds, jobs=2) is None  # no sample grid timed yet
    assert time_left([], {}, {}, jobs=2) == 0.0
    assert [_minutes(left) for left in (None, 30.0, 150.0)] == ["", "<1 min left, ", "~2 min left, "]


def test_the_base_cells_and_the_variance_run_with_the_training_runs():
    """They time the evaluations, grids and variance experiment early, for the estimate of time
    left; the students' evaluations still come after every training run."""
    from opd_bench.parallel import Cell, longest_first

    base, student, train = Cell("eval", "base", 0, task="ocr"), Cell("eval", "opd", 0, task="ocr"), Cell("train", "opd", 1)
    variance = Cell("variance", "opd")
    timed = {("train", "opd"): [90.0], ("variance", "opd"): [80.0]}
    assert longest_first([student, variance, base, train], timed) == [base, train, variance, student]


def test_assembling_a_finished_run_loads_no_model(smoke_run, tmp_path):
    """The one-process pass after the cells only reads: no model, no rewards, the same results."""
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy)
    harness = _harness(copy)
    results = harness.run()
    assert harness._policy is None and not hasattr(harness, "_train_rewards")
    saved = json.loads((smoke_run / "results.json").read_text())
    assert results["per_image"] == saved["per_image"] and results["artifacts"] == saved["artifacts"]


def test_eval_and_sample_take_a_trained_adapter(smoke_run, tmp_path):
    """`opd-bench eval --adapter` scores a run's trained model as the run did (same prompts, noise and
    sampler: the recorded per-image scores), and says which adapter it scored; `sample` draws it."""
    results = json.loads((smoke_run / "results.json").read_text())
    adapter = smoke_run / results["artifacts"]["opd"]["0"]["path"]
    threads = torch.get_num_threads()
    torch.set_num_threads(results["environment"]["threads"])  # a cell's numbers depend on its thread count
    try:
        args = ["eval", "--model", "tiny", "--limit", "2", "--images-per-prompt", "1", "--benchmarks", "pref"]
        trained = CliRunner().invoke(main, args + ["--adapter", str(adapter), "--out", str(tmp_path / "opd")])
        base = CliRunner().invoke(main, args + ["--out", str(tmp_path / "base")])
        grid = CliRunner().invoke(main, ["sample", "--model", "tiny", "--prompt", "a red circle", "--images-per-prompt", "1",
                                         "--adapter", str(adapter), "--out", str(tmp_path / "grid.png")])
    finally:
        torch.set_num_threads(threads)
    assert trained.exit_code == 0 and base.exit_code == 0 and grid.exit_code == 0, trained.output + base.output + grid.output
    record = json.loads((tmp_path / "opd" / "results.json").read_text())
    # the record says which base the adapter was trained on (the run's), beside the one it was applied to
    assert record["adapter"] == {"path": str(adapter), "sha256": results["artifacts"]["opd"]["0"]["sha256"], "trained_on": "tiny"}
    assert record["per_image"]["pref"] == pytest.approx(results["per_image"]["opd"]["0"]["pref"], abs=1e-5)
    base_scores = json.loads((tmp_path / "base" / "results.json").read_text())["per_image"]["pref"]
    assert base_scores == pytest.approx(results["per_image"]["base"]["0"]["pref"], abs=1e-5)
    assert min(abs(a - b) for a, b in zip(base_scores, record["per_image"]["pref"])) > 1e-4  # the adapter was applied
    assert (tmp_path / "grid.png").is_file()
    refused = CliRunner().invoke(main, ["eval", "--model", "renderer", "--adapter", str(adapter), "--out", str(tmp_path / "r")])
    assert refused.exit_code != 0 and "--adapter applies to a model" in refused.output
    assert "note:" not in trained.output + grid.output  # the run trained on the model it is applied to
    # the same adapter in a run made on another base (of the same shape): applied, and said so
    other = tmp_path / "other-run"
    shutil.copytree(adapter, other / "methods" / "opd" / "seed0" / "final")
    (other / "run.json").write_text(json.dumps({"model": "/models/another-tiny"}))
    noted = CliRunner().invoke(main, ["sample", "--model", "tiny", "--prompt", "a red circle", "--images-per-prompt", "1",
                                      "--adapter", str(other / "methods" / "opd" / "seed0" / "final"),
                                      "--out", str(tmp_path / "other.png")])
    assert noted.exit_code == 0 and f"was trained on '/models/another-tiny' ({other.resolve() / 'run.json'}); it is applied to 'tiny'" in noted.output


def test_a_start_that_saved_no_work_does_not_bind_the_folder(tmp_path):
    out = tmp_path / "run"
    Harness(out, preset="smoke", seeds=[0], progress=False, model=str(tmp_path / "wrong-model"))  # fails once it loads
    retried = Harness(out, preset="smoke", seeds=[0], progress=False)  # the same folder, the right model
    assert json.loads((out / "run.json").read_text())["model"] == retried.model == "tiny"


def test_two_commands_never_work_in_one_run_folder(tmp_path):
    out = tmp_path / "run"
    Harness(out, preset="smoke", seeds=[0], progress=False)  # holds the folder while this process lives
    Harness(out, preset="smoke", seeds=[0], progress=False)  # harnesses of one process share it
    code = ("import sys; from pathlib import Path; from opd_bench.harness import hold_lock\n"
            "try:\n    hold_lock(Path(sys.argv[1]))\nexcept FileExistsError as error:\n    print(error)")
    other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert f"(pid {os.getpid()}) is working in {out}" in other.stdout


def test_a_corrupt_file_in_a_run_folder_is_named_with_the_fix(tmp_path):
    out = tmp_path / "run"
    Harness(out, preset="smoke", seeds=[0], progress=False)
    (out / "evals").mkdir()
    (out / "run.json").write_text("{not json")
    # not "delete it": without its run.json the folder's work would pass for any settings' work
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON .*restore it from a copy, or use another --out"):
        Harness(out, preset="smoke", seeds=[0], progress=False)
    (out / "run.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON \('utf-8' codec"):
        Harness(out, preset="smoke", seeds=[0], progress=False)
    (out / "run.json").unlink()
    with pytest.raises(FileExistsError, match=r"holds a run's work \(evals\) but no run.json, so what made it is unknown"):
        Harness(out, preset="smoke", seeds=[0], progress=False)
    (out / "evals").rmdir()
    (out / "teachers").mkdir()  # teachers are keyed by their settings: copied into a new run folder, they are reused
    Harness(out, preset="smoke", seeds=[0], progress=False)
    assert (out / "run.json").is_file()


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    from opd_bench.training import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    MetricsLog(path, resume_step=2).close()
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')  # not a torn end: a damaged file
    with pytest.raises(ValueError, match=f"metrics.jsonl line 2 is not valid JSON .*; delete {tmp_path} and rerun"):
        MetricsLog(path, resume_step=3)  # the fix: train that run again (a finished run's curve needs the file)


def test_a_checkpoint_set_aside_by_a_kill_between_two_renames_is_put_back(tmp_path):
    from opd_bench.training import recover_checkpoint

    def saved(folder, step):
        folder.mkdir()
        (folder / "training_state.pt").write_bytes(b"weights")
        (folder / "state.json").write_text(json.dumps({"step": step}))

    checkpoint = tmp_path / "checkpoint"
    saved(tmp_path / "checkpoint.old", 4)  # save_checkpoint moved the old one aside, the new one is complete
    saved(tmp_path / "checkpoint.tmp", 6)
    recover_checkpoint(checkpoint)
    assert json.loads((checkpoint / "state.json").read_text()) == {"step": 6}
    (tmp_path / "checkpoint.old").rename(tmp_path / "kept.old")
    shutil.rmtree(checkpoint)
    saved(tmp_path / "checkpoint.old", 4)
    (tmp_path / "checkpoint.tmp").mkdir()  # killed while the new one was written: no state.json yet
    recover_checkpoint(checkpoint)
    assert json.loads((checkpoint / "state.json").read_text()) == {"step": 4}
    recover_checkpoint(checkpoint)  # a checkpoint in place is left alone
    assert json.loads((checkpoint / "state.json").read_text()) == {"step": 4}


def test_a_metrics_log_rewritten_on_resume_is_kept_whole_if_the_rewrite_fails(tmp_path, monkeypatch):
    from opd_bench.training import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    path.write_text(lines)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == lines


def test_a_full_parameter_teacher_counts_as_finished(tmp_path):
    from opd_bench.trainers.teachers import finished_teacher

    (tmp_path / "final").mkdir()
    (tmp_path / "DONE").write_text(json.dumps({"steps": 2}))
    assert finished_teacher(tmp_path) is None  # no weights saved
    (tmp_path / "final" / "full_model.safetensors").write_bytes(b"weights")
    assert finished_teacher(tmp_path) == {"steps": 2}


def test_opd_records_its_teachers_relative_to_the_run_folder(tmp_path, monkeypatch):
    from opd_bench.trainers.opd import _teacher_record
    from opd_bench.training import _teachers_as_recorded_now, config_differences

    monkeypatch.chdir(tmp_path)
    typed = {"ocr": Path("runs/x/teachers/ocr-1/final")}
    absolute = {"ocr": tmp_path / "runs" / "x" / "teachers" / "ocr-1" / "final"}
    relative = _teacher_record(typed, Path("runs/x/methods/opd/seed0"))
    assert relative == {"ocr": "../../../teachers/ocr-1/final"}
    assert _teacher_record(absolute, tmp_path / "runs" / "x" / "methods" / "opd" / "seed0") == relative
    # a cell checkpointed before, with its teachers as typed, resumes; another teacher does not
    run_dir, now = Path("runs/x/methods/opd/seed0"), {"lr": 1.0, "teachers": relative}
    for typed_then in ("runs/x/teachers/ocr-1/final", str(absolute["ocr"])):
        saved = {"lr": 1.0, "teachers": {"ocr": typed_then}}
        assert config_differences(_teachers_as_recorded_now(saved, now, run_dir), now) is None
    other = {"lr": 1.0, "teachers": {"ocr": "runs/x/teachers/ocr-2/final"}}
    assert config_differences(_teachers_as_recorded_now(other, now, run_dir), now) is not None


def test_a_teachers_rerun_reports_the_seeds_its_cells_have_and_replaces_a_damaged_results_file(smoke_run, tmp_path):
    """`--method teachers` with the default seeds 0,1,2 trains no student: results.json listed seeds
    no cell has (the report's header, verify's sample key). A damaged results.json, rebuilt whole
    from the cells anyway, failed the rerun at its very end."""
    out = tmp_path / "copy"
    shutil.copytree(smoke_run, out)
    (out / "results.json").write_text("{torn")
    results = _harness(out, method="teachers", seeds=[0, 1, 2]).run()
    saved = json.loads((smoke_run / "results.json").read_text())
    assert results["seeds"] == saved["seeds"] == [0] and results["per_image"] == saved["per_image"]
    assert json.loads((out / "results.json").read_text())["seeds"] == [0]


def test_a_cascade_killed_before_its_combined_curve_runs_again_and_writes_it(smoke_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(smoke_run, out)
    curve = out / "methods" / "cascade" / "seed0" / "metrics.jsonl"
    written = curve.read_bytes()
    curve.unlink()
    harness = _harness(out)
    assert harness.trained("cascade", 0) and curve.read_bytes() == written  # from the stages' files
    curve.unlink()
    results = _harness(out, method="opd").run()  # a rerun of another method does not leave the cascade out
    saved = json.loads((smoke_run / "results.json").read_text())
    assert results["curves"]["cascade"] == saved["curves"]["cascade"]
    assert results["compute"]["cascade"] == saved["compute"]["cascade"]
    assert results["per_image"]["cascade"] == saved["per_image"]["cascade"]
    from opd_bench.io import CorruptFileError

    cell = out / "methods" / "cascade" / "seed0"
    curve.unlink()
    first_stage = sorted(cell.glob("stage0-*"))[0]
    (first_stage / "metrics.jsonl").write_text("{damaged\n")
    with pytest.raises(CorruptFileError, match=f"delete {cell} and rerun"):  # the whole cell: later stages grew from it
        _harness(out).trained("cascade", 0)
    (first_stage / "DONE").unlink()  # a stage unfinished: the cell resumes instead
    assert not _harness(out).trained("cascade", 0)


def test_an_adapter_trained_again_is_evaluated_and_drawn_again(smoke_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from opd_bench.io import weights_sha256
    from opd_bench.verify import adapter_sha256

    out = tmp_path / "copy"
    shutil.copytree(smoke_run, out)
    final = out / "methods" / "opd" / "seed0" / "final"
    record = json.loads((out / "evals" / "opd-seed0.json").read_text())
    assert record["weights_sha256"] == weights_sha256(final)
    others = {p: p.stat().st_mtime_ns for p in (out / "evals").iterdir() if p.name != "opd-seed0.json"}
    (final / "notes.txt").write_text("a file beside the weights changes nothing drawn")
    assert _harness(out).evaluation_finished("opd", 0, final)
    weights = load_file(final / "adapter_model.safetensors")  # as if the cell were deleted and trained again
    save_file({k: v * 2 for k, v in weights.items()}, final / "adapter_model.safetensors")
    harness = _harness(out)
    assert not harness.evaluation_finished("opd", 0, final)
    results = harness.run()
    again = json.loads((out / "evals" / "opd-seed0.json").read_text())
    assert again["weights_sha256"] == weights_sha256(final) != record["weights_sha256"]
    assert results["artifacts"]["opd"]["0"]["sha256"] == adapter_sha256(final)
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())  # the other models' scores are reused
    before = json.loads((smoke_run / "results.json").read_text())["samples"]["grids"]
    grids = results["samples"]["grids"]
    assert grids["opd"] != before["opd"] and (out / grids["opd"]).is_file() and grids["multi-reward"] == before["multi-reward"]
    del record["weights_sha256"]  # a record of an older version names no weights: trusted as before
    (out / "evals" / "opd-seed0.json").write_text(json.dumps(record))
    assert harness.evaluation_finished("opd", 0, final)
    variance = json.loads(harness.variance_path.read_text())
    teachers = harness.teacher_dirs()
    assert variance["weights_sha256"] == weights_sha256(teachers["pref"] / "final") and harness.finished_variance(teachers)
    harness.variance_path.write_text(json.dumps({**variance, "weights_sha256": "0" * 64}))  # another pref teacher's
    assert harness.finished_variance(teachers) is None


def test_an_evaluations_folder_and_a_runs_folder_are_told_apart(tmp_path):
    from opd_bench.harness import holds_run
    from opd_bench.result_schema import SubmissionError

    evaluated, run = tmp_path / "evaluated", tmp_path / "run"
    evaluated.mkdir()
    eval_record = {"suite": "tiny", "model": "tiny", "sampler": {}, "num_images": 2, "scores": {}}
    (evaluated / "results.json").write_text(json.dumps(eval_record))
    assert not holds_run(evaluated)  # so `run --out` refuses it instead of writing over it
    refused = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(evaluated), "--no-report"])
    assert refused.exit_code == 1 and "holds no opd-bench run" in refused.output
    with pytest.raises(SubmissionError, match="results.json of `opd-bench eval`"):
        check_results(eval_record)
    reported = CliRunner().invoke(main, ["report", str(evaluated)])  # not a schema problem: the other command's file
    assert reported.exit_code == 1 and "results.json of `opd-bench eval` (one model's scores), not of a run" in reported.output
    Harness(run, preset="smoke", seeds=[0], progress=False)
    assert holds_run(run)
    # another project's run.json (a common name) does not make a folder a run that --force may delete
    other = tmp_path / "other-project"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"task": "mine"}))
    (other / "notes.txt").write_text("a week of notes")
    assert not holds_run(other)
    refused = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(other), "--force", "--no-report"])
    assert refused.exit_code == 1 and (other / "notes.txt").read_text() == "a week of notes", refused.output
    for extra in ([], ["--force"]):  # an evaluation never writes into a run's folder
        result = CliRunner().invoke(main, ["eval", "--out", str(run), "--limit", "1", *extra])
        assert result.exit_code == 1 and "holds an opd-bench run" in result.output
    assert not (run / "results.json").exists()


def test_report_of_an_unfinished_run_names_the_command_that_finishes_it(tmp_path):
    run = tmp_path / "run"
    Harness(run, preset="smoke", seeds=[0], progress=False)
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 1 and f"opd-bench run --suite tiny --model tiny --preset smoke --out {run}" in result.output, result.output


def test_the_shipped_base_by_its_folder_shares_the_aliases_teachers(tmp_path):
    from opd_bench import suites

    by_alias, by_folder = _harness(tmp_path / "a"), _harness(tmp_path / "b", model=str(suites.MODELS["tiny"]))
    assert by_folder.model == "tiny" and by_folder.identity == by_alias.identity
    assert by_folder.teacher_base == by_alias.teacher_base


def test_a_configurable_suites_teachers_are_keyed_by_what_they_train_on(tmp_path):
    """An sd teacher trained on another train file or training reward (a copied teachers/ folder)
    was reused: the sd suite's version never changes. Where things are (weight paths, a reward
    server's url) and the test file are no part of it; the tiny suite's keys stay as they were."""
    from types import SimpleNamespace

    harness = _harness(tmp_path / "a")
    tiny = harness.teacher_dir("ocr")
    assert harness.teacher_suite("ocr") == harness.suite.version and tiny.name.startswith("ocr-")
    reward = ["remote", {"url": "http://host1:8700", "reward": "ocr", "options": {"engine": "rapidocr", "model_path": "/a"}}]
    harness.suite = SimpleNamespace(version=harness.suite.version,
                                    benchmark=lambda task: SimpleNamespace(reward_of=lambda split: tuple(reward)))
    harness.suite_settings = {"ocr": {"train": "sha-1", "test": "sha-t"}}
    first = harness.teacher_dir("ocr")
    harness.suite_settings["ocr"]["test"] = "sha-t2"  # another test file: the same teacher
    reward[1] = {**reward[1], "url": "http://host2:8700", "options": {"engine": "rapidocr", "model_path": "/b"}}  # moved
    assert harness.teacher_dir("ocr") == first != tiny and first.parent == tiny.parent
    harness.suite_settings["ocr"]["train"] = "sha-2"  # another train file
    assert harness.teacher_dir("ocr") != first
    harness.suite_settings["ocr"]["train"] = "sha-1"
    reward[1] = {**reward[1], "options": {"engine": "paddleocr", "model_path": "/b"}}  # another reward
    assert harness.teacher_dir("ocr") != first


def test_a_run_folder_from_before_a_later_setting_is_the_same_run(tmp_path):
    """run.json written before updates_per_rollout existed (the smoke preset's GRPO runs make one
    update per rollout): the folder is taken up again; with two updates it is another run."""
    run = tmp_path / "run"
    _harness(run)
    (run / "teachers").mkdir()
    (run / "teachers" / "trained").write_text("work")
    identity = json.loads((run / "run.json").read_text())
    for section in ("teacher", "multi_reward"):
        del identity["plan"][section]["updates_per_rollout"]
    del identity["plan"]["cascade"]["grpo"]["updates_per_rollout"]
    (run / "run.json").write_text(json.dumps(identity))
    _harness(run)
    with pytest.raises(FileExistsError, match="holds a run with another"):
        _harness(run, overrides=["multi-reward.updates_per_rollout=2", "multi-reward.checkpoint_every=2", "multi-reward.eval_every=2"])
