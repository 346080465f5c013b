import copy
import csv
import hashlib
import json

import pytest

from fake_results import make_results, make_run
from opd_bench.leaderboard import SubmissionError, rebuild, submit, validate


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
    submit(tmp_path / "run-a", "first", root=root)
    rebuild(root)
    return root


def test_valid_submission_is_stored_and_ranked(tmp_path, board, valid):
    stored = json.loads((board / "submissions" / "tiny" / "first.json").read_text())
    assert stored["submission"]["name"] == "first" and stored["results"] == valid["results"]

    better = copy.deepcopy(valid)
    for bench in ("geneval", "ocr", "pref_oracle"):
        better["results"]["opd"][bench] = {"mean": 0.99, "std": 0.0, "per_seed": [0.99, 0.99, 0.99]}
    make_run(tmp_path / "run-b", better)
    path = submit(tmp_path / "run-b", "second.v2", root=board)
    assert path == board / "submissions" / "tiny" / "second.v2.json"
    readme, table = rebuild(board)

    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2 * len(valid["results"])
    assert rows[0]["rank"] == "1" and rows[0]["submission"] == "second.v2" and rows[0]["method"] == "opd"
    assert rows[0]["overall"] == "0.9900" and rows[0]["geneval_mean"] == "0.9900"
    overall = [float(r["overall"]) for r in rows]
    assert overall == sorted(overall, reverse=True)
    students = [r for r in rows if r["kind"] == "student"]
    assert len(students) == 8 and all(r["rank"] for r in students)
    assert all(r["rank"] == "" for r in rows if r["kind"] == "reference")
    assert rows[0]["optimizer_steps"] == "12" and rows[0]["forward_passes"] == str(12 * 40 + 12 * 36)

    text = readme.read_text()
    assert "opd-bench submit" in text and "opd-bench leaderboard" in text
    assert "| 1 | second.v2 | opd | tiny | 0.990 |" in text
    # Deterministic: rebuilding again gives identical bytes.
    before = tree(board)
    rebuild(board)
    assert tree(board) == before


def _mutations():
    def missing_benchmark(r):
        del r["results"]["opd"]["ocr"]

    def out_of_range(r):
        r["results"]["cascade"]["geneval"]["mean"] = 1.5

    def not_finite(r):
        r["results"]["opd"]["pref"]["per_seed"][0] = float("nan")

    def schema(r):
        r["schema_version"] = 2

    def prompt_hash(r):
        r["prompt_hashes"]["ocr"]["test"] = "0" * 64

    def suite_version(r):
        r["suite_version"] = "tiny-v0"

    def unknown_suite(r):
        r["suite"] = "huge"

    def seeds(r):
        r["seeds"] = []

    def edited_mean(r):
        r["results"]["opd"]["geneval"]["mean"] += 0.01

    return [missing_benchmark, out_of_range, not_finite, schema, prompt_hash, suite_version, unknown_suite, seeds,
            edited_mean]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_malformed_results_are_refused_and_leave_the_board_unchanged(tmp_path, board, valid, mutate):
    bad = copy.deepcopy(valid)
    mutate(bad)
    with pytest.raises(SubmissionError) as info:
        validate(bad)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one line: the problem; the fix
    make_run(tmp_path / "bad", bad)
    before = tree(board)
    with pytest.raises(SubmissionError):
        submit(tmp_path / "bad", "bad", root=board)
    assert tree(board) == before


def test_invalid_json_is_refused(tmp_path, board):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{not json")
    before = tree(board)
    with pytest.raises(SubmissionError, match="not valid JSON"):
        submit(tmp_path / "junk", "junk", root=board)
    assert tree(board) == before


@pytest.mark.parametrize("name", ["first", "FIRST"])
def test_duplicate_name_is_refused(tmp_path, board, valid, name):
    make_run(tmp_path / "again", copy.deepcopy(valid))
    before = tree(board)
    with pytest.raises(SubmissionError, match="already exists"):
        submit(tmp_path / "again", name, root=board)
    assert tree(board) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "a..b", "", ".hidden", "-x", "x" * 65, "a b"])
def test_unsafe_names_are_refused(tmp_path, board, valid, name):
    make_run(tmp_path / "run-c", copy.deepcopy(valid))
    before, outside = tree(board), tree(tmp_path)
    with pytest.raises(SubmissionError, match="not allowed"):
        submit(tmp_path / "run-c", name, root=board)
    assert tree(board) == before and tree(tmp_path) == outside


def test_refusal_on_a_fresh_root_creates_nothing(tmp_path, valid):
    bad = copy.deepcopy(valid)
    bad["schema_version"] = 0
    make_run(tmp_path / "bad", bad)
    with pytest.raises(SubmissionError):
        submit(tmp_path / "bad", "ok", root=tmp_path / "lb")
    assert not (tmp_path / "lb").exists()


def test_rebuild_lists_invalid_stored_files_instead_of_crashing(board):
    (board / "submissions" / "tiny" / "tampered.json").write_text(json.dumps({"schema_version": 1, "suite": "tiny"}))
    readme, table = rebuild(board)
    assert "tampered.json" in readme.read_text()
    assert "tampered" not in table.read_text()
