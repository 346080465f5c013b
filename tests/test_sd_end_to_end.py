"""The ``sd`` suite (the real-model path) end to end through the same harness as ``tiny``.

Fully offline: a random tiny SD3 pipeline stands in for SD3.5-Medium, tiny random OWLv2 +
open_clip models for GenEval's detector and colour classifier, a tiny CLIPModel for PickScore,
and RapidOCR reads the OCR images. Prompt files are in the official formats (GenEval's metadata
JSON lines, Flow-GRPO's ``.txt`` files) and named in an ``sd.json`` as a user would write it.
The tiny pipeline is 64 px, so the configuration sets ``resolution`` (the suite's is 512 px).
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from opd_bench import suites
from opd_bench.cli import main
from opd_bench.harness import Harness
from opd_bench.result_schema import check_results
from opd_bench.report import build_report
from opd_bench.suites import sd
from tiny_real_models import build_colour_clip, build_owlv2, build_pickscore

METHODS = ("base", "teacher/geneval", "teacher/ocr", "teacher/pref", "opd", "opd-ppo", "multi-reward", "cascade")
BENCHMARKS = ("geneval", "ocr", "pref")

# GenEval's evaluation_metadata.jsonl format, one line per tag
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "tv", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a tv"},
    {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "blue"}, {"class": "clock", "count": 1, "color": "green"}],
     "prompt": "a photo of a blue cup and a green clock"},
]
# Flow-GRPO's dataset/ocr/{train,test}.txt and dataset/pickscore/{train,test}.txt: one prompt a line
OCR_TRAIN = ['A sign that says "OPEN"', 'A mug with "TEA" printed on it', 'A poster that reads "GO"', 'A shop sign "CAFE"']
OCR_TEST = ['A street sign that says "STOP"', 'A book cover with the title "SKY"']
PICK_TRAIN = ["a cat in a hat", "a red bicycle at dawn", "a castle on a hill", "a bowl of fruit on a table"]
PICK_TEST = ["a lighthouse in a storm", "a dog reading a newspaper"]


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def sd_config(tmp_path_factory):
    """Weights, prompt files and the sd.json naming them (prompt paths relative to the file)."""
    root = tmp_path_factory.mktemp("sd-suite")
    _, colour = build_colour_clip(root / "weights" / "colour-clip")
    pick_model, pick_processor = build_pickscore(root / "weights" / "pickscore")
    data = root / "data"
    data.mkdir()
    _lines(data / "evaluation_metadata.jsonl", [json.dumps(record) for record in GENEVAL])
    _lines(data / "ocr_train.txt", OCR_TRAIN)
    _lines(data / "ocr_test.txt", OCR_TEST)
    _lines(data / "pick_train.txt", PICK_TRAIN)
    _lines(data / "pick_test.txt", PICK_TEST)
    config = {
        "device": "cpu",
        "resolution": 64,  # the tiny pipeline's image side
        "geneval": {"test": "data/evaluation_metadata.jsonl", "train": "data/evaluation_metadata.jsonl",
                    "model_path": str(build_owlv2(root / "weights" / "owlv2")),
                    # an open_clip folder: loads in any process, no architecture to register
                    "clip_model_name": f"local-dir:{colour}", "clip_model_path": str(colour)},
        "ocr": {"test": "data/ocr_test.txt", "train": "data/ocr_train.txt"},
        "pref": {"test": "data/pick_test.txt", "train": "data/pick_train.txt",
                 "pickscore": {"model_path": str(pick_model), "processor_path": str(pick_processor)}},
    }
    path = root / "sd.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def sd_run(sd_config, tiny_dir, tmp_path_factory):
    """The smoke comparison on the sd suite; the sd configuration is restored afterwards."""
    saved = sd._CONFIG
    suites.configure("sd", sd_config)
    try:
        out = tmp_path_factory.mktemp("runs") / "sd-smoke"
        harness = Harness(out, suite="sd", model=str(tiny_dir), preset="smoke", seeds=[0], method="all",
                          device="cpu", progress=False)
        assert harness.policy.default_size() == (64, 64)  # the configuration's resolution reached the policy
        results = harness.run()
        yield out, results
    finally:
        sd._CONFIG = saved


def test_sd_smoke_run_writes_a_valid_result_file(sd_run):
    out, returned = sd_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    # the leaderboard's checks of the file (schema, suite version, prompt hashes, every benchmark, per-image
    # scores); a smoke run is never listed, so not validate()'s listing rules
    check_results(results)
    assert results["suite"] == "sd" and results["suite_version"] == sd.VERSION and results["seeds"] == [0]
    assert results["benchmarks"] == list(BENCHMARKS) and results["headline"] == ["geneval", "ocr"]
    assert results["config"]["eval"]["resolution"] == 64 and results["config"]["eval"]["num_steps"] == 40
    for method in METHODS:
        for bench in BENCHMARKS:
            cell = results["results"][method][bench]
            assert set(cell) == {"mean", "std", "per_seed", "seeds"} and cell["seeds"] == [0]
            assert math.isfinite(cell["mean"]), (method, bench, cell)
        assert 0 <= results["results"][method]["geneval"]["mean"] <= 1
        assert 0 <= results["results"][method]["ocr"]["mean"] <= 1
    assert set(results["per_tag"]["base"]["geneval"]) <= {record["tag"] for record in GENEVAL}
    assert results["variance"]["teacher_task"] == "pref" and results["variance"]["ratio_ppo_over_analytic"] > 0
    for method in ("opd", "opd-ppo", "multi-reward", "cascade"):
        curve = results["curves"][method]["0"]
        assert curve[0]["step"] == 0 and {"eval/geneval", "eval/ocr", "eval/pref"} <= set(curve[-1])
        assert results["compute"][method]["optimizer_steps"] == 2
    assert results["compute"]["opd"]["teacher_forwards"] > 0 and results["compute"]["multi-reward"]["teacher_forwards"] == 0
    assert set(results["samples"]["grids"]) == set(METHODS)
    for grid in results["samples"]["grids"].values():
        assert (out / grid).is_file()


def test_teachers_were_trained_for_every_task(sd_run):
    out, results = sd_run
    for task in BENCHMARKS:
        (folder,) = (out / "teachers").glob(f"{task}-*")
        assert (folder / "DONE").is_file() and (folder / "final").is_dir()
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]  # optimizer steps (the others are evaluations)
        assert [r["step"] for r in steps] == [1, 2] and results["compute"][f"teacher/{task}"]["optimizer_steps"] == 2
        assert all(math.isfinite(r[f"reward/{task}/mean"]) and math.isfinite(r["loss"]) for r in steps)
        if task == "pref":  # PickScore always has spread, so its teacher got a gradient
            assert all(r["grad/norm"] > 0 for r in steps)


def test_report_builds_from_the_sd_run(sd_run, tmp_path):
    out, _ = sd_run
    build_report(out, tmp_path / "report")
    html = (tmp_path / "report" / "index.html").read_text()
    assert "data:image/png;base64" in html and "opd-ppo" in html and "geneval" in html
    assert (tmp_path / "report" / "report.md").is_file() and list((tmp_path / "report").glob("*.png"))


def test_the_cli_with_suite_config_resumes_the_run(sd_run, sd_config, tiny_dir):
    """`opd-bench run --suite sd --suite-config FILE` reaches the same run: every cell is reused."""
    out, _ = sd_run
    marks = {p: p.stat().st_mtime_ns for p in out.rglob("DONE")}
    evals = {p: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    saved = sd._CONFIG
    try:
        args = ["run", "--suite", "sd", "--suite-config", str(sd_config), "--preset", "smoke", "--seeds", "0",
                "--model", str(tiny_dir), "--out", str(out), "--no-report"]
        result = CliRunner().invoke(main, args)
    finally:
        sd._CONFIG = saved
    assert result.exit_code == 0, result.output
    assert "results.json: nothing new since it was written; kept as it was" in result.output and "teacher/ocr" in result.output
    assert marks and all(p.stat().st_mtime_ns == t for p, t in marks.items())
    assert evals and all(p.stat().st_mtime_ns == t for p, t in evals.items())


def test_the_results_record_the_suite_settings_and_a_changed_config_is_refused(sd_run, sd_config, tiny_dir, tmp_path):
    """The prompt files (by content) and reward options decide the scores: a run resumed with others
    would keep its old scores under the new files' hashes, so it is refused, naming what changed."""
    out, results = sd_run
    before = (out / "results.json").read_bytes()
    settings = results["suite_settings"]
    assert settings["pref"]["test"] == results["prompt_hashes"]["pref"]["test"]
    assert settings["pref"]["pickscore"]["model_path"] and "device" not in settings["pref"]["pickscore"]
    config = json.loads(sd_config.read_text())
    other_prompts = tmp_path / "pick_test.txt"
    _lines(other_prompts, ["a snowy mountain"])
    changes = {"pref.test": {**config["pref"], "test": str(other_prompts)},
               "geneval.threshold": {**config["geneval"], "threshold": 0.1}}
    for name, section in changes.items():
        changed = tmp_path / "sd.json"
        # prompt paths are relative to the config file: the other file names the same ones absolutely
        absolute = {task: {**config[task], **{k: str(sd_config.parent / config[task][k]) for k in ("test", "train")}}
                    for task in BENCHMARKS}
        changed.write_text(json.dumps({**config, **absolute, name.split(".")[0]: section}))
        saved = sd._CONFIG
        try:
            result = CliRunner().invoke(main, ["run", "--suite", "sd", "--suite-config", str(changed), "--preset", "smoke",
                                               "--seeds", "0", "--model", str(tiny_dir), "--out", str(out), "--no-report"])
        finally:
            sd._CONFIG = saved
        assert result.exit_code == 1 and f"suite_settings.{name}" in result.output, result.output
        assert (out / "results.json").read_bytes() == before


def test_a_killed_sd_evaluation_keeps_its_finished_benchmark_when_another_section_changes(sd_config, tiny_dir, tmp_path, monkeypatch):
    """A finished benchmark of a killed `eval` depends on its own section of the config only: mending
    a typo in another section (the usual reason to rerun) does not throw it away."""
    from opd_bench import evaluate

    real = evaluate.evaluate_suite

    def killed_after_the_first(suite, source, *, tasks, on_benchmark, **options):
        real(suite, source, tasks=tasks[:1], on_benchmark=on_benchmark, **options)
        raise RuntimeError("killed")

    config = json.loads(sd_config.read_text())
    absolute = {task: {**config[task], **{k: str(sd_config.parent / config[task][k]) for k in ("test", "train")}} for task in BENCHMARKS}

    def evaluate_with(pref_section, ocr_section=None):
        path = tmp_path / "sd.json"
        path.write_text(json.dumps({**config, **absolute, "pref": pref_section, **({"ocr": ocr_section} if ocr_section else {})}))
        saved = sd._CONFIG
        try:
            return CliRunner().invoke(main, ["eval", "--suite", "sd", "--suite-config", str(path), "--model", str(tiny_dir),
                                             "--limit", "1", "--benchmarks", "ocr,pref", "--out", str(tmp_path / "eval")])
        finally:
            sd._CONFIG = saved

    monkeypatch.setattr(evaluate, "evaluate_suite", killed_after_the_first)
    assert evaluate_with(absolute["pref"]).exit_code == 1 and (tmp_path / "eval" / "parts" / "ocr.json").is_file()
    monkeypatch.setattr(evaluate, "evaluate_suite", real)
    other_ocr = {**absolute["ocr"], "pad": 8}
    refused = evaluate_with(absolute["pref"], other_ocr)  # the finished benchmark's own section changed
    assert refused.exit_code == 1 and "suite_settings.ocr.pad" in refused.output
    pref = {**absolute["pref"], "pickscore": {**absolute["pref"]["pickscore"], "batch_size": 4}}
    resumed = evaluate_with(pref)
    assert resumed.exit_code == 0 and "resuming: ocr already evaluated" in resumed.output, resumed.output
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["suite_settings"]["pref"]["pickscore"]["batch_size"] == 4


def test_missing_weights_stop_an_evaluation_or_run_before_its_first_image(sd_config, tiny_dir, tmp_path):
    """Every benchmark's weights are located up front: a missing extra score (HPSv2) of the last
    benchmark, or the first benchmark's detector, fails in one line before anything is drawn."""
    config = json.loads(sd_config.read_text())
    absolute = {task: {**config[task], **{k: str(sd_config.parent / config[task][k]) for k in ("test", "train")}} for task in BENCHMARKS}
    broken = {
        "HPS v2.1 weights not found": {**absolute, "pref": {**absolute["pref"], "hpsv2": {"model_path": str(tmp_path / "no-hps")}}},
        "OWLv2 detector weights not found": {**absolute, "geneval": {**absolute["geneval"], "model_path": str(tmp_path / "no-owl")}},
    }
    for problem, contents in broken.items():
        path = tmp_path / "sd.json"
        path.write_text(json.dumps({**config, **contents}))
        saved = sd._CONFIG
        try:
            evaluation = CliRunner().invoke(main, ["eval", "--suite", "sd", "--suite-config", str(path), "--model", str(tiny_dir),
                                                   "--limit", "1", "--out", str(tmp_path / "eval")])
            run = CliRunner().invoke(main, ["run", "--suite", "sd", "--suite-config", str(path), "--model", str(tiny_dir),
                                            "--preset", "smoke", "--no-report", "--out", str(tmp_path / "run")])
        finally:
            sd._CONFIG = saved
        for result in (evaluation, run):
            assert result.exit_code == 1 and problem in result.output and result.output.strip().count("\n") == 0, result.output
        assert not (tmp_path / "eval" / "parts").exists() and not (tmp_path / "run" / "teachers").exists()


def test_verify_names_a_reward_option_that_differs_from_the_runs(sd_run, sd_config):
    from opd_bench.verify import VerificationError, verify_run

    out, _ = sd_run
    saved = sd._CONFIG
    try:
        suites.configure("sd", sd_config)
        suites.configure("sd", sd_config, geneval={**sd.current_config()["geneval"], "threshold": 0.1})
        with pytest.raises(VerificationError, match=r"differs from the one the run used in what decides its scores "
                                                    r"\(geneval.threshold: absent saved, 0.1 now\)"):
            verify_run(out, prompts=1, models=["base"])
    finally:
        sd._CONFIG = saved
