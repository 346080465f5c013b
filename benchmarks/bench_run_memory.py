"""Does a run slow down or grow over time? RSS and seconds per evaluated image across one run.

Starts `opd-bench run ARGS...` as a child process, samples the resident memory of its whole
process tree every few seconds (from /proc), and, when it ends, reads the run folder's final
evaluation records (`evals/*.json`; each holds its seconds and image count) in the order they were
written: as each evaluation finishes in one process, at the end with `--jobs` (whose cells score
one benchmark each, and the records join them). Prints a table and writes both curves as JSON.

    python benchmarks/bench_run_memory.py --out runs/mem -- --method all --preset standard
    python benchmarks/bench_run_memory.py --out runs/mem-smoke -- --preset smoke --seeds 0

Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the run folder (passed to opd-bench run --out)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments after -- go to opd-bench run")
    args = ap.parse_args()
    run_args = [a for a in args.run_args if a != "--"]

    start = time.time()
    child = subprocess.Popen(["opd-bench", "run", "--out", str(args.out), "--no-report", *run_args])
    memory = []
    while child.poll() is None:
        memory.append({"seconds": round(time.time() - start, 1), "rss_mb": round(tree_rss_mb(child.pid), 1)})
        time.sleep(args.every)
    records = sorted((args.out / "evals").glob("*.json"), key=lambda p: p.stat().st_mtime)
    evals = []
    for path in records:
        record = json.loads(path.read_text())
        images = sum(len(v) for v in record.get("per_image", {}).values())
        seconds = record.get("seconds")
        evals.append({"eval": path.stem, "finished_at": round(path.stat().st_mtime - start, 1), "images": images,
                      "seconds_per_image": round(seconds / images, 4) if seconds and images else None})
    summary = {"command": ["opd-bench", "run", "--out", str(args.out), *run_args], "exit_code": child.returncode,
               "wall_seconds": round(time.time() - start, 1), "memory": memory, "evaluations": evals}
    (args.out / "run_memory.json").write_text(json.dumps(summary, indent=1))
    peak = max((m["rss_mb"] for m in memory), default=0.0)
    print(f"exit {child.returncode}, {summary['wall_seconds']} s, peak RSS {peak:.0f} MB")
    for quarter in range(4):  # memory by quarter of the run: growth shows as a rising column
        part = memory[quarter * len(memory) // 4 : (quarter + 1) * len(memory) // 4] or [{"rss_mb": 0.0}]
        print(f"  quarter {quarter + 1}: max RSS {max(m['rss_mb'] for m in part):.0f} MB")
    for e in evals:
        print(f"  {e['eval']:40s} at {e['finished_at']:7.1f} s: {e['images']} images, {e['seconds_per_image']} s/image")
    print(f"wrote {args.out / 'run_memory.json'}")


if __name__ == "__main__":
    main()
