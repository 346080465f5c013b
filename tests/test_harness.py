"""The smoke comparison end to end: run, resume, result schema, report and submission."""

import json

import pytest
from click.testing import CliRunner

from opd_bench.cli import main
from opd_bench.leaderboard import rebuild, submit, validate

METHODS = ("base", "teacher/geneval", "teacher/ocr", "teacher/pref", "opd", "opd-ppo", "multi-reward", "cascade")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    return out


def test_smoke_run_writes_a_valid_result_file(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    validate(results)
    assert results["schema_version"] == 1 and results["suite"] == "tiny" and results["seeds"] == [0]
    for method in METHODS:
        for bench in ("geneval", "ocr", "pref", "pref_oracle"):
            cell = results["results"][method][bench]
            assert set(cell) == {"mean", "std", "per_seed"} and len(cell["per_seed"]) == 1
    assert results["variance"]["ratio_ppo_over_analytic"] > 0
    for method in ("opd", "opd-ppo", "multi-reward", "cascade"):
        curve = results["curves"][method]["0"]
        assert curve[0]["step"] == 0 and "eval/geneval" in curve[-1]
        assert results["compute"][method]["optimizer_steps"] == 2
    assert results["compute"]["opd"]["teacher_forwards"] > 0 and results["compute"]["multi-reward"]["teacher_forwards"] == 0
    for grid in results["samples"]["grids"].values():
        assert (smoke_run / grid).is_file()


def test_rerunning_skips_finished_work(smoke_run):
    marks = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("DONE")}
    evals = {p: p.stat().st_mtime_ns for p in (smoke_run / "evals").iterdir()}
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--seeds", "0", "--out", str(smoke_run), "--no-report"])
    assert result.exit_code == 0, result.output
    assert marks and all(p.stat().st_mtime_ns == t for p, t in marks.items())
    assert all(p.stat().st_mtime_ns == t for p, t in evals.items())


def test_a_run_folder_with_another_preset_is_refused(smoke_run):
    result = CliRunner().invoke(main, ["run", "--preset", "standard", "--out", str(smoke_run), "--no-report"])
    assert result.exit_code == 1 and "--force" in result.output


def test_report_and_submission_from_the_smoke_run(smoke_run, tmp_path):
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(smoke_run), "--out", str(report)])
    assert result.exit_code == 0, result.output
    html = (report / "index.html").read_text()
    assert "data:image/png;base64" in html and "opd-ppo" in html
    assert list(report.glob("*.png"))
    path = submit(smoke_run, "smoke-test", root=tmp_path / "board")
    readme, csv = rebuild(tmp_path / "board")
    assert path.is_file() and "smoke-test" in readme.read_text() and "smoke-test" in csv.read_text()


def test_paper_preset_follows_the_published_settings():
    from opd_bench.harness import plan

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
