"""A leaderboard of submitted ``results.json`` files.

Layout under ``root`` (default ``leaderboard/``)::

    submissions/<suite>/<name>.json   one validated results.json each, plus a "submission" block
    README.md                         the ranked table, one section per suite (``rebuild``)
    leaderboard.csv                   the same rows, machine-readable (``rebuild``)

``validate`` checks a results dict against schema version 1 and the *installed* suite (its
version and the sha256 of every prompt file), so scores on edited prompt sets cannot be listed
beside the real ones. ``submit`` refuses anything invalid, unsafe names and duplicates without
touching the directory; ``rebuild`` regenerates README.md and leaderboard.csv deterministically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from opd_bench.io import atomic_write_bytes

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STUDENT_METHODS = ("opd", "opd-ppo", "multi-reward", "cascade")
UNBOUNDED = frozenset({"pref"})  # finite, any value; every other benchmark is a score in [0, 1]
METHOD_ORDER = ("opd", "opd-ppo", "multi-reward", "cascade", "base")


class SubmissionError(ValueError):
    """A results file or submission request that cannot be accepted; the message names the fix."""


# --------------------------------------------------------------------------------------------
# Validation


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def suite_benchmarks(suite) -> list[str]:
    """The suite's benchmarks: its tasks, then each task's extra evaluation-only rewards."""
    names = list(suite.tasks)
    for task in suite.tasks:
        names += [k for k in suite.benchmark(task).extra_rewards if k not in names]
    return names


def _known_methods(suite) -> list[str]:
    return ["base"] + [f"teacher/{t}" for t in suite.tasks] + list(STUDENT_METHODS)


def _check_score(where: str, bench: str, value: Any) -> None:
    if not _finite(value):
        raise SubmissionError(f"{where} is {value!r}, not a finite number; re-run the evaluation that produced it")
    if bench not in UNBOUNDED and not 0.0 <= value <= 1.0:
        raise SubmissionError(f"{where} = {value!r} is outside [0, 1] ({bench} is a score in [0, 1]); "
                              "the file is corrupt or was edited, submit the results.json written by `opd-bench run`")


def validate(results: dict) -> None:
    """Raise ``SubmissionError`` (one line: the problem and the fix) unless ``results`` can be listed."""
    if not isinstance(results, dict):
        raise SubmissionError(f"results must be a JSON object, got {type(results).__name__}; "
                              "submit the results.json written by `opd-bench run`")
    version = results.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SubmissionError(f"schema_version is {version!r}, this opd-bench reads version {SCHEMA_VERSION}; "
                              "re-run with this opd-bench version or upgrade opd-bench")

    from opd_bench import suites

    name = results.get("suite")
    if not isinstance(name, str):
        raise SubmissionError(f"'suite' is {name!r}; it must name the suite the run used, e.g. \"tiny\"")
    try:
        suite = suites.get(name)
    except KeyError as error:
        raise SubmissionError(f"{error}; only runs on an installed suite can be submitted") from None
    if results.get("suite_version") != suite.version:
        raise SubmissionError(f"suite_version is {results.get('suite_version')!r} but the installed {name} suite is "
                              f"{suite.version!r}; re-run the benchmark with the installed suite")

    hashes = results.get("prompt_hashes")
    if not isinstance(hashes, dict):
        raise SubmissionError("'prompt_hashes' is missing; re-run with `opd-bench run`, which records them")
    for task in suite.tasks:
        spec = suite.benchmark(task)
        splits = ("test", "train") if spec.train_file else ("test",)
        for split in splits:
            got = hashes.get(task, {}).get(split) if isinstance(hashes.get(task), dict) else None
            if got != spec.file_hash(split):
                raise SubmissionError(
                    f"prompt_hashes[{task!r}][{split!r}] does not match the installed {name} suite's {split} prompt "
                    f"file for {task} (got {str(got)[:12]}...); the run used other prompts, re-run with the installed suite"
                )

    seeds = results.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SubmissionError(f"'seeds' is {seeds!r}; it must be a non-empty list of integers, as `opd-bench run` writes")
    if len(set(seeds)) != len(seeds):
        raise SubmissionError(f"'seeds' {seeds!r} has repeats; each seed must be a distinct run")

    model = results.get("model")
    if not isinstance(model, str) or not model.strip():
        raise SubmissionError(f"'model' is {model!r}; it must name the model the run trained (e.g. \"tiny\")")

    required = suite_benchmarks(suite)
    listed = results.get("benchmarks")
    if not isinstance(listed, list) or not set(required) <= set(listed):
        raise SubmissionError(f"'benchmarks' is {listed!r} but must include every {name} benchmark {required}; "
                              "evaluate on the full suite")
    headline = results.get("headline")
    if (not isinstance(headline, list) or not headline or not all(isinstance(h, str) for h in headline)
            or not set(headline) <= set(required) or set(headline) & UNBOUNDED):
        raise SubmissionError(f"'headline' is {headline!r}; it must be a non-empty list of the suite's [0, 1] "
                              f"benchmarks ({[b for b in required if b not in UNBOUNDED]})")

    expected = getattr(suite, "headline", None)
    if expected is not None and set(headline) != set(expected):
        raise SubmissionError(f"'headline' is {headline!r} but the {name} suite's headline benchmarks are "
                              f"{list(expected)!r}; the overall score must use the suite's own headline")

    scores = results.get("results")
    if not isinstance(scores, dict) or not scores:
        raise SubmissionError("'results' is missing or empty; submit a run that evaluated at least one method")
    known = _known_methods(suite)
    if not any(m in STUDENT_METHODS for m in scores):
        raise SubmissionError(f"'results' has no student method ({', '.join(STUDENT_METHODS)}); "
                              "submit a run that trained at least one")
    for method, per_bench in scores.items():
        if method not in known:
            raise SubmissionError(f"results has unknown method {method!r}; known methods: {', '.join(known)}")
        if not isinstance(per_bench, dict):
            raise SubmissionError(f"results[{method!r}] must be an object of benchmarks; re-run the evaluation")
        for bench in required:
            where = f"results[{method!r}][{bench!r}]"
            entry = per_bench.get(bench)
            if not isinstance(entry, dict):
                raise SubmissionError(f"{where} is missing; every method must be evaluated on every {name} "
                                      f"benchmark ({', '.join(required)}), re-run the evaluation on the full suite")
            _check_score(f"{where}['mean']", bench, entry.get("mean"))
            std = entry.get("std")
            if not _finite(std) or std < 0:
                raise SubmissionError(f"{where}['std'] is {std!r}; it must be a finite number >= 0")
            per_seed = entry.get("per_seed")
            if not isinstance(per_seed, list) or len(per_seed) not in {1, len(seeds)}:
                raise SubmissionError(f"{where}['per_seed'] must be a list with one value per seed ({len(seeds)}) "
                                      "or a single value; re-run the evaluation")
            for i, value in enumerate(per_seed):
                _check_score(f"{where}['per_seed'][{i}]", bench, value)
            mean = sum(per_seed) / len(per_seed)
            if not math.isclose(mean, entry["mean"], rel_tol=1e-5, abs_tol=1e-6):
                raise SubmissionError(f"{where}['mean'] = {entry['mean']!r} is not the mean of its per_seed values "
                                      f"({mean!r}); the file was edited, submit the results.json written by `opd-bench run`")

    compute = results.get("compute", {})
    if not isinstance(compute, dict):
        raise SubmissionError("'compute' must be an object of per-method budgets; re-run with `opd-bench run`")
    for method, budget in compute.items():
        if not isinstance(budget, dict):
            raise SubmissionError(f"compute[{method!r}] must be an object; re-run with `opd-bench run`")
        for key, value in budget.items():
            if key in ("optimizer_steps", "student_forwards", "teacher_forwards", "images", "wall_seconds") and (
                    not _finite(value) or value < 0):
                raise SubmissionError(f"compute[{method!r}][{key!r}] is {value!r}; it must be a finite number >= 0")


# --------------------------------------------------------------------------------------------
# Submitting


def check_name(name: Any) -> str:
    if (not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name
            or "/" in name or "\\" in name or os.sep in name):
        raise SubmissionError(
            f"submission name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit, without '..' or path separators (e.g. --name opd-lr3e-4)"
        )
    return name


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SubmissionError(f"cannot read {path} ({error.strerror}); pass a run directory with a results.json") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SubmissionError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); "
                              "submit the results.json written by `opd-bench run`") from None


def _results_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".json" and run_dir.is_file() else run_dir / "results.json"


def submit(run_dir: str | Path, name: str, root: str | Path = "leaderboard") -> Path:
    """Validate ``run_dir/results.json`` and store it as ``root/submissions/<suite>/<name>.json``.

    ``run_dir`` may also be the results file itself. Nothing under ``root`` changes on a refusal.
    Run ``rebuild(root)`` (``opd-bench leaderboard``) afterwards to regenerate the tables.
    """
    check_name(name)
    path = _results_path(run_dir)
    if not path.is_file():
        raise SubmissionError(f"{path} does not exist; pass the run directory written by `opd-bench run --out`")
    results = _load(path)
    validate(results)
    folder = Path(root) / "submissions" / results["suite"]
    target = folder / f"{name}.json"
    if folder.is_dir() and any(p.name.lower() == target.name.lower() for p in folder.iterdir()):
        raise SubmissionError(f"a submission named {name!r} already exists for suite {results['suite']!r} "
                              f"({target}); choose another --name")
    record = {key: value for key, value in results.items() if key != "submission"}
    record["submission"] = {"name": name, "submitted": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    # Publish without ever overwriting: write a temporary file, then hard-link it to the final name
    # (fails if the name appeared meanwhile); fall back to a checked rename where links are unsupported.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise SubmissionError(f"a submission named {name!r} already exists ({target}); choose another --name") from None
        except OSError:
            if target.exists():
                raise SubmissionError(f"a submission named {name!r} already exists ({target}); choose another --name") from None
            os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# Rebuilding the tables


def _method_key(method: str) -> tuple:
    if method in METHOD_ORDER:
        return (0, METHOD_ORDER.index(method), method)
    return (1, 0, method)


def _f(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _finite(value) else ""


def _rows(root: Path) -> tuple[list[dict], list[str], dict[str, list[str]]]:
    """Rows for every valid submission, the benchmark columns per suite, and skipped files with reasons."""
    rows: list[dict] = []
    skipped: list[str] = []
    bench_by_suite: dict[str, list[str]] = {}
    for path in sorted((root / "submissions").glob("*/*.json")):
        where = path.relative_to(root).as_posix()
        try:
            results = _load(path)
            validate(results)
            if results["suite"] != path.parent.name:
                raise SubmissionError(f"suite {results['suite']!r} does not match its folder {path.parent.name!r}")
        except SubmissionError as error:
            skipped.append(f"{where}: {error}")
            continue
        name = path.stem
        benches = list(results["benchmarks"])
        columns = bench_by_suite.setdefault(results["suite"], [])
        columns += [b for b in benches if b not in columns]
        compute = results.get("compute") if isinstance(results.get("compute"), dict) else {}
        for method in sorted(results["results"], key=_method_key):
            scores = results["results"][method]
            budget = compute.get(method, {})
            forwards = None
            if _finite(budget.get("student_forwards")) or _finite(budget.get("teacher_forwards")):
                forwards = sum(budget.get(k, 0) if _finite(budget.get(k)) else 0 for k in ("student_forwards", "teacher_forwards"))
            rows.append({
                "submission": name,
                "method": method,
                "kind": "student" if method in STUDENT_METHODS else "reference",
                "model": results["model"],
                "suite": results["suite"],
                "overall": sum(scores[b]["mean"] for b in results["headline"]) / len(results["headline"]),
                "scores": {b: (scores[b]["mean"], scores[b]["std"]) for b in benches if b in scores},
                "optimizer_steps": budget.get("optimizer_steps") if _finite(budget.get("optimizer_steps")) else None,
                "forward_passes": forwards,
                "seeds": " ".join(str(s) for s in results["seeds"]) if method in STUDENT_METHODS
                else " ".join(str(s) for s in results["seeds"][: len(scores[benches[0]]["per_seed"])]),
                "date": str(results.get("date") or ""),
            })
    # Sort: suite, overall descending (rounded, so ties are exact and stable), submission, method.
    rows.sort(key=lambda r: (r["suite"], -round(r["overall"], 9), r["submission"], _method_key(r["method"])))
    for suite in bench_by_suite:
        students = [r for r in rows if r["suite"] == suite and r["kind"] == "student"]
        for r in students:
            r["rank"] = 1 + sum(1 for o in students if round(o["overall"], 9) > round(r["overall"], 9))
    return rows, skipped, bench_by_suite


def _csv(rows: list[dict], bench_by_suite: dict[str, list[str]]) -> bytes:
    benches: list[str] = []
    for columns in bench_by_suite.values():
        benches += [b for b in columns if b not in benches]
    header = ["rank", "submission", "method", "kind", "model", "suite", "overall"]
    for b in benches:
        header += [f"{b}_mean", f"{b}_std"]
    header += ["optimizer_steps", "forward_passes", "seeds", "date"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [r.get("rank", ""), r["submission"], r["method"], r["kind"], r["model"], r["suite"], _f(r["overall"])]
        for b in benches:
            mean, std = r["scores"].get(b, (None, None))
            line += [_f(mean), _f(std)]
        line += ["" if r["optimizer_steps"] is None else str(int(r["optimizer_steps"])),
                 "" if r["forward_passes"] is None else str(int(round(r["forward_passes"]))), r["seeds"], r["date"]]
        writer.writerow(line)
    return buffer.getvalue().encode("utf-8")


HEADER = """# opd-bench leaderboard

DiffusionOPD (`opd`), its PPO-style variant (`opd-ppo`), multi-reward RL and cascade RL, trained by
`opd-bench run --method all` and evaluated on the suite's held-out test prompts.

**How entries are made.** Run the benchmark, then submit its run directory and regenerate this page:

```bash
opd-bench run --method all --out runs/NAME
opd-bench submit runs/NAME --name NAME
opd-bench leaderboard
```

**How entries are validated.** `submit` accepts a `results.json` (schema version 1) only if its suite
and suite version are installed, the sha256 of every prompt file (test and train) matches the
installed suite, every method reports every benchmark of the suite, every score is finite and in
range ([0, 1], except the unbounded learned `pref` score), each mean is the mean of its per-seed
values, and the seeds are a non-empty list of integers. Names are 1-64 letters, digits, `.`, `_`
or `-`; an existing name is never overwritten. Files under `submissions/` that no longer validate
(e.g. after a suite update) are listed below instead of ranked.

**Columns.** `overall` is the mean of the suite's headline benchmarks (each in [0, 1]); benchmark
cells are mean ± std over seeds; `steps` are student optimizer steps and `forwards` transformer
forward passes (student + teacher) of one run (mean over seeds; teachers' training is listed in the
teacher rows). Student methods are ranked by `overall`; `base` and `teacher/*` rows are
references (no rank). Machine-readable copy: [`leaderboard.csv`](leaderboard.csv).
"""


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _readme(rows: list[dict], skipped: list[str], bench_by_suite: dict[str, list[str]]) -> bytes:
    out = [HEADER]
    if not rows:
        out.append("No submissions yet.\n")
    for suite in sorted(bench_by_suite):
        benches = bench_by_suite[suite]
        out.append(f"## Suite `{suite}`\n")
        header = ["rank", "submission", "method", "model", "overall"] + benches + ["steps", "forwards", "seeds", "date"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h not in ("submission", "method", "model", "seeds", "date") else "---" for h in header) + "|"]
        for r in (r for r in rows if r["suite"] == suite):
            cells = [str(r.get("rank", "")), r["submission"], r["method"] if r["kind"] == "student" else f"*{r['method']}*",
                     r["model"], f"{r['overall']:.3f}"]
            for b in benches:
                mean, std = r["scores"].get(b, (None, None))
                cells.append("" if mean is None else f"{mean:.3f} ± {std:.3f}")
            cells += ["" if r["optimizer_steps"] is None else f"{int(r['optimizer_steps']):,}",
                      "" if r["forward_passes"] is None else f"{int(round(r['forward_passes'])):,}",
                      r["seeds"], r["date"][:10]]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
        out.append("\n".join(lines) + "\n")
    if skipped:
        out.append("## Not listed (no longer valid)\n")
        out.append("\n".join(f"- {_md(s)}" for s in skipped) + "\n")
    return "\n".join(out).encode("utf-8")




def rebuild(root: str | Path = "leaderboard") -> tuple[Path, Path]:
    """Regenerate ``root/README.md`` and ``root/leaderboard.csv`` from ``root/submissions``."""
    root = Path(root)
    rows, skipped, bench_by_suite = _rows(root)
    readme, table = root / "README.md", root / "leaderboard.csv"
    atomic_write_bytes(table, _csv(rows, bench_by_suite))
    atomic_write_bytes(readme, _readme(rows, skipped, bench_by_suite))
    return readme, table
