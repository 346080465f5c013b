import json
import re
from pathlib import Path

import pytest

from fake_results import ALL_METHODS, EVAL_IMAGES, EVAL_LIMIT, make_results, make_run
from opd_bench.report import SECTION_TITLES, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    from PIL import Image

    assert path.read_bytes().startswith(PNG_MAGIC), path
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    make_run(root / "run")
    return root / "run", build_report(root / "run", root / "out")


def test_full_report_writes_markdown_html_and_plots(full_report):
    run_dir, written = full_report
    md = written["report.md"].read_text()
    page = written["index.html"].read_text()
    for name in ("curves_geneval.png", "curves_ocr.png", "curves_pref_oracle.png", "gradient_variance.png",
                 "variance_ratio.png", "cascade_forgetting.png"):
        assert name in written, name
    for path in written.values():
        assert path.is_file() and path.parent == run_dir.parent / "out"
        if path.suffix == ".png":
            _check_png(path)
    for title in SECTION_TITLES.values():
        assert f"## {title}" in md
        assert f">{title}</h2>" in page
    assert "could not be built" not in md  # no section failed
    assert "wall time: 1.6 min (cpu, 1 job x 2 threads; the command that wrote this file" in md
    # the report keeps its numbers: a copy of the result file (not named results.json: that marks a run folder)
    assert written["run_results.json"].read_bytes() == (run_dir / "results.json").read_bytes()
    from opd_bench.report import _Report

    data_parallel = json.loads((run_dir / "results.json").read_text())
    data_parallel["environment"]["processes"] = 4
    assert _Report(run_dir, run_dir, data_parallel).time_line()[0].startswith("wall time: 1.6 min (cpu, 1 job x 2 threads, "
                                                                             "4 processes (data-parallel); ")
    # the curves say how many prompts they score, beside the final evaluation's
    assert f"The curves score 2 test prompts x 1 image per benchmark (the final evaluation: {EVAL_LIMIT} test prompts x {EVAL_IMAGES} images)" in md
    # The scores table lists every method, with the best of each column in bold and a starred student.
    results = json.loads((run_dir / "results.json").read_text())
    for method in ALL_METHODS:
        assert f"| {method} |" in md
        assert f"<td>{method}</td>" in page
    assert "| method | geneval | ocr | pref | pref_oracle | overall |" in md
    best = max(ALL_METHODS, key=lambda m: results["results"][m]["geneval"]["mean"])
    assert f"**{results['results'][best]['geneval']['mean']:.3f}" in md
    assert "★" in md and "<strong>" in page
    assert results["command"] in md and results["command"] in page
    assert "<details><summary>config" in page
    # what a reader needs beside the numbers: which runs are single models, what pref_oracle is, the grids' columns
    assert "seeds: 0, 1, 2 (of every student method; the base and each teacher are one model each)" in md
    assert "pref_oracle: tiny world: the hidden taste the preference model was trained on (evaluation only)" in md
    assert "one row per prompt, 4 images per row (columns: independent noise draws of noise seed 0); the student methods' grids show their training seed 0" in md


def test_html_is_self_contained(full_report):
    _, written = full_report
    page = written["index.html"].read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == 6 + len(ALL_METHODS)  # plots + one sample grid per method


def test_partial_results_with_only_opd_still_build(tmp_path):
    results = make_results(methods=["opd"], seeds=[0])
    for key in ("variance", "cascade_stages", "gradient_variance", "per_tag", "environment", "config"):
        results.pop(key)
    make_run(tmp_path / "run", results)
    written = build_report(tmp_path / "run", tmp_path / "out")
    md = written["report.md"].read_text()
    for title in SECTION_TITLES.values():
        assert f"## {title}" in md
    assert "could not be built" not in md
    assert "No variance experiment" in md and "No cascade RL curves" in md and "No gradient-variance" in md
    assert "curves_geneval.png" in written and "cascade_forgetting.png" not in written
    assert 'src="http' not in written["index.html"].read_text()


def test_minimal_and_odd_results_never_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "schema_version": 1,
        "results": {"opd": {"geneval": {"mean": None, "std": None, "per_seed": []}}},
        "curves": {"opd": {"0": [{"step": 0}, {"step": "x"}]}},
        "samples": {"prompts": ["p"], "grids": {"opd": "../../etc/passwd", "cascade": "samples/missing.png"}},
        "variance": None,
    }))
    written = build_report(run, tmp_path / "out")
    md = written["report.md"].read_text()
    assert "n/a" in md and "not inside the run directory" in md and "is missing" in md
    assert set(written) == {"report.md", "index.html", "run_results.json"}


def test_missing_results_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        build_report(tmp_path, tmp_path / "out")


def test_curve_reference_lines_are_on_the_curves_own_prompts():
    """The teacher's and the base's lines on the convergence plots come from the curves' evaluation
    (the teacher's last curve point, every run's step 0), not from the larger final evaluation."""
    from opd_bench.report import _reference_levels
    from opd_bench.results_view import ResultView

    results = make_results()
    view = ResultView(results)
    frame = view.curves_frame(sorted(results["curves"]))
    ends = [rows[-1]["eval/ocr"] for rows in results["curves"]["teacher/ocr"].values()]
    starts = [rows[0]["eval/ocr"] for per_seed in results["curves"].values() for rows in per_seed.values()]
    teacher, base = _reference_levels(frame, "ocr", "teacher/ocr")
    assert teacher == pytest.approx(sum(ends) / len(ends)) and base == pytest.approx(sum(starts) / len(starts))
    assert teacher != pytest.approx(view.mean("teacher/ocr", "ocr"))
    assert _reference_levels(frame, "ocr", None) == (None, base)
    assert _reference_levels(frame.iloc[:0], "ocr", "teacher/ocr") == (None, None)


# --------------------------------------------------------------------------------------------
# Findings: the paper's claims, computed from the result file


def _set_scores(results, method, bench, per_seed):
    n = len(per_seed)
    mean = sum(per_seed) / n
    std = (sum((v - mean) ** 2 for v in per_seed) / (n - 1)) ** 0.5 if n > 1 else 0.0
    results["results"][method][bench].update(mean=mean, std=std, per_seed=list(per_seed))


@pytest.mark.parametrize("version", [9, 3.0, True, None])
def test_a_result_file_of_a_schema_this_release_cannot_read_gets_no_report(tmp_path, version):
    results = make_results()
    results["schema_version"] = version
    make_run(tmp_path / "run", results)
    with pytest.raises(ValueError, match=rf"results.json: schema_version is {version!r}, this opd-bench reads versions \[1, 2, 3\]; .*upgrade"):
        build_report(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _findings(tmp_path, results):
    make_run(tmp_path / "run", results)
    written = build_report(tmp_path / "run", tmp_path / "out")
    md = written["report.md"].read_text()
    assert "could not be built" not in md
    section = md[md.index("## Findings"):md.index("## Final scores")]
    assert md.index("## Findings") < md.index("## Final scores")  # the answer comes before the plots
    assert "Findings</h2>" in written["index.html"].read_text()
    lines = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == 6
    return lines


def _claims_hold(results):
    """Mutate the fake results so that every claim holds."""
    seeds = len(results["seeds"])
    for bench, base, teacher in (("geneval", 0.2, 0.6), ("ocr", 0.2, 0.5), ("pref", 19.0, 21.0)):
        _set_scores(results, "base", bench, [base])
        _set_scores(results, f"teacher/{bench}", bench, [teacher])
        _set_scores(results, "opd", bench, [teacher - 0.1 * (teacher - base) + 0.001 * i for i in range(seeds)])
    for bench in results["headline"]:
        _set_scores(results, "opd", bench, [0.8 + 0.01 * i for i in range(seeds)])
        for rival in ("multi-reward", "cascade"):
            _set_scores(results, rival, bench, [0.4 + 0.01 * i for i in range(seeds)])
    first_stage_end = results["cascade_stages"][0]["end_step"]
    for method, rows_by_seed in results["curves"].items():
        for rows in rows_by_seed.values():
            for row in rows:
                for bench in results["headline"]:
                    row[f"eval/{bench}"] = 0.9 if method == "opd" else 0.3
                if method == "cascade":  # the first stage's task (pref) gains in its stage, then drops
                    row["eval/pref"] = (0.2 if row["step"] == 0 else 0.8) if row["step"] <= first_stage_end else 0.3
    results["variance"]["ratio_ppo_over_analytic"] = 40.0
    for row in results["variance"]["rows"]:
        row["ratio_ppo_over_analytic"] = 40.0
    return results


def test_findings_say_held_when_every_claim_holds(tmp_path):
    lines = _findings(tmp_path, _claims_hold(make_results()))
    for line in lines:
        assert ": held." in line, line
    teachers, kept, versus, cascade, variance, versus_base = lines
    assert "geneval: 0.600 (1 seed) vs base 0.200 (1 seed), gain +0.400" in teachers
    assert "pref: 21.000 (1 seed) vs base 19.000 (1 seed), gain +2.000 (clear = above 2 × the largest seed sd" in teachers
    assert "pref: 90% ± 0% of teacher/pref's gain +2.000" in kept and "geneval: 153% ± 3%" in kept
    assert "vs multi-reward 0.410 ± 0.010 (+0.400)" in versus
    assert "At equal forward passes: held" in versus and "vs cascade 0.300 ± 0.000 (+0.600)" in versus
    # the pref stage is judged on the score it trains on (the learned pref), and only a stage that gained can forget
    assert "pref (stage 0): +0.600 ± 0.000 in its stage, then -0.500 ± 0.000 from its stage end to the final" in cascade
    assert "geneval (stage 1): +0.000 ± 0.000 in its stage, then +0.000 ± 0.000 from its stage end to the final (3 seeds) (not testable: no clear gain" in cascade
    # the claims read off the training curves say how large their evaluation is
    assert ("the most every method with curves reached: opd at step 30, multi-reward at step 60, cascade at step 60; "
            "curves: 2 test prompts per benchmark;") in versus
    assert "(forgetting = a fall above 2 seed-sd after a clear gain; curves: 2 test prompts per benchmark)" in cascade
    assert "the teachers' own training, which OPD needs first, is not charged here" in versus
    assert "opd 0.810 ± 0.010 vs base 0.200 (+0.610); opd-ppo" in versus_base
    assert "Ratio PPO-style / analytic 40 at the reference setting; 8 of 8 settings >= 10" in variance


def test_the_forgetting_table_says_what_the_findings_say(tmp_path):
    """Per stage: its task before, at the end of and after the cascade, gain and forgetting with the
    seed sd, the same drop the findings line reads (not the peak anywhere on the curve)."""
    _findings(tmp_path, _claims_hold(make_results()))
    md = (tmp_path / "out" / "report.md").read_text()
    table = md[md.index("| stage | benchmark |"):md.index("## Samples")]
    first, *_, last = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert first.startswith("| 0: pref | pref |")  # the score the stage trains on
    # pref: 0.2 at the start, 0.8 at its stage end, 0.3 after: gains 0.6, forgets 0.5
    assert first.endswith("| 0.200 ± 0.000 | 0.800 ± 0.000 | 0.300 ± 0.000 | +0.600 ± 0.000 | +0.500 ± 0.000 |")
    assert last.endswith("| n/a (last stage) |")


def test_findings_say_did_not_hold(tmp_path):
    results = _claims_hold(make_results())
    _set_scores(results, "teacher/ocr", "ocr", [0.25])  # gain +0.05 < +0.15: OPD keeps 180% of a small gain
    _set_scores(results, "opd", "geneval", [0.4, 0.41, 0.39])  # OPD keeps only half of the geneval gain
    for bench in results["headline"]:
        _set_scores(results, "multi-reward", bench, [0.95, 0.96, 0.94])
    for rows in results["curves"]["multi-reward"].values():
        for row in rows:
            row["eval/geneval"] = row["eval/ocr"] = row["eval/pref_oracle"] = 0.99
    for rows in results["curves"]["cascade"].values():
        for row in rows:
            row["eval/pref"] = 0.2 if row["step"] == 0 else 0.5  # a gain in its stage, kept: no forgetting
    results["variance"]["ratio_ppo_over_analytic"] = 3.0
    for bench in results["headline"]:  # cascade below the base
        _set_scores(results, "cascade", bench, [0.1, 0.11, 0.09])
    teachers, kept, versus, cascade, variance, versus_base = _findings(tmp_path, results)
    assert teachers.startswith("Teachers gain on their own task: did not hold.") and "gain +0.050" in teachers
    assert kept.startswith("OPD keeps >= 85% of every teacher's gain: did not hold.")
    assert "geneval: 50% ± 2% of teacher/geneval's gain +0.400" in kept
    assert ": did not hold. " in versus and "At equal forward passes: did not hold" in versus
    assert cascade.startswith("Cascade RL forgets earlier stages: did not hold.") and "+0.300 ± 0.000 in its stage, then +0.000" in cascade
    assert versus_base.startswith("Student methods above the untrained base, overall (geneval, ocr, pref_oracle): did not hold.")
    assert "cascade 0.100 ± 0.010 vs base 0.200 (-0.100)" in versus_base
    assert variance.startswith("Analytic gradient variance >= 10x below the PPO-style estimator's: did not hold.")


def test_findings_say_not_testable(tmp_path):
    results = _claims_hold(make_results())
    _set_scores(results, "teacher/ocr", "ocr", [0.15])  # the OCR teacher got worse than the base
    for rows_by_seed in results["curves"].values():  # no forward-pass axis
        for rows in rows_by_seed.values():
            for row in rows:
                row.pop("student_forwards"), row.pop("teacher_forwards")
    results.pop("cascade_stages")
    for rows in results["curves"]["cascade"].values():
        for row in rows:
            row.pop("stage"), row.pop("stage_task")
    results.pop("variance")
    teachers, kept, versus, cascade, variance, _ = _findings(tmp_path, results)
    assert ": did not hold." in teachers  # a teacher that lost is a failed claim, not an untestable one
    assert "ocr: not testable (teacher did not gain)" in kept
    assert "At equal forward passes: not testable (no curves with forward-pass counts" in versus
    assert cascade == "Cascade RL forgets earlier stages: not testable. no per-stage cascade curves in the file."
    assert variance.endswith("not testable (no variance experiment in the file).")


def test_one_seed_of_cascade_curves_judges_no_forgetting(tmp_path):
    """With one seed the 2-seed-sd rule has no spread: the gain and the fall that three seeds call
    held would be judged on their sign alone."""
    results = _claims_hold(make_results())
    curves = results["curves"]["cascade"]
    results["curves"]["cascade"] = {seed: rows for seed, rows in list(curves.items())[:1]}
    cascade = _findings(tmp_path, results)[3]
    assert cascade.startswith("Cascade RL forgets earlier stages: not testable.")
    assert "then -0.500 from its stage end to the final (1 seed) (not testable: one seed measured" in cascade


def test_a_share_of_a_pref_gain_the_teacher_line_calls_unclear_is_not_tested(tmp_path):
    """The teacher line judges a pref gain against 2 seed sd; the share line must not then take a
    share of that same gain (it read "OPD keeps -10%" of a gain called not clear)."""
    results = _claims_hold(make_results())
    _set_scores(results, "teacher/pref", "pref", [19.2])  # +0.2 over the base
    _set_scores(results, "opd", "pref", [18.6, 19.0, 19.4])  # seed sd 0.4: +0.2 is not clear
    teachers, kept = _findings(tmp_path, results)[:2]
    assert "(clear = above 2 × the largest seed sd on pref, 0.800)" in teachers
    assert "pref: 0% ± 200% of teacher/pref's gain +0.200 (not testable: the gain is within 2 seed sd, 0.800)" in kept


def test_a_share_within_its_spread_of_the_target_is_not_resolved(tmp_path):
    """75% ± 15% of a clear pref gain is as close to 85% as the seeds can tell: not a miss."""
    results = _claims_hold(make_results())
    _set_scores(results, "opd", "pref", [20.2, 20.5, 20.8])  # 75% of +2.0, seed sd 0.3 = 15% of the gain
    kept = _findings(tmp_path, results)[1]
    assert kept.startswith("OPD keeps >= 85% of every teacher's gain: not resolved")
    assert "pref: 75% ± 15% of teacher/pref's gain +2.000 (within its spread of 85%)" in kept
    _set_scores(results, "opd", "pref", [20.0, 20.1, 20.2])  # 55% ± 5%: a miss
    assert "did not hold" in _findings(tmp_path / "again", results)[1]


def test_variance_without_a_reference_ratio_is_judged_by_its_worst_setting(tmp_path):
    results = _claims_hold(make_results())
    del results["variance"]["ratio_ppo_over_analytic"]
    results["variance"]["rows"][3]["ratio_ppo_over_analytic"] = 4.0  # one setting below 10x
    variance = _findings(tmp_path, results)[4]
    assert variance.startswith("Analytic gradient variance >= 10x below the PPO-style estimator's: did not hold.")
    assert "7 of 8 settings >= 10 (range 4 to 40)" in variance


def test_one_forgotten_stage_is_enough_for_cascade_forgetting(tmp_path):
    """The claim is that cascade RL forgets earlier stages: one stage that clearly forgets holds it,
    even where another stage kept what it learned."""
    results = _claims_hold(make_results())
    for rows in results["curves"]["cascade"].values():
        for row in rows:
            if row.get("stage", 0) >= 1 and "eval/geneval" in row:
                row["eval/geneval"] = 0.4  # stage 1 gains geneval (0.3 -> 0.4) and stage 2 keeps it
    cascade = _findings(tmp_path, results)[3]
    assert cascade.startswith("Cascade RL forgets earlier stages: held.")
    assert "pref (stage 0): +0.600 ± 0.000 in its stage, then -0.500" in cascade
    assert "geneval (stage 1): +0.100 ± 0.000 in its stage, then +0.000 ± 0.000 from its stage end" in cascade


def test_findings_with_single_seed_and_few_methods(tmp_path):
    results = make_results(methods=["base", "opd"], seeds=[0])
    lines = _findings(tmp_path, results)
    assert lines[0].startswith("Teachers gain on their own task: not testable.")
    assert lines[1] == "OPD keeps >= 85% of every teacher's gain: not testable. no teachers in the file."
    assert lines[5].startswith("Student methods above the untrained base, overall (geneval, ocr, pref_oracle): not testable.")
    assert "vs multi-reward: not testable (multi-reward: not in the file)" in lines[2]
    assert "not testable" in lines[3]
    cascade_only = _findings(tmp_path / "cascade", make_results(methods=["base", "cascade"], seeds=[0]))[2]
    assert ("vs multi-reward: not testable (OPD: not in the file; multi-reward: not in the file); "
            "vs cascade: not testable (OPD: not in the file)") in cascade_only


def test_a_teachers_gain_carries_its_paired_standard_error(tmp_path):
    """Scored on one evaluation noise seed, base and teacher images pair up: the gain's standard
    error comes from the per-image differences (here by hand). Not where the score is not the
    aggregate of its images (an edited file), nor where each cell had its own noise seed."""
    results = make_results()
    ours, base = results["per_image"]["teacher/pref"]["0"]["pref"], results["per_image"]["base"]["0"]["pref"]
    differences = [a - b for a, b in zip(ours, base)]
    mean = sum(differences) / len(differences)
    se = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1) / len(differences)) ** 0.5
    teachers = _findings(tmp_path / "paired", results)[0]
    assert f"gain {results['results']['teacher/pref']['pref']['mean'] - results['results']['base']['pref']['mean']:+.3f}" \
           f" (± {se:.3f} s.e. over the paired images)" in teachers
    assert teachers.count("s.e. over the paired images") == 3  # geneval's stratified over its tags
    # a score that is not the aggregate of its images gets none
    _set_scores(results, "teacher/ocr", "ocr", [results["results"]["teacher/ocr"]["ocr"]["mean"] + 0.01])
    assert _findings(tmp_path / "tagged", results)[0].count("s.e. over the paired images") == 2
    results["config"]["eval"]["seed"] = None
    assert "s.e." not in _findings(tmp_path / "own", results)[0]


def test_equal_forward_passes_charge_the_frozen_reference_of_a_kl_penalty(tmp_path):
    results = _claims_hold(make_results())
    last = max(row["step"] for row in results["curves"]["opd"]["0"])
    unpaid = _findings(tmp_path / "a", results)[2]
    # without reference forwards the GRPO rivals reach fewer passes (40 a step) than OPD (76): the budget is theirs
    assert f"within {last * 40:,} forward passes" in unpaid
    for method in ("multi-reward", "cascade"):  # the KL penalty's reference model: 40 more a step
        for rows in results["curves"][method].values():
            for row in rows:
                row["reference_forwards"] = row["step"] * 40
        results["compute"][method]["reference_forwards"] = results["compute"][method]["student_forwards"]
    charged = _findings(tmp_path / "b", results)[2]
    assert f"within {last * 76:,} forward passes" in charged  # now OPD's 76 a step is the smaller reach
    md = (tmp_path / "b" / "out" / "report.md").read_text()
    steps = results["compute"]["multi-reward"]["optimizer_steps"]
    assert re.search(rf"\| multi-reward \| {steps} \| {steps * 40:,} \| 0 \| {steps * 40:,} \| {steps * 80:,} \|", md)


def test_a_difference_inside_the_seed_spread_is_a_tie_not_a_win():
    from opd_bench.findings import TIE, _versus, verdict

    assert _versus(0.428, 0.004, "multi-reward", 0.427, 0.005) == (
        TIE, "0.428 ± 0.004 vs multi-reward 0.427 ± 0.005 (+0.001, within the seed sd)")
    assert _versus(0.427, 0.004, "multi-reward", 0.428, 0.005)[0] == TIE  # nor is a small deficit a loss
    assert _versus(0.45, 0.004, "cascade", 0.42, 0.005) == (True, "0.450 ± 0.004 vs cascade 0.420 ± 0.005 (+0.030)")
    assert _versus(0.40, 0.004, "cascade", 0.42, 0.005)[0] is False
    # one seed on both sides: the sign alone would decide, so it is not testable, however large
    assert _versus(0.45, None, "cascade", 0.42, None) == (None, "0.450 vs cascade 0.420 (+0.030, one seed: no spread to judge)")
    assert _versus(0.0001, None, "cascade", 0.0, None) == (TIE, "0.000 vs cascade 0.000 (+0.000, equal at this precision)")
    assert verdict([True, TIE]) == "not resolved (a difference within the seed spread or below the precision shown)"
    assert verdict([False, TIE]) == "did not hold" and verdict([True, True]) == "held" and verdict([True, None]) == "not testable"


def test_a_share_of_a_gain_inside_its_error_is_not_tested(tmp_path):
    """The OCR teacher's images differ from the base's by +-0.2 around +0.01: a gain of 0.01 with an
    s.e. near 0.2/sqrt(n) cannot be told from zero, so the share OPD keeps of it is not judged."""
    results = make_results()
    base = results["per_image"]["base"]["0"]["ocr"]
    teacher = [b + 0.01 + (0.2 if i % 2 else -0.2) for i, b in enumerate(base)]
    results["per_image"]["teacher/ocr"]["0"]["ocr"] = teacher
    _set_scores(results, "teacher/ocr", "ocr", [sum(teacher) / len(teacher)])
    kept = _findings(tmp_path, results)[1]
    ocr = next(part for part in kept.split("; ") if part.startswith("ocr:"))
    assert "not testable: the gain is within 2 s.e." in ocr
    assert "not testable: the gain" not in kept.replace(ocr, "")  # the other teachers' gains are clear


def test_every_claim_is_not_testable_on_a_result_file_without_results():
    from opd_bench.findings import CLAIMS, findings_lines
    from opd_bench.results_view import ResultView

    lines = findings_lines(ResultView({"results": "not a dict", "curves": [], "variance": None}))
    assert len(lines) == len(CLAIMS)
    assert all(": not testable" in line for line in lines), lines


def test_the_paired_standard_error_of_a_mean_over_tags_is_stratified():
    from opd_bench.results_view import stratified_paired_se

    model, base = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]
    # per tag: differences [1, 0] and [1, 0], variance 0.5 each; sqrt(0.5 / 2 + 0.5 / 2) / 2 tags
    assert stratified_paired_se(model, base, ["a", "a", "b", "b"]) == pytest.approx(0.5 ** 0.5 / 2)
    assert stratified_paired_se(model, base, [None] * 4) == pytest.approx((1 / 12) ** 0.5)  # the plain mean's
    assert stratified_paired_se(model, base, ["a", "a", "a", "b"]) is None  # a tag with one image has no variance


def test_a_geneval_gain_gets_its_tag_stratified_error_only_from_the_runs_own_prompts():
    import random

    from opd_bench.benchmarks import aggregate
    from opd_bench.results_view import ResultView, stratified_paired_se

    results = make_results()
    results["config"]["eval"].update(limit=12, images_per_prompt=1)  # two test prompts per GenEval tag, one image each
    tags = ResultView(results).image_strata("geneval", 12)
    assert sorted(tags.count(tag) for tag in set(tags)) == [2] * 6
    rng = random.Random(0)
    images = {m: [float(rng.random() < 0.5) for _ in tags] for m in ("teacher/geneval", "base")}
    for model, values in images.items():
        results["per_image"][model]["0"]["geneval"] = values
        _set_scores(results, model, "geneval", [aggregate("geneval", values, [{"tag": t} for t in tags])["score"]])
    se = ResultView(results).paired_se("teacher/geneval", "geneval")
    assert se == stratified_paired_se(images["teacher/geneval"], images["base"], tags) and se is not None
    results["prompt_hashes"]["geneval"]["test"] = "0" * 64  # other prompts: which image has which tag is unknown,
    plain = ResultView(results).paired_se("teacher/geneval", "geneval")  # so the plain mean's s.e., if it is the score
    mean = sum(images["teacher/geneval"]) / 12
    assert plain == (stratified_paired_se(images["teacher/geneval"], images["base"], [None] * 12)
                     if abs(mean - results["results"]["teacher/geneval"]["geneval"]["mean"]) < 1e-9 else None)


def test_the_report_of_another_run_is_not_overwritten(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from opd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    for folder in ("a/smoke", "b/smoke"):
        make_run(tmp_path / folder)
    first = CliRunner().invoke(main, ["report", "a/smoke"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["report", "a/smoke"])  # its own report: rewritten
    assert again.exit_code == 0, again.output
    other = CliRunner().invoke(main, ["report", "b/smoke"])  # the same default folder, reports/smoke
    assert other.exit_code == 1 and "holds the report of another run" in other.output
    assert (tmp_path / "reports" / "smoke" / ".source").read_text().strip() == str(tmp_path / "a" / "smoke")
    forced = CliRunner().invoke(main, ["report", "b/smoke", "--force"])
    assert forced.exit_code == 0 and (tmp_path / "reports" / "smoke" / ".source").read_text().strip() == str(tmp_path / "b" / "smoke")


def test_a_committed_report_without_its_source_file_is_told_apart_by_its_title_and_date(tmp_path, monkeypatch):
    """.source names a folder of the machine that built the report, so a clone's committed reports
    have none: their report.md says whose they are."""
    from click.testing import CliRunner

    from opd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    committed = make_run(tmp_path / "runs" / "standard")
    make_run(tmp_path / "mine" / "standard", {**committed, "date": "2026-12-08T09:00:00Z"})  # another run, same name
    assert CliRunner().invoke(main, ["report", "runs/standard"]).exit_code == 0
    (tmp_path / "reports" / "standard" / ".source").unlink()
    before = (tmp_path / "reports" / "standard" / "report.md").read_bytes()
    other = CliRunner().invoke(main, ["report", "mine/standard"])
    assert other.exit_code == 1 and "holds the report of another run (standard, as its report.md says" in other.output
    assert (tmp_path / "reports" / "standard" / "report.md").read_bytes() == before
    again = CliRunner().invoke(main, ["report", "runs/standard"])  # the run it was built from: rebuilt
    assert again.exit_code == 0, again.output
    assert CliRunner().invoke(main, ["report", "mine/standard", "--force"]).exit_code == 0


def test_a_report_never_lands_in_a_run_folder_or_on_other_files(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from opd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "smoke")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    for out, problem in (("mine", "holds files that are not a report"), ("runs/smoke", "is a run folder")):
        for force in ([], ["--force"]):
            refused = CliRunner().invoke(main, ["report", "runs/smoke", "--out", out, *force])
            assert refused.exit_code == 1 and problem in refused.output, refused.output
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"
    assert not (tmp_path / "runs" / "smoke" / "report.md").exists()
    empty = CliRunner().invoke(main, ["report", "runs/smoke", "--out", "fresh"])  # a new folder is fine
    assert empty.exit_code == 0 and (tmp_path / "fresh" / "report.md").is_file()


def test_a_report_killed_while_it_is_written_is_rebuilt_by_the_next_command(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from opd_bench import report
    from opd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "smoke")

    def killed(*args):
        raise KeyboardInterrupt  # after the plots, before report.md and index.html

    with monkeypatch.context() as patch:
        patch.setattr(report, "render_markdown", killed)
        with pytest.raises(KeyboardInterrupt):
            build_report(tmp_path / "runs" / "smoke", tmp_path / "reports" / "smoke")
    assert list((tmp_path / "reports" / "smoke").glob("*.png")) and not (tmp_path / "reports" / "smoke" / "report.md").exists()
    again = CliRunner().invoke(main, ["report", "runs/smoke"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "reports" / "smoke" / "report.md").is_file()


def _lines(results) -> list[str]:
    from opd_bench.findings import findings_lines
    from opd_bench.results_view import ResultView

    return findings_lines(ResultView(results))


def test_a_missing_teacher_leaves_the_share_claim_untested():
    """The claim is about every teacher: a file without the OCR teacher cannot show it held."""
    results = _claims_hold(make_results())
    del results["results"]["teacher/ocr"]
    teachers, kept = _lines(results)[:2]
    assert "ocr: not in the file" in teachers
    assert kept.startswith("OPD keeps >= 85% of every teacher's gain: not testable.")
    assert "ocr: not testable (teacher/ocr not in the file)" in kept


def test_a_student_without_a_finite_score_is_named_not_dropped():
    results = _claims_hold(make_results())
    results["results"]["opd"]["geneval"]["per_seed"][1] = float("nan")
    versus, versus_base = _lines(results)[2], _lines(results)[5]
    assert "opd: not testable (no finite per-seed overall score)" in versus_base
    assert not versus_base.split(".")[0].endswith("held")  # the others above the base do not make it 'held'
    assert "vs multi-reward: not testable (OPD: no finite overall score)" in versus


def test_one_seed_without_paired_images_judges_no_share():
    """No seed spread and no paired s.e.: the share's 85% would be decided by its value alone."""
    results = _claims_hold(make_results(seeds=[0]))
    results["config"]["eval"]["seed"] = None  # each cell on its own noise: the images do not pair
    for bench, base, teacher, student in (("geneval", 0.2, 0.201, 0.21), ("ocr", 0.2, 0.5, 0.5), ("pref", 19.0, 21.0, 21.0)):
        for method, value in (("base", base), (f"teacher/{bench}", teacher), ("opd", student)):
            _set_scores(results, method, bench, [value])
    kept = _lines(results)[1]
    assert kept.startswith("OPD keeps >= 85% of every teacher's gain: not testable.")
    assert "ocr: 100% of teacher/ocr's gain +0.300 (not testable: one seed and no paired images" in kept
    assert "pref: 100% of teacher/pref's gain +2.000 (not testable: no seed spread to call the gain clear by)" in kept


def test_a_gain_printed_as_the_target_meets_it():
    results = _claims_hold(make_results())
    _set_scores(results, "base", "geneval", [0.2])
    _set_scores(results, "teacher/geneval", "geneval", [0.35])  # 0.35 - 0.2 = 0.1499999... in floats
    assert "gain +0.150 (needs >= +0.15)" in _lines(results)[0] and _lines(results)[0].startswith(
        "Teachers gain on their own task: held.")


def test_unequal_student_updates_do_not_make_an_equal_updates_win():
    results = _claims_hold(make_results())
    results["compute"]["opd"]["optimizer_steps"] = 10 * results["compute"]["multi-reward"]["optimizer_steps"]
    versus = _lines(results)[2]
    assert versus.startswith("OPD above multi-reward and cascade RL, overall (geneval, ocr, pref_oracle) at equal "
                             "student updates (final results): not testable.")
    assert "(not testable: unequal student updates, 600 OPD updates, 60 multi-reward)" in versus


def test_equal_forward_passes_compare_the_rivals_that_have_curves():
    results = _claims_hold(make_results())
    del results["curves"]["multi-reward"]
    versus = _lines(results)[2]
    equal_forwards = versus[versus.index("At equal forward passes:"):]
    assert equal_forwards.startswith("At equal forward passes: not testable (")  # one rival untested
    assert "vs multi-reward: not testable (multi-reward: no curves with forward-pass counts in the file)" in equal_forwards
    assert "0.900 ± 0.000 vs cascade 0.300 ± 0.000 (+0.600)" in equal_forwards


def test_the_last_stage_is_the_cascades_last_even_when_its_benchmark_is_not_in_the_file():
    """A run without the last stage's benchmark (OCR here): the stage before it is still judged (the
    last row was taken for the last stage and dropped)."""
    from opd_bench.results_view import ResultView

    results = _claims_hold(make_results())
    results["benchmarks"] = [b for b in results["benchmarks"] if b != "ocr"]
    results["headline"] = [b for b in results["headline"] if b != "ocr"]
    for method in results["results"].values():
        method.pop("ocr", None)
    for rows_by_seed in results["curves"].values():
        for rows in rows_by_seed.values():
            for row in rows:
                row.pop("eval/ocr", None)
                if row.get("stage") == 1:
                    row["eval/geneval"] = 0.8  # stage 1 gains geneval...
                elif row.get("stage") == 2:
                    row["eval/geneval"] = 0.3  # ...and the OCR stage after it loses it
    view = ResultView(results)
    stages = view.stage_scores(view.curves_frame(["cascade"]))
    assert [(row["stage"], row["last"]) for row in stages] == [(0, False), (1, False)]
    cascade = _lines(results)[3]
    assert "geneval (stage 1): +0.500 ± 0.000 in its stage, then -0.500 ± 0.000 from its stage end" in cascade


def test_a_fall_below_the_precision_shown_is_no_forgetting():
    results = _claims_hold(make_results())
    first_stage_end = results["cascade_stages"][0]["end_step"]
    for rows in results["curves"]["cascade"].values():
        for row in rows:  # +0.0002 in the stage, then -0.0001: '+0.000', '-0.000' on the line
            row["eval/pref"] = (3.0 if row["step"] == 0 else 3.0002) if row["step"] <= first_stage_end else 3.0001
    cascade = _lines(results)[3]
    assert cascade.startswith("Cascade RL forgets earlier stages: not testable.")
    assert "pref (stage 0): +0.000 ± 0.000 in its stage" in cascade and "(not testable: no clear gain" in cascade


def test_the_committed_standard_report_says_what_its_result_file_says():
    """reports/standard/ is committed without its run folder; its copy of the result file lets the
    findings (what a reader takes away) be checked against the code that writes them."""
    folder = Path(__file__).resolve().parents[1] / "reports" / "standard"
    results = json.loads((folder / "run_results.json").read_text())
    md = (folder / "report.md").read_text()
    assert f"date: {results['date']}" in md and f"commit: {results['git_commit']}" in md
    lines = _lines(results)
    assert len(lines) == 6 and all(f"- {line}\n" in md for line in lines)


# --------------------------------------------------------------------------------------------
# What the report's captions, table and files claim


def _scores_markdown(results) -> str:
    """The final-scores section alone (no plots): the table and the paragraphs above it."""
    from opd_bench.report import _Report
    from opd_bench.report_doc import render_markdown

    report = _Report(Path("run"), Path("out"), results)
    report.scores()
    return render_markdown(report.doc)


def _row(md: str, method: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def _one_seed(results, method):
    """``method`` ran seed 0 only: its scores and curves are of that seed."""
    for cell in results["results"][method].values():
        cell.update(mean=cell["per_seed"][0], std=0.0, per_seed=cell["per_seed"][:1], seeds=cell["seeds"][:1])
    results["curves"][method] = {"0": results["curves"][method]["0"]}


def test_a_rebuild_removes_the_plots_and_grids_it_no_longer_makes(tmp_path):
    """A variance experiment or a method dropped since the last build leaves no stale PNG beside the
    report; files the report does not write stay."""
    rows = [{"batch": b, "noise_level": 0.7, "ratio_ppo_over_analytic": 10.0 * b} for b in (1, 2)]
    results = {"schema_version": 1, "variance": {"rows": rows},
               "samples": {"prompts": ["p"], "grids": {"opd": "samples/opd.png", "cascade": "samples/cascade.png"}}}
    make_run(tmp_path / "run", results)
    first = build_report(tmp_path / "run", tmp_path / "out")
    assert {"variance_ratio.png", "samples_opd.png", "samples_cascade.png"} <= set(first)
    (tmp_path / "out" / "mine.png").write_bytes(PNG_MAGIC)  # not a name the report writes
    (tmp_path / "out" / "curves_notes.txt").write_text("mine")
    del results["variance"], results["samples"]["grids"]["cascade"]
    make_run(tmp_path / "run", results)
    second = build_report(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["mine.png", "samples_opd.png"]
    assert "samples_opd.png" in second and (tmp_path / "out" / "curves_notes.txt").is_file()


@pytest.fixture(scope="module")
def uneven_curves():
    """The convergence section of a run whose curves are uneven: multi-reward ran one seed, cascade
    logged no geneval, opd's seed 1 no geneval, and opd-ppo's rows carry no forward counts.
    Returns (results, {benchmark: caption}, the section's paragraph)."""
    from opd_bench.report import _Report

    results = make_results()
    _one_seed(results, "multi-reward")
    for rows in results["curves"]["cascade"].values():
        for row in rows:
            row.pop("eval/geneval")
    for row in results["curves"]["opd"]["1"]:
        row.pop("eval/geneval")
    for rows in results["curves"]["opd-ppo"].values():
        for row in rows:
            row.pop("student_forwards"), row.pop("teacher_forwards")
    report = _Report(Path("run"), Path("out"), results)
    report.curves()
    captions = {b.file.removeprefix("curves_").removesuffix(".png"): b.text for b in report.doc.blocks if b.kind == "img"}
    paragraph = next(b.text for b in report.doc.blocks if b.kind == "p")
    return results, captions, paragraph


def test_curve_rows_without_forward_counts_are_left_off_the_forward_axis(uneven_curves):
    from opd_bench.results_view import ResultView

    results, captions, _ = uneven_curves
    frame = ResultView(results).curves_frame(["opd", "opd-ppo"])
    assert frame[frame["method"] == "opd-ppo"]["forwards"].isna().all()  # not 0: no place on the forwards axis
    assert (frame[frame["method"] == "opd"]["forwards"] > 0).any()
    for caption in captions.values():
        assert "opd-ppo has no forward counts: not on the forward-pass panel" in caption
        assert "opd has no forward" not in caption


def test_a_student_or_seed_without_curve_values_is_named(uneven_curves):
    _, captions, _ = uneven_curves
    assert captions["geneval"] == ("geneval: convergence (mean over seeds; band: ±1 sd over seeds; opd: 2 seeds; "
                                   "multi-reward: 1 seed, no band). No geneval values from cascade, opd seed 1. "
                                   "opd-ppo has no forward counts: not on the forward-pass panel")
    assert "No ocr values" not in captions["ocr"] and "opd: 2 seeds" not in captions["ocr"]


def test_methods_with_fewer_seeds_say_so_in_the_curves_and_the_table(uneven_curves):
    results, captions, paragraph = uneven_curves
    assert "Lines are the mean over seeds (band: ±1 sd over seeds; multi-reward: 1 seed, no band)." in paragraph
    assert "multi-reward: 1 seed, no band" in captions["ocr"]
    md = _scores_markdown(results)
    assert "A student method's cell over fewer seeds than the others' 3 says how many" in md
    geneval = results["results"]["multi-reward"]["geneval"]["mean"]
    assert _row(md, "multi-reward")[0].strip("*").startswith(f"{geneval:.3f} (1 seed)")  # no ± for one seed
    assert _row(md, "multi-reward")[-1].strip("*").removesuffix(" ★").endswith("(1 seed)") and "seed" not in "".join(_row(md, "opd"))
    assert "seed" not in "".join(_row(md, "base"))  # the base and the teachers are one model each, as the header says
    assert "says how many" not in _scores_markdown(make_results())


def test_best_and_star_are_judged_at_the_printed_precision():
    results = make_results()
    _set_scores(results, "opd", "geneval", [0.9004] * 3)  # both print 0.900: both the best
    _set_scores(results, "cascade", "geneval", [0.9001] * 3)
    md = _scores_markdown(results)
    assert _row(md, "opd")[0] == _row(md, "cascade")[0] == "**0.900 ± 0.000 ★**"


def test_the_overall_mean_and_its_spread_come_from_the_same_per_seed_scores():
    results = make_results()
    results["results"]["opd"]["ocr"]["mean"] = None  # the file's mean lost; its per-seed scores kept
    md = _scores_markdown(results)
    per_seed = [sum(results["results"]["opd"][b]["per_seed"][i] for b in results["headline"]) / 3 for i in range(3)]
    mean = sum(per_seed) / 3
    sd = (sum((v - mean) ** 2 for v in per_seed) / 2) ** 0.5
    assert _row(md, "opd")[-1].removesuffix(" ★").strip("*") == f"{mean:.3f} ± {sd:.3f}"
    assert _row(md, "opd")[1] == "n/a"  # no ± beside a missing mean


def test_file_names_are_bounded_and_distinct_and_ordinary_names_keep_theirs(tmp_path):
    from opd_bench.report_doc import safe_name

    long = "m" * 300
    results = {"schema_version": 1, "samples": {"prompts": ["p"], "grids": {
        long: "samples/a.png", "teacher/ocr": "samples/b.png", "teacher_ocr": "samples/c.png"}}}
    make_run(tmp_path / "run", results)
    written = build_report(tmp_path / "run", tmp_path / "out")  # a name past the file system's limit sank it
    assert len([name for name in written if name.startswith("samples_")]) == 3  # and two grids shared one file
    assert len(safe_name(long)) <= 100 and safe_name(long) != safe_name(long + "x")
    committed = Path(__file__).resolve().parents[1] / "reports" / "standard"
    methods = ALL_METHODS + ["teacher_ocr"]
    names = {m: f"samples_{safe_name(m, methods)}.png" for m in methods}
    assert names["teacher/ocr"] != names["teacher_ocr"] == "samples_teacher_ocr.png"  # the changed name gets the hash
    assert {names[m] for m in ALL_METHODS if m != "teacher/ocr"} <= {p.name for p in committed.glob("samples_*.png")}
    assert safe_name("teacher/ocr", ALL_METHODS) == "teacher_ocr"  # no clash: today's name


def test_captions_say_what_the_numbers_are(full_report):
    _, written = full_report
    md = written["report.md"].read_text()
    assert "a student method's is the mean over its seeds, no spread shown" in md  # the GenEval per-tag table
    assert "(mean over seeds; band: ±1 sd over seeds); shaded spans" in md  # the cascade plot: seaborn's sd band
    assert "Cascade RL: per-task score across stages (stage boundaries dashed; mean over seeds, band: ±1 sd over seeds)" in md
    assert "but not for the teachers' own training, which DiffusionOPD needs first (see Compute)" in md
