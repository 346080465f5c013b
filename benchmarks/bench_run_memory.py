"""Does a run slow down or grow over time? Memory and seconds per evaluated image across one run.

Starts `python -m opd_bench run ARGS...` (this interpreter's opd_bench) as a child process, samples
the memory of its whole process tree every few seconds (from /proc), and, when it ends, reads the
run folder's final evaluation records (`evals/*.json`; each holds its seconds and per-image scores)
in the order they were written: as each evaluation finishes in one process, at the end with
`--jobs` (whose cells score one benchmark each, and the records join them). Prints a table and
writes both curves as JSON, with the code's commit, torch version and CPU model.

Memory: `pss_mb` (the headline) sums each process's proportional set size, so pages shared by the
`--jobs` workers (libraries, torch) count once in all; `rss_sum_mb` sums VmRSS, which counts them
once per process: it is the `rss_mb` of older run_memory.json files (the docs' "RSS of the process tree").

    python benchmarks/bench_run_memory.py --out runs/mem -- --method all --preset standard
    python benchmarks/bench_run_memory.py --out runs/mem-smoke -- --preset smoke --seeds 0

Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import provenance

MEMORY_FIELDS = {
    "pss_mb": "sum of Pss (smaps_rollup) over the process tree, shared pages split between their processes",
    "rss_sum_mb": "sum of VmRSS over the process tree, shared pages counted once per process (older files: rss_mb)",
}


def _kb(path: Path, field: str) -> int:
    """The ``field:`` line of a /proc file, in kB; 0 once the process is gone."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mb(root: int) -> dict[str, float]:
    """``{"pss_mb", "rss_sum_mb"}`` of ``root`` and all its descendants (see MEMORY_FIELDS)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    pss = rss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        pss += _kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
        rss += _kb(Path(f"/proc/{pid}/status"), "VmRSS")
    return {"pss_mb": round(pss / 1024, 1), "rss_sum_mb": round(rss / 1024, 1)}


def main_score_lists(run_dir: Path) -> set[str]:
    """The ``per_image`` lists of images actually drawn in this run's evaluations: each benchmark's
    main list. Extra rewards (pref_oracle) re-score the same images under names of their own."""
    from opd_bench import suites

    suite = suites.get(json.loads((run_dir / "run.json").read_text())["suite"])
    return {suite.benchmark(task).name for task in suite.tasks}


def drawn_images(record: dict, main_lists: set[str]) -> int:
    """Images an evaluation record's model drew: the lengths of its main score lists only."""
    return sum(len(scores) for name, scores in record.get("per_image", {}).items() if name in main_lists)


def code_tree() -> Path:
    """The checkout `python -m opd_bench` imports here: asked of this interpreter in this working
    directory, since `-m` puts the working directory first on the path."""
    out = subprocess.run([sys.executable, "-c", "import opd_bench; print(opd_bench.__file__)"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the run folder (passed to opd-bench run --out)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments after -- go to opd-bench run")
    args = ap.parse_args()
    run_args = [a for a in args.run_args if a != "--"]

    tree = code_tree()
    code = {"tree": str(tree), **provenance(tree)}
    print(f"code: {tree} at {code['commit']}{' (uncommitted changes)' if code['dirty'] else ''}, "
          f"torch {code['torch']}, CPU {code['cpu']}")
    command = [sys.executable, "-m", "opd_bench", "run", "--out", str(args.out), "--no-report", *run_args]
    start = time.time()
    child = subprocess.Popen(command)
    memory = []
    while child.poll() is None:
        memory.append({"seconds": round(time.time() - start, 1), **tree_memory_mb(child.pid)})
        time.sleep(args.every)
    records = sorted((args.out / "evals").glob("*.json"), key=lambda p: p.stat().st_mtime)
    main_lists = main_score_lists(args.out) if records else set()
    evals = []
    for path in records:
        record = json.loads(path.read_text())
        images = drawn_images(record, main_lists)
        seconds = record.get("seconds")
        evals.append({"eval": path.stem, "finished_at": round(path.stat().st_mtime - start, 1), "images": images,
                      "seconds_per_image": round(seconds / images, 4) if seconds and images else None})
    summary = {"command": command, "code": code, "exit_code": child.returncode,
               "wall_seconds": round(time.time() - start, 1), "memory_fields": MEMORY_FIELDS, "memory": memory,
               "evaluations": evals}
    args.out.mkdir(parents=True, exist_ok=True)  # a run that failed early may not have made it
    (args.out / "run_memory.json").write_text(json.dumps(summary, indent=1))
    peak = {field: max((m[field] for m in memory), default=0.0) for field in MEMORY_FIELDS}
    print(f"exit {child.returncode}, {summary['wall_seconds']} s, peak PSS {peak['pss_mb']:.0f} MB "
          f"(sum of RSS {peak['rss_sum_mb']:.0f} MB)")
    for quarter in range(4):  # memory by quarter of the run: growth shows as a rising column
        part = memory[quarter * len(memory) // 4 : (quarter + 1) * len(memory) // 4] or [{"pss_mb": 0.0}]
        print(f"  quarter {quarter + 1}: max PSS {max(m['pss_mb'] for m in part):.0f} MB")
    for e in evals:
        print(f"  {e['eval']:40s} at {e['finished_at']:7.1f} s: {e['images']} images, {e['seconds_per_image']} s/image")
    print(f"wrote {args.out / 'run_memory.json'}")


if __name__ == "__main__":
    main()
