import copy
import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from fake_results import make_results, make_run
from opd_bench.presets import plan
from opd_bench.leaderboard import (
    MAX_FILE_BYTES, SubmissionError, check_name, configuration_id, preset_differences, rebuild, submit, validate,
)

LEGACY = Path(__file__).resolve().parents[1] / "leaderboard" / "submissions" / "tiny" / "tiny-standard-cpu.json"


def passes(run_dir, salt=""):
    """Stands in for opd_bench.verify.verify_run: fake runs have no adapters to re-evaluate (the real
    verification is tested on a real run in test_harness.py)."""
    return {"ok": True, "mismatches": [], "prompts_per_benchmark": 8, "images_checked": 1, "tolerance": {}, "salt": salt}


def fails(run_dir, salt=""):
    miss = {"model": "opd", "seed": 0, "benchmark": "ocr", "image": 3, "recorded": 0.9, "recomputed": 0.1}
    return {"ok": False, "mismatches": [miss, miss], "images_checked": 16}


def tree(root):
    """A listing of every file and folder under root with the hash of each file's content."""
    if not root.exists():
        return None
    return sorted(
        (p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in root.rglob("*")
    )


@pytest.fixture(scope="module")
def valid():
    return make_results(rng_seed=1)


@pytest.fixture()
def board(tmp_path, valid):
    """A leaderboard with one accepted submission, and a folder for further runs."""
    root = tmp_path / "leaderboard"
    make_run(tmp_path / "run-a", copy.deepcopy(valid))
    submit(tmp_path / "run-a", "first", root=root, verify=passes)
    rebuild(root)
    return root


def test_valid_submission_is_stored_and_ranked(tmp_path, board, valid):
    stored = json.loads((board / "submissions" / "tiny" / "first.json").read_text())
    assert stored["submission"]["name"] == "first" and stored["results"] == valid["results"]
    assert stored["submission"]["verified"]["images_checked"] == 1

    better = make_results(rng_seed=5, fixed={"opd": 0.99})
    make_run(tmp_path / "run-b", better)
    path = submit(tmp_path / "run-b", "second.v2", root=board, verify=passes)
    # each submission verifies on a sample of its own random salt (the unsalted one can be steered)
    salts = [json.loads(p.read_text())["submission"]["verified"]["salt"] for p in (board / "submissions" / "tiny").glob("*.json")
             if p.stem in ("first", "second.v2")]
    assert len(salts) == 2 and all(re.fullmatch("[0-9a-f]{16}", s) for s in salts) and salts[0] != salts[1]
    assert path == board / "submissions" / "tiny" / "second.v2.json"
    readme, table = rebuild(board)

    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2 * len(valid["results"])
    assert rows[0]["rank"] == "1" and rows[0]["submission"] == "second.v2" and rows[0]["method"] == "opd"
    assert rows[0]["overall"] == "0.9900" and rows[0]["geneval_mean"] == "0.9900"
    assert rows[0]["status"] == "verified" and rows[0]["preset"] == "standard"
    overall = [float(r["overall"]) for r in rows]
    assert overall == sorted(overall, reverse=True)
    students = [r for r in rows if r["kind"] == "student"]
    assert len(students) == 8 and all(r["rank"] for r in students)
    assert all(r["rank"] == "" for r in rows if r["kind"] == "reference")
    steps = plan("standard").opd.steps  # the fake run's cells train the preset's budget
    assert rows[0]["optimizer_steps"] == str(steps) and rows[0]["forward_passes"] == str(steps * 40 + steps * 36)

    text = readme.read_text()
    assert "opd-bench submit" in text and "opd-bench leaderboard" in text
    assert "## Suite `tiny`, preset `standard`" in text and "| 1 | second.v2 | opd | tiny | standard | 0.990 ± 0.000 |" in text
    assert "Unverified" not in text

    # a run in another precision says so beside its model (its results are another experiment)
    in_bf16 = make_results(rng_seed=2)
    in_bf16["config"]["model"] = {"dtype": "bfloat16", "drop_t5": False}
    make_run(tmp_path / "run-c", in_bf16)
    submit(tmp_path / "run-c", "third", root=board, verify=passes)
    rows = list(csv.DictReader(rebuild(board)[1].open()))
    assert {r["model"] for r in rows if r["submission"] == "third"} == {"tiny (bfloat16)"}
    assert {r["model"] for r in rows if r["submission"] != "third"} == {"tiny"}
    # a one-seed reference row shows its score alone (no spread), a three-seed student mean ± sd
    base_row = next(line for line in text.splitlines() if "| *base* |" in line)
    opd_row = next(line for line in text.splitlines() if "| 1 | second.v2 | opd |" in line)
    assert "±" not in base_row and "±" in opd_row
    # Deterministic: rebuilding again gives identical bytes.
    before = tree(board)
    rebuild(board)
    assert tree(board) == before


def test_entries_closer_than_their_seed_spread_share_a_rank():
    from opd_bench.leaderboard import _clearly_above, _overall_sd

    assert _overall_sd([[0.4, 0.5, 0.6], [0.2, 0.3, 0.4]]) == pytest.approx(0.1) and _overall_sd([[0.4], [0.2]]) is None
    opd, multi, cascade = ({"overall": v, "overall_std": sd} for v, sd in ((0.428, 0.002), (0.426, 0.005), (0.424, 0.0005)))
    assert not _clearly_above(opd, multi)  # +0.002 inside multi-reward's 0.005: one rank
    assert _clearly_above(opd, cascade) and not _clearly_above(multi, cascade)  # +0.004 > 0.002; +0.002 < 0.005
    assert _clearly_above({"overall": 0.5, "overall_std": None}, {"overall": 0.4999, "overall_std": None})  # no seeds: any gap
    from opd_bench.leaderboard import _rank

    rows = [{"status": "verified", "kind": "student", "suite": "tiny", "preset": "standard", "configuration": "c", "model": "tiny",
             "overall": v, "overall_std": sd} for v, sd in ((0.50, 0.001), (0.49, 0.001), (0.48, 0.05), (0.30, 0.001))]
    _rank(rows)  # the wide third entry is within its spread of the first, but never ranks above the second
    assert [r["rank"] for r in rows] == [1, 2, 2, 4]


def test_runs_of_a_preset_before_and_after_it_changed_are_ranked_apart(tmp_path, board):
    """The preset's recorded settings (less bookkeeping) make a configuration; each has its own
    table and ranks, the installed preset's first: a run made before the preset's learning rate
    changed is another experiment (stored when that was the preset; submit now refuses it)."""
    older = make_results(rng_seed=3, fixed={"opd": 0.99})
    older["config"]["opd"]["lr"] *= 3
    older["date"] = "2026-12-01T00:00:00Z"  # made later, with an older release: still not the top table
    make_run(tmp_path / "run-old", older)
    with pytest.raises(SubmissionError, match=r"not the installed standard preset's: opd.lr .* \(now "):
        submit(tmp_path / "run-old", "old-preset", root=board, verify=passes)
    older["submission"] = {"name": "old-preset", "submitted": older["date"], "verified": {"images_checked": 1}}
    (board / "submissions" / "tiny" / "old-preset.json").write_text(json.dumps(older))
    logged = make_results(rng_seed=4)  # only what is logged differs: the same experiment
    logged["config"]["opd"]["monitor_rewards"] = not logged["config"]["opd"]["monitor_rewards"]
    make_run(tmp_path / "run-logged", logged)
    submit(tmp_path / "run-logged", "logged", root=board, verify=passes)
    readme, table = rebuild(board)
    rows = list(csv.DictReader(table.open()))
    config = {r["submission"]: r["configuration"] for r in rows}
    assert config["first"] == config["logged"] != config["old-preset"]
    opd_rank = {r["submission"]: r["rank"] for r in rows if r["method"] == "opd"}
    assert opd_rank["old-preset"] == "1"  # first in its own table, whatever the others score
    text = readme.read_text()
    current = text.index(f"configuration `{config['first']}`")
    assert current < text.index(f"configuration `{config['old-preset']}`")
    assert "Final evaluation: 160 test prompts x 2 images per benchmark; 2 submissions" in text[current:current + 300]
    lr = json.loads((board / "submissions" / "tiny" / "first.json").read_text())["config"]["opd"]["lr"]
    assert (f"An older setting of the preset; against `{config['first']}`: opd.lr {json.dumps(lr * 3)} "
            f"(now {json.dumps(lr)}).") in text


def test_a_setting_added_later_at_the_value_earlier_runs_trained_with_is_the_same_experiment():
    """updates_per_rollout came after runs were recorded: a run without it trained one update per
    rollout, which is the standard preset's value, so it is still a run of the installed preset; a
    run with two updates is another experiment."""
    current = make_results(rng_seed=6)
    assert current["config"]["teachers"]["updates_per_rollout"] == 1
    before = copy.deepcopy(current)
    for section in ("teachers", "multi-reward"):
        del before["config"][section]["updates_per_rollout"]
    del before["config"]["cascade"]["grpo"]["updates_per_rollout"]
    assert preset_differences(before) == "" and configuration_id(before) == configuration_id(current)
    two = copy.deepcopy(current)
    two["config"]["teachers"]["updates_per_rollout"] = 2
    assert preset_differences(two) == "teachers.updates_per_rollout 2 (now 1)"
    assert configuration_id(two) != configuration_id(current)


def test_a_run_made_when_the_preset_trained_fewer_steps_keeps_its_own_table(board):
    """A stored entry is checked against its own recorded budget (finished, matched across the
    students), not the installed preset's: one made before the preset's steps changed is listed in
    its own table, while one whose students trained unmatched budgets is not listed."""
    shorter = make_results(rng_seed=5)
    for method in ("opd", "opd-ppo", "multi-reward"):
        shorter["config"][method]["steps"] = shorter["compute"][method]["optimizer_steps"] = 30
    shorter["config"]["cascade"]["stages"] = [[task, 10] for task, _ in shorter["config"]["cascade"]["stages"]]
    shorter["compute"]["cascade"]["optimizer_steps"] = 10 * len(shorter["config"]["cascade"]["stages"])
    with pytest.raises(SubmissionError, match=r"not the installed standard preset's: .*steps"):
        validate(shorter)  # a new submission must be the installed preset's
    unmatched = copy.deepcopy(shorter)
    unmatched["config"]["opd"]["steps"] = unmatched["compute"]["opd"]["optimizer_steps"] = 20
    for name, results in (("shorter", shorter), ("unmatched", unmatched)):
        results["submission"] = {"name": name, "submitted": results["date"], "verified": {"images_checked": 1}}
        (board / "submissions" / "tiny" / f"{name}.json").write_text(json.dumps(results))
    readme, table = rebuild(board)
    rows = list(csv.DictReader(table.open()))
    assert {r["optimizer_steps"] for r in rows if r["submission"] == "shorter" and r["kind"] == "student"} == {"30"}
    assert "unmatched" not in {r["submission"] for r in rows}
    not_listed = readme.read_text().split("## Not listed")[1]
    assert "unmatched.json: the student methods train unmatched budgets (opd 20, opd-ppo 30, multi-reward 30, cascade 30" in not_listed
    assert "shorter.json" not in not_listed


def _mutations():
    def missing_benchmark(r):
        del r["results"]["opd"]["ocr"]

    def out_of_range(r):
        r["results"]["cascade"]["geneval"]["mean"] = 1.5

    def not_finite(r):
        r["results"]["opd"]["pref"]["per_seed"][0] = float("nan")

    def schema(r):
        r["schema_version"] = 4

    def schema_not_an_integer(r):  # 3.0 == 3 and True == 1 in Python, not in the schema
        r["schema_version"] = 3.0

    def prompt_hash(r):
        r["prompt_hashes"]["ocr"]["test"] = "0" * 64

    def suite_version(r):
        r["suite_version"] = "tiny-v0"

    def unknown_suite(r):
        r["suite"] = "huge"

    def earlier_base(r):  # made on a shipped 'tiny' base of an earlier release
        r["model_sha256"] = "0123456789ab"

    def seeds(r):
        r["seeds"] = []

    def edited_mean(r):
        r["results"]["opd"]["geneval"]["mean"] += 0.01

    # The consistent hand edits of issue 12: mean and per_seed changed together, or the std alone.
    def edited_mean_and_per_seed(r):
        cell = r["results"]["opd"]["geneval"]
        cell["per_seed"] = [v + 0.2 for v in cell["per_seed"]]
        cell["mean"] += 0.2

    def edited_std(r):
        r["results"]["opd"]["ocr"]["std"] = 0.0

    def edited_per_image(r):  # one image changed, the per-seed score left alone
        r["per_image"]["opd"]["0"]["ocr"][0] = 1.0 - r["per_image"]["opd"]["0"]["ocr"][0]

    def smoke(r):
        r["preset"] = "smoke"

    def smoke_budget_relabelled(r):  # a smoke run's budget under the standard preset's name
        r["config"]["opd"]["steps"] = 2
        r["compute"]["opd"]["optimizer_steps"] = 2

    def unfinished(r):
        r["compute"]["cascade"]["optimizer_steps"] = 12

    def adapter_hash(r):
        r["artifacts"]["opd"]["1"]["sha256"] = "not a hash"

    def adapter_path(r):
        r["artifacts"]["multi-reward"]["2"]["path"] = "../../elsewhere"

    def cell_seeds(r):
        r["results"]["opd"]["pref"]["seeds"] = [0, 1, 7]

    def schema_1(r):  # legacy files are listed, never submitted
        r["schema_version"] = 1

    def eval_seed(r):  # schema 3: the one noise seed of the final evaluations
        r["config"]["eval"]["seed"] = "0"

    def date(r):  # the board orders configurations by it
        r["date"] = "not a date"

    def other_settings(r):  # a smoke run relabelled standard with its budget edited would differ in these
        r["config"]["multi-reward"]["lr"] *= 3
        r["config"]["eval"]["seed"] = 5

    def not_objects(r):  # an edited file's per-image scores and adapters of one model as lists
        r["per_image"]["opd"] = []
        r["artifacts"]["opd"] = []

    def headline(r):  # an overall score on a benchmark of the submitter's choosing
        r["headline"] = ["geneval"]

    def unbounded_headline(r):  # the learned preference is not a [0, 1] score
        r["headline"] = ["geneval", "ocr", "pref"]

    def benchmark_dropped(r):
        r["benchmarks"] = [b for b in r["benchmarks"] if b != "ocr"]

    def no_student(r):
        r["results"] = {k: v for k, v in r["results"].items() if k == "base" or k.startswith("teacher/")}

    def unknown_method(r):
        r["results"]["opd-v2"] = r["results"]["opd"]

    def no_prompt_hashes(r):
        del r["prompt_hashes"]

    def huge_integer(r):  # past a float's range: math.isfinite itself raises
        r["results"]["opd"]["geneval"]["std"] = 10**400

    def benchmark_not_a_name(r):
        r["benchmarks"] = [["geneval"]] + r["benchmarks"][1:]

    def extra_benchmark(r):  # the table's columns come from this list
        r["benchmarks"] = ["zzz"] + r["benchmarks"]

    def repeated_headline(r):  # would weigh geneval twice in the overall score
        r["headline"] = ["geneval"] + r["headline"]

    def overrides_not_a_list(r):
        r["config"]["overrides"] = 5

    def impossible_date(r):
        r["date"] = "2026-99-99T99:99:99Z"

    def future_date(r):  # the board orders configurations by it
        r["date"] = "2999-01-01T00:00:00Z"

    def per_seed_short(r):
        r["results"]["opd"]["geneval"]["per_seed"] = r["results"]["opd"]["geneval"]["per_seed"][:2]

    def unknown_precision(r):  # the board's model label and its tables are keyed by it
        r["config"]["model"] = {"dtype": "float99", "drop_t5": False}

    def precision_not_a_name(r):
        r["config"]["model"] = {"dtype": ["bfloat16"], "drop_t5": False}

    def drop_t5_not_a_flag(r):
        r["config"]["model"] = {"dtype": "bfloat16", "drop_t5": "yes"}

    def limit_true(r):  # Python's bool is an int: true read as a limit of 1
        r["config"]["eval"]["limit"] = True

    # each with what its refusal must say: an earlier, unrelated refusal would not show the check works
    return [(missing_benchmark, r"results\['opd'\]\['ocr'\] is missing"), (out_of_range, "is outside"),
            (not_finite, "not a finite number"), (schema, "schema_version is 4"), (schema_not_an_integer, "schema_version is 3.0"),
            (prompt_hash, "does not match the installed tiny suite's test prompt file"), (suite_version, "suite_version is 'tiny-v0'"),
            (unknown_suite, "unknown suite 'huge'"), (earlier_base, "model_sha256 is '0123456789ab'"), (seeds, "'seeds' is \\[\\]"),
            (edited_mean, "is not the mean of its per_seed values"), (edited_mean_and_per_seed, "is not the score of its per-image values"),
            (edited_std, "is not the standard deviation"), (edited_per_image, "is not the score of its per-image values"),
            (smoke, "preset is 'smoke'"), (smoke_budget_relabelled, "unmatched budgets \\(opd 2,"),
            (unfinished, "optimizer_steps'\\] is 12"), (adapter_hash, r"artifacts\['opd'\]\['1'\] must give"),
            (adapter_path, r"artifacts\['multi-reward'\]\['2'\] must give"), (cell_seeds, "must list distinct seeds"),
            (schema_1, "schema_version is 1; submissions need version 3"), (eval_seed, r"config\['eval'\]\['seed'\] is '0'"), (limit_true, r"config\['eval'\] must give the final evaluation's 'limit'"),
            (date, "'date' is 'not a date'"), (other_settings, "eval.seed 5 \\(now 0\\), multi-reward.lr"),
            (not_objects, "must list the 320 scores"), (headline, "headline benchmarks are"),
            (unbounded_headline, "suite's \\[0, 1\\] benchmarks"), (benchmark_dropped, "must list each tiny benchmark"),
            (huge_integer, "it must be a finite number"), (benchmark_not_a_name, "must list each tiny benchmark"),
            (extra_benchmark, "'benchmarks' is \\['zzz'"), (repeated_headline, "repeats a benchmark"),
            (overrides_not_a_list, r"config\['overrides'\] is 5"), (impossible_date, "'date' is '2026-99-99"),
            (future_date, "not in the future"),
            (no_student, "has no student method"), (unknown_method, "unknown method 'opd-v2'"),
            (no_prompt_hashes, "'prompt_hashes' is missing"), (per_seed_short, "one value per seed of the cell"),
            (unknown_precision, r"config\['model'\] is \{'dtype': 'float99'"),
            (precision_not_a_name, r"config\['model'\] is \{'dtype': \['bfloat16'\]"),
            (drop_t5_not_a_flag, r"config\['model'\] is .*'drop_t5': 'yes'")]


@pytest.mark.parametrize("mutate, refusal", _mutations(), ids=[mutate.__name__ for mutate, _ in _mutations()])
def test_malformed_results_are_refused_and_leave_the_board_unchanged(tmp_path, board, valid, mutate, refusal):
    bad = copy.deepcopy(valid)
    mutate(bad)
    with pytest.raises(SubmissionError, match=refusal) as info:
        validate(bad)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one line: the problem; the fix
    make_run(tmp_path / "bad", bad)
    before = tree(board)
    with pytest.raises(SubmissionError, match=refusal):
        submit(tmp_path / "bad", "bad", root=board, verify=passes)
    with pytest.raises(SubmissionError, match=refusal):  # --unverified skips the re-evaluation, not the checks
        submit(tmp_path / "bad", "bad", root=board, unverified=True)
    assert tree(board) == before


def test_oversized_result_file_is_refused_before_reading(tmp_path, board, valid):
    big = copy.deepcopy(valid)
    big["curves"]["opd"]["0"] *= 1 + MAX_FILE_BYTES // len(json.dumps(big["curves"]["opd"]["0"]))
    make_run(tmp_path / "big", big)
    before = tree(board)
    with pytest.raises(SubmissionError) as info:
        submit(tmp_path / "big", "big", root=board, verify=passes)
    assert str(info.value).startswith(str(tmp_path / "big" / "results.json")) and "2 MiB" in str(info.value)
    assert tree(board) == before
    # a stored file over the cap is listed as not valid, without being parsed
    shutil.copy(tmp_path / "big" / "results.json", board / "submissions" / "tiny" / "big.json")
    readme, _ = rebuild(board)
    assert "big.json" in readme.read_text() and "cap" in readme.read_text()


def test_a_run_that_does_not_verify_is_refused_or_listed_apart(tmp_path, board):
    make_run(tmp_path / "run-d", make_results(rng_seed=3))  # another run than the board's
    before = tree(board)
    with pytest.raises(SubmissionError, match="does not verify.*--unverified"):
        submit(tmp_path / "run-d", "edited", root=board, verify=fails)
    assert tree(board) == before
    path = submit(tmp_path / "run-d", "edited", root=board, unverified=True, verify=fails)
    assert json.loads(path.read_text())["submission"]["verified"] is None
    readme, table = rebuild(board)
    rows = list(csv.DictReader(table.open()))
    assert {r["status"] for r in rows if r["submission"] == "edited"} == {"unverified"}
    assert all(r["rank"] == "" for r in rows if r["submission"] == "edited")
    text = readme.read_text()
    assert text.index("## Unverified (not ranked)") < text.index("| unverified | edited | opd |")


def schema_1(results: dict) -> dict:
    """``results`` as opd-bench wrote it before verification: no per-image scores, adapter hashes or cell seeds."""
    old = {k: v for k, v in copy.deepcopy(results).items() if k not in ("per_image", "artifacts", "model_sha256")}
    old["schema_version"] = 1
    for per_bench in old["results"].values():
        for cell in per_bench.values():
            del cell["seeds"]
    return old


def test_schema_1_entries_are_listed_as_legacy_and_never_submitted(tmp_path, valid):
    root = tmp_path / "lb"
    (root / "submissions" / "tiny").mkdir(parents=True)
    (root / "submissions" / "tiny" / "old-run.json").write_text(json.dumps(schema_1(valid)))
    readme, table = rebuild(root)
    rows = list(csv.DictReader(table.open()))
    assert rows and {r["status"] for r in rows} == {"legacy"} and all(r["rank"] == "" for r in rows)
    assert "| legacy | old-run | opd |" in readme.read_text() and "No verified submissions yet" in readme.read_text()
    make_run(tmp_path / "old", schema_1(valid))
    with pytest.raises(SubmissionError, match="schema_version is 1"):
        submit(tmp_path / "old", "again", root=root, unverified=True)


def test_the_committed_legacy_entry_does_not_break_the_rebuild(tmp_path):
    """The committed entry predates schema 2 (and, since tiny-v2, the installed suite version): it is
    listed as legacy while its suite matches, else under "Not listed"; either way the rebuild works."""
    root = tmp_path / "lb"
    (root / "submissions" / "tiny").mkdir(parents=True)
    shutil.copy(LEGACY, root / "submissions" / "tiny" / LEGACY.name)
    readme, table = rebuild(root)
    text = readme.read_text()
    assert "| legacy | tiny-standard-cpu |" in text or "- submissions/tiny/tiny-standard-cpu.json: suite_version" in text
    assert "tiny-standard-cpu" not in {r["submission"] for r in csv.DictReader(table.open()) if r["rank"]}


def test_invalid_json_is_refused(tmp_path, board):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{not json")
    before = tree(board)
    with pytest.raises(SubmissionError, match="not valid JSON"):
        submit(tmp_path / "junk", "junk", root=board, verify=passes)
    assert tree(board) == before


@pytest.mark.parametrize("name", ["first", "FIRST"])
def test_duplicate_name_is_refused(tmp_path, board, valid, name):
    make_run(tmp_path / "again", copy.deepcopy(valid))
    before = tree(board)
    with pytest.raises(SubmissionError, match="already exists"):
        submit(tmp_path / "again", name, root=board, verify=passes)
    assert tree(board) == before


def test_results_already_on_the_board_are_refused_under_another_name(tmp_path, board, valid):
    make_run(tmp_path / "copy", copy.deepcopy(valid))
    before = tree(board)
    for unverified in (False, True):
        with pytest.raises(SubmissionError, match="already submitted as 'first'.*`opd-bench leaderboard` rebuilds the table"):
            submit(tmp_path / "copy", "copy1", root=board, unverified=unverified, verify=passes)
    assert tree(board) == before


def test_the_same_adapters_with_scores_edited_within_tolerance_are_refused(tmp_path, board, valid):
    nudged = copy.deepcopy(valid)
    nudged["per_image"]["base"]["0"]["pref"][0] += 1e-6  # verify's tolerance would pass it
    make_run(tmp_path / "nudged", nudged)
    with pytest.raises(SubmissionError, match="already submitted as 'first'"):
        submit(tmp_path / "nudged", "nudged", root=board, verify=passes)


def test_rebuilding_where_no_board_is_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no submissions/ folder"):
        rebuild(tmp_path / "leaderboard")
    assert not (tmp_path / "leaderboard").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "a..b", "", ".hidden", "-x", "x" * 65, "a b", "CON", "nul.txt", "lpt1"])
def test_unsafe_names_are_refused(tmp_path, board, valid, name):
    make_run(tmp_path / "run-c", copy.deepcopy(valid))
    before, outside = tree(board), tree(tmp_path)
    with pytest.raises(SubmissionError, match="not allowed"):
        submit(tmp_path / "run-c", name, root=board, verify=passes)
    assert tree(board) == before and tree(tmp_path) == outside


def test_a_name_ending_in_json_is_refused_naming_the_name_to_pass(tmp_path, board, valid):
    make_run(tmp_path / "run-j", copy.deepcopy(valid))
    before = tree(board)
    with pytest.raises(SubmissionError, match=r"ends in .json, which the stored file adds; pass --name opd-lr3e-4$"):
        submit(tmp_path / "run-j", "opd-lr3e-4.JSON", root=board, verify=passes)
    assert tree(board) == before
    assert check_name("console") == "console"  # only the device names themselves are reserved


def test_refusal_on_a_fresh_root_creates_nothing(tmp_path, valid):
    bad = copy.deepcopy(valid)
    bad["schema_version"] = 0
    make_run(tmp_path / "bad", bad)
    with pytest.raises(SubmissionError):
        submit(tmp_path / "bad", "ok", root=tmp_path / "lb", verify=passes)
    assert not (tmp_path / "lb").exists()


def test_rebuild_lists_invalid_stored_files_instead_of_crashing(board, valid):
    stored = board / "submissions" / "tiny"
    (stored / "tampered.json").write_text(json.dumps({"schema_version": 1, "suite": "tiny"}))
    (stored / "deep.json").write_text("[" * 100_000)
    (stored / "latin1.json").write_bytes(b'{"suite": "\xff"}')
    lists = copy.deepcopy(valid)
    lists["per_image"]["opd"] = []
    (stored / "lists.json").write_text(json.dumps(lists))
    readme, table = rebuild(board)
    text = readme.read_text()
    assert "tampered.json" in text and "deep.json: " in text and "nests too deeply" in text
    assert "latin1.json is not UTF-8 text" in text and "lists.json: per_image['opd']['0']['geneval'] must list" in text
    (stored / "digits.json").write_text('{"schema_version": ' + "9" * 5000 + "}")  # over Python's int-parsing limit
    text = rebuild(board)[0].read_text()
    assert "digits.json holds a value Python cannot read" in text
    assert "tampered" not in table.read_text() and "first" in table.read_text()
    (board / "submissions" / "top.json").write_text("{}")
    (stored / "upper.JSON").write_text("{}")
    text = rebuild(board)[0].read_text()
    for misplaced in ("submissions/top.json", "submissions/tiny/upper.JSON"):
        assert f"{misplaced}: not an entry; entries are submissions/<suite>/<name>.json" in text


def test_an_entry_no_check_foresaw_is_listed_and_the_rest_rebuilt(board, monkeypatch):
    import opd_bench.leaderboard as leaderboard

    monkeypatch.setattr(leaderboard, "check_listable", lambda results: results["no such key"])
    text = rebuild(board)[0].read_text()
    assert "submissions/tiny/first.json: does not validate (KeyError: 'no such key')" in text


def test_runs_of_another_base_model_are_ranked_apart(tmp_path, board):
    other = make_results(rng_seed=5, fixed={"opd": 0.99})
    other["config"]["model"] = {"dtype": "bfloat16"}
    make_run(tmp_path / "run-b", other)
    submit(tmp_path / "run-b", "bf16", root=board, verify=passes)
    readme, table = rebuild(board)
    text = readme.read_text()
    assert text.count("## Suite `tiny`, preset `standard`") == 2
    assert "model `tiny (bfloat16)`" in text and "model `tiny`\n" in text
    ranks = {(row["submission"], row["method"]): row["rank"] for row in csv.DictReader(table.read_text().splitlines())}
    # each base has its own rank 1: the bfloat16 run's better opd does not push the float32 run's down
    assert "1" in {ranks[("first", m)] for m in ("opd", "opd-ppo", "multi-reward", "cascade")}
    assert ranks[("bf16", "opd")] == "1"


def test_forward_passes_include_the_kl_reference_and_refuse_a_bad_count(tmp_path):
    results = make_results(rng_seed=1)
    results["compute"]["multi-reward"]["reference_forwards"] = 500.0
    make_run(tmp_path / "run", copy.deepcopy(results))
    root = tmp_path / "leaderboard"
    submit(tmp_path / "run", "kl", root=root, verify=passes)
    _, table = rebuild(root)
    row = next(r for r in csv.DictReader(table.open()) if r["method"] == "multi-reward")
    assert row["forward_passes"] == str(int(results["compute"]["multi-reward"]["student_forwards"]) + 500)

    results["compute"]["multi-reward"]["reference_forwards"] = -1.0
    make_run(tmp_path / "bad", results)
    with pytest.raises(SubmissionError, match="reference_forwards"):
        submit(tmp_path / "bad", "bad", root=root, verify=passes)
