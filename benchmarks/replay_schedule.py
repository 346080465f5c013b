"""The parallel run's schedule and its time-left estimate, from a finished run's log.

    python benchmarks/replay_schedule.py replay runs/standard-v12.log   # today's order, those cell times
    python benchmarks/replay_schedule.py bar runs/standard-v13.log      # what the bar said, against the truth
    python benchmarks/replay_schedule.py cells runs/standard-v12.log runs/standard-v13.log  # cell times side by side

``replay`` reads every cell's seconds from a standard run's log (the ``LABEL: N s`` lines the bar
writes), plans the standard preset's cells with today's code and replays them on 2 jobs through
``parallel.longest_first`` (event by event, no real work): it prints the run's length and, every two
minutes, the estimate ``parallel.time_left`` would show against the time the replay still had.
``bar`` reads the estimates a run's own bar printed (``~N min left``) and compares each minute's
with the time that run actually had left. ``cells`` sums two runs' cell seconds by kind (teachers,
each method's training, each benchmark's evaluations, ...) and prints their ratio.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

CELL_LINE = re.compile(r"^\s*((?:teacher|train|eval|variance|samples)[^:|\n]*): (\d+) s\s*$", re.M)


def cell_seconds(log: Path) -> dict[str, float]:
    """Every cell's seconds, by label, from the lines the bar wrote."""
    return {m.group(1).strip(): float(m.group(2)) for m in CELL_LINE.finditer(log.read_text().replace("\r", "\n"))}


def cells(first: Path, second: Path) -> None:
    def kind(label: str) -> str:  # "train opd", "eval ocr", "teacher", ...
        words = label.split()
        return words[0] + (f" {words[1]}" if words[0] == "train" else f" {words[-1]}" if words[0] == "eval" else "")

    a, b = cell_seconds(first), cell_seconds(second)
    sums: dict[str, list[float]] = {}
    for label in a.keys() & b.keys():
        sums.setdefault(kind(label), [0.0, 0.0])
        sums[kind(label)][0] += a[label]
        sums[kind(label)][1] += b[label]
    for name, (x, y) in sorted(sums.items()):
        print(f"{name:22s} {x:7.0f} s {y:7.0f} s  {y / x:5.2f}")
    x, y = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    print(f"{'all cells':22s} {x:7.0f} s {y:7.0f} s  {y / x:5.2f}; half of each: {x / 2:.0f} s, {y / 2:.0f} s")


def replay(log: Path, jobs: int = 2) -> None:
    from opd_bench.harness import Harness
    from opd_bench.parallel import _minutes, longest_first, plan_cells, time_left

    took = cell_seconds(log)
    with tempfile.TemporaryDirectory() as folder:
        cells = plan_cells(Harness(Path(folder) / "run", preset="standard", seeds=[0, 1, 2], progress=False))
    missing = [c.label for c in cells if c.label not in took]
    if missing:
        raise SystemExit(f"{log} has no time for {len(missing)} cells, e.g. {missing[0]!r}: give a standard run's log")
    now, pending, running, done, seconds, estimates, tick = 0.0, list(cells), {}, set(), {}, [], 0.0
    while pending or running:
        for cell in longest_first([c for c in pending if all(n in done for n in c.needs)], seconds)[: jobs - len(running)]:
            running[cell] = now
            pending.remove(cell)
        end = min(start + took[c.label] for c, start in running.items())
        while tick <= end:
            estimates.append((tick, time_left(pending, {c: tick - start for c, start in running.items()}, seconds, jobs)))
            tick += 120
        now = end
        for cell in [c for c, start in running.items() if start + took[c.label] <= now + 1e-9]:
            del running[cell]
            done.add(cell.label)
            seconds.setdefault(cell.sort_key, []).append(took[cell.label])
    print(f"replayed run: {now / 60:.1f} min on {jobs} jobs ({sum(took[c.label] for c in cells) / 60:.1f} min of cells)")
    for at, left in estimates:
        print(f"{at / 60:5.1f} min: {(now - at) / 60:4.1f} min left; the bar would say {_minutes(left) or '(nothing)'}")


def bar(log: Path) -> None:
    text = log.read_text().replace("\r", "\n")
    end = max(int(m) * 60 + int(s) for m, s in re.findall(r"\[(\d+):(\d+)[,\]]", text))
    said: dict[int, str] = {}
    for m in re.finditer(r"\[(\d+):(\d+), (~\d+|<1) min left", text):
        said.setdefault(int(m.group(1)), m.group(3))  # the first estimate printed in each minute
    print(f"bar ran {end / 60:.1f} min; first estimate at minute {min(said) if said else 'none'}")
    for minute, figure in sorted(said.items()):
        print(f"minute {minute:2d}: {(end - minute * 60) / 60:4.1f} min left; the bar said {figure.lstrip('~')} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["replay", "bar", "cells"])
    parser.add_argument("log", type=Path, help="the log of a standard run (what `opd-bench run` printed)")
    parser.add_argument("other", type=Path, nargs="?", help="cells: the second run's log")
    args = parser.parse_args()
    if args.mode == "cells":
        if args.other is None:
            parser.error("cells compares two logs: give a second one")
        cells(args.log, args.other)
    else:
        (replay if args.mode == "replay" else bar)(args.log)


if __name__ == "__main__":
    main()
