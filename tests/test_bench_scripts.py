"""The benchmark scripts' bookkeeping: what they count, measure and record besides the timings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_seconds_per_image_counts_the_drawn_images_not_the_extra_rewards_rescoring_them(benchmark_script):
    bench = benchmark_script("bench_run_memory")
    # as an evaluation record holds them: pref_oracle re-scores the 4 pref images under its own name
    record = {"per_image": {"geneval": [1.0] * 4, "ocr": [0.5] * 4, "pref": [3.0] * 4, "pref_oracle": [0.6] * 4},
              "seconds": 6.0}

    assert bench.drawn_images(record, {"geneval", "ocr", "pref"}) == 12


def test_the_main_score_lists_are_the_suite_s_benchmarks_and_not_its_extra_rewards(benchmark_script, tmp_path):
    bench = benchmark_script("bench_run_memory")
    (tmp_path / "run.json").write_text('{"suite": "tiny"}')

    assert bench.main_score_lists(tmp_path) == {"geneval", "ocr", "pref"}


def test_tree_memory_splits_shared_pages_between_processes(benchmark_script):
    bench = benchmark_script("bench_run_memory")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        memory = bench.tree_memory_mb(os.getpid())
    finally:
        child.kill()
        child.wait()
    # two Pythons share the interpreter's pages: Pss counts them once in all, RSS once per process
    assert 0 < memory["pss_mb"] < memory["rss_sum_mb"]


def test_the_memory_benchmark_runs_this_interpreter_s_opd_bench():
    out = subprocess.run([sys.executable, "-m", "opd_bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage" in out.stdout


def test_provenance_names_commit_and_uncommitted_changes_or_says_it_is_no_git_tree(benchmark_script, tmp_path):
    machine = benchmark_script("machine")
    plain = tmp_path / "copy"
    plain.mkdir()
    assert machine.git_state(plain) == {"commit": "not a git tree", "dirty": None}

    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert machine.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert machine.git_state(repo) == {"commit": head, "dirty": True}
    # a plain copy inside a repository is not that repository's commit
    (repo / "copy").mkdir()
    assert machine.git_state(repo / "copy")["commit"] == "not a git tree"

    recorded = machine.provenance(repo)
    assert recorded["torch"] and recorded["cpu"]


def test_modules_loaded_from_another_tree_are_named(benchmark_script, tmp_path):
    machine = benchmark_script("machine")
    import opd_bench.evaluate  # noqa: F401  (loaded from this checkout)

    assert machine.stray_modules(ROOT) == []
    assert "opd_bench.evaluate" in machine.stray_modules(tmp_path)


def test_paired_speedup_compares_old_and_new_of_the_same_repetition(benchmark_script):
    bench = benchmark_script("bench_step_speedup")

    ratios = bench.paired_ratios([2.0, 3.0, 4.4], [1.0, 2.0, 4.0])

    assert ratios == {"median": 1.5, "min": 1.1, "max": 2.0}


@pytest.mark.parametrize("name, peak, guessed", [
    ("NVIDIA H100 80GB HBM3", 989.0, False), ("NVIDIA H100 PCIe", 756.0, False), ("NVIDIA H100 NVL", 835.0, False),
    ("NVIDIA H200", 989.0, False), ("NVIDIA A100-SXM4-80GB", 790.0, True),
])
def test_the_peak_used_for_the_share_is_looked_up_from_the_card(benchmark_script, name, peak, guessed):
    bench = benchmark_script("bench_train_step")

    used, source = bench.bf16_peak_tflops(name)

    assert used == peak and ("guess" in source) == guessed


def _teacher(run: Path, folder: str) -> Path:
    final = run / "teachers" / folder / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    return final


def test_the_student_probe_refuses_to_pick_one_of_several_teachers_of_a_task(benchmark_script, tmp_path):
    probe = benchmark_script("probe_student")
    geneval = _teacher(tmp_path, "geneval-aaaa")
    old, new = _teacher(tmp_path, "pref-1111"), _teacher(tmp_path, "pref-2222")

    with pytest.raises(ValueError, match="several teachers.*pref-1111.*pref-2222.*--teacher") as error:
        probe.find_teachers(tmp_path, ["geneval", "pref"], [])
    assert "\n" not in str(error.value)

    chosen = probe.find_teachers(tmp_path, ["geneval", "pref"], [f"pref={old.parent}"])
    assert chosen == {"geneval": geneval, "pref": old}
    assert probe.find_teachers(tmp_path, ["pref"], [f"pref={new}"]) == {"pref": new}
    with pytest.raises(ValueError, match="no finished teacher for ocr"):
        probe.find_teachers(tmp_path, ["ocr"], [])
