"""A leaderboard of submitted ``results.json`` files.

Layout under ``root`` (default ``leaderboard/``)::

    submissions/<suite>/<name>.json   one validated results.json each, plus a "submission" block
    README.md                         the ranked tables (``rebuild``)
    leaderboard.csv                   the same rows, machine-readable (``rebuild``)

``check_results`` checks a results dict's shape and internal consistency against the *installed*
suite (its version, the sha256 of every prompt file, and, from schema 2 on, that every per-seed score
is the suite's aggregate of the recorded per-image scores and every mean and std those of the
per-seed scores). ``validate`` adds what a listing needs: the current schema, a listed preset
(never ``smoke``) and the preset's training budget. ``submit`` also re-evaluates a sample of the
run from its adapters (``opd_bench.verify``) and refuses what does not reproduce, unless told to
list it as unverified; it refuses anything invalid, oversized, unsafe names and duplicates
without touching the directory. ``rebuild`` regenerates README.md and leaderboard.csv
deterministically: verified entries ranked per suite and preset, unverified and schema-1
("legacy") entries in a separate table without ranks.
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
from typing import Any, Callable

from opd_bench.io import atomic_write_bytes, json_text

# The result file's version: what `opd-bench run` writes and `submit` takes.
# 2: per-image scores of the final evaluations, the seeds of every result cell, adapter hashes.
# 3: config['eval']['seed'], the noise seed of every final evaluation (in 2, each cell's training seed).
# Versions 1 and 2 are still read (report, leaderboard); 1 is listed as legacy, never verified or submitted.
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
MAX_FILE_BYTES = 2 * 1024 * 1024  # results.json and every stored submission; the standard tiny run is ~0.2 MB
LISTED_PRESETS = ("standard", "paper")  # smoke runs check the pipeline; their scores are not results
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STUDENT_METHODS = ("opd", "opd-ppo", "multi-reward", "cascade")
UNBOUNDED = frozenset({"pref"})  # finite, any value; every other benchmark is a score in [0, 1]
METHOD_ORDER = ("opd", "opd-ppo", "multi-reward", "cascade", "base")


def eval_noise_seed(eval_seed: int | None, cell_seed: int) -> int:
    """The noise seed a cell's final evaluation draws with: the run's one ``config['eval']['seed']``,
    or, where that is null (schema 2), the cell's own training seed."""
    return cell_seed if eval_seed is None else eval_seed


def _recorded_eval_seed(results: dict) -> Any:
    """``config['eval']['seed']`` as recorded (None where absent or the file is malformed)."""
    config = results.get("config")
    evaluation = config.get("eval") if isinstance(config, dict) else None
    return evaluation.get("seed") if isinstance(evaluation, dict) else None


def paired_evaluation(results: dict) -> bool:
    """Whether every model of a result file was scored on one noise seed, so that image ``i`` of
    any two models shows the same prompt from the same starting noise and their images pair up."""
    seed = _recorded_eval_seed(results)
    return isinstance(seed, int) and not isinstance(seed, bool)


class SubmissionError(ValueError):
    """A results file or submission request that cannot be accepted; the message names the fix."""


# --------------------------------------------------------------------------------------------
# Validation


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The transformer forward passes a method is charged for: its own, the teachers' (DiffusionOPD) and
# the frozen reference model's (GRPO's KL penalty to the base). Results without a kind count it 0.
FORWARD_KEYS = ("student_forwards", "teacher_forwards", "reference_forwards")


def total_forwards(budget: dict) -> float | None:
    """A method's forward passes of every kind, or None where it records none."""
    values = [budget[key] for key in FORWARD_KEYS if _finite(budget.get(key))]
    return float(sum(values)) if values else None


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


def _sample_std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _edited(where: str, what: str, got: Any, expected: Any) -> SubmissionError:
    return SubmissionError(f"{where} = {got!r} is not {what} ({expected!r}); the file was edited, "
                           "submit the results.json written by `opd-bench run`")


def _check_per_image(results: dict, suite, method: str, seed: int, bench: str, expected: float, cache: dict) -> None:
    """Schema 2: the per-seed score must be the suite's aggregate of the recorded per-image scores."""
    from opd_bench.benchmarks import aggregate

    where = f"per_image[{method!r}][{str(seed)!r}][{bench!r}]"
    task = bench if bench in suite.tasks else next(t for t in suite.tasks if bench in suite.benchmark(t).extra_rewards)
    spec = suite.benchmark(task)
    evaluation = results.get("config", {}).get("eval") if isinstance(results.get("config"), dict) else None
    limit, repeats = (evaluation.get("limit"), evaluation.get("images_per_prompt")) if isinstance(evaluation, dict) else (0, 0)
    if not (limit is None or (isinstance(limit, int) and limit > 0)) or not (repeats is None or (isinstance(repeats, int) and repeats > 0)):
        raise SubmissionError("config['eval'] must give the final evaluation's 'limit' and 'images_per_prompt' "
                              "(integers or null); submit the results.json written by `opd-bench run`")
    repeats = repeats or spec.images_per_prompt
    if (task, limit, repeats) not in cache:  # reading a prompt file costs more than all the other checks
        cache[task, limit, repeats] = [p.metadata for p in spec.prompts("test", limit) for _ in range(repeats)]
    metadata = cache[task, limit, repeats]
    values = results.get("per_image", {}).get(method, {}).get(str(seed), {}).get(bench) \
        if isinstance(results.get("per_image"), dict) else None
    if not isinstance(values, list) or len(values) != len(metadata):
        raise SubmissionError(f"{where} must list the {len(metadata)} scores of the final evaluation's images; "
                              "submit the results.json written by `opd-bench run`")
    for i, value in enumerate(values):
        if value is not None:
            _check_score(f"{where}[{i}]", bench, value)
    metric = spec.metric if bench == task else "mean"
    score = aggregate(metric, [math.nan if v is None else v for v in values], metadata)["score"]
    if not math.isclose(score, expected, rel_tol=1e-5, abs_tol=1e-5):
        raise _edited(f"results[{method!r}][{bench!r}] seed {seed}", "the score of its per-image values", expected, score)


def check_results(results: dict) -> None:
    """Raise ``SubmissionError`` (one line: the problem and the fix) unless ``results`` is a
    well-formed, internally consistent result file (schema 1, 2 or 3) of an installed suite."""
    if not isinstance(results, dict):
        raise SubmissionError(f"results must be a JSON object, got {type(results).__name__}; "
                              "submit the results.json written by `opd-bench run`")
    version = results.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise SubmissionError(f"schema_version is {version!r}, this opd-bench reads versions {list(READABLE_SCHEMAS)}; "
                              "re-run with this opd-bench version or upgrade opd-bench")
    seed = _recorded_eval_seed(results)
    if version >= 3 and (isinstance(seed, bool) or not (seed is None or isinstance(seed, int))):
        raise SubmissionError(f"config['eval']['seed'] is {seed!r}; it must be the final evaluation's noise seed "
                              "(an integer, or null for each cell's own seed); submit the results.json written by `opd-bench run`")

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
    # A shipped base alias ('tiny') names different weights in different releases: scores made on
    # another base are not comparable with the installed one's, nor verifiable. Schema 1 files
    # predate the fingerprint (they are listed as legacy).
    model = results.get("model")
    installed = suites.model_fingerprint(model) if isinstance(model, str) and version != 1 else None
    if installed is not None and results.get("model_sha256") != installed:
        raise SubmissionError(f"model_sha256 is {results.get('model_sha256')!r} but the installed {model!r} base "
                              f"is {installed!r}; re-run the benchmark with the installed base")

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
    prompt_cache: dict = {}
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
            if version == 1:  # per_seed: one value per run seed, or the first seed's alone
                cell_seeds = seeds if isinstance(per_seed, list) and len(per_seed) == len(seeds) else seeds[:1]
            else:
                cell_seeds = entry.get("seeds")
                first = per_bench[required[0]].get("seeds") if isinstance(per_bench.get(required[0]), dict) else None
                if (not isinstance(cell_seeds, list) or not cell_seeds or cell_seeds != first
                        or not all(isinstance(s, int) and not isinstance(s, bool) for s in cell_seeds)
                        or not set(cell_seeds) <= set(seeds) or len(set(cell_seeds)) != len(cell_seeds)):
                    raise SubmissionError(f"{where}['seeds'] is {cell_seeds!r}; it must list distinct seeds of the run "
                                          f"({seeds}), the same for every benchmark of {method}; "
                                          "submit the results.json written by `opd-bench run`")
            if not isinstance(per_seed, list) or len(per_seed) != len(cell_seeds):
                raise SubmissionError(f"{where}['per_seed'] must be a list with one value per seed of the cell "
                                      f"({len(cell_seeds)}); re-run the evaluation")
            for i, value in enumerate(per_seed):
                _check_score(f"{where}['per_seed'][{i}]", bench, value)
            mean = sum(per_seed) / len(per_seed)
            if not math.isclose(mean, entry["mean"], rel_tol=1e-5, abs_tol=1e-6):
                raise _edited(f"{where}['mean']", "the mean of its per_seed values", entry["mean"], mean)
            if not math.isclose(_sample_std(per_seed), std, rel_tol=1e-5, abs_tol=1e-6):
                raise _edited(f"{where}['std']", "the standard deviation of its per_seed values", std, _sample_std(per_seed))
            if version >= 2:
                for seed, value in zip(cell_seeds, per_seed):
                    _check_per_image(results, suite, method, seed, bench, value, prompt_cache)
        if version >= 2 and method != "base":
            for seed in per_bench[required[0]]["seeds"]:
                record = results.get("artifacts", {}).get(method, {}).get(str(seed)) \
                    if isinstance(results.get("artifacts"), dict) else None
                path = record.get("path") if isinstance(record, dict) else None
                if (not isinstance(path, str) or path.startswith(("/", "\\")) or ".." in Path(path).parts
                        or not re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256")))):
                    raise SubmissionError(f"artifacts[{method!r}][{str(seed)!r}] must give the adapter's path inside the "
                                          "run folder and its sha256; submit the results.json written by `opd-bench run`")

    compute = results.get("compute", {})
    if not isinstance(compute, dict):
        raise SubmissionError("'compute' must be an object of per-method budgets; re-run with `opd-bench run`")
    for method, budget in compute.items():
        if not isinstance(budget, dict):
            raise SubmissionError(f"compute[{method!r}] must be an object; re-run with `opd-bench run`")
        for key, value in budget.items():
            if key in ("optimizer_steps", *FORWARD_KEYS, "images", "wall_seconds") and (
                    not _finite(value) or value < 0):
                raise SubmissionError(f"compute[{method!r}][{key!r}] is {value!r}; it must be a finite number >= 0")


def _model_label(results: dict) -> str:
    """The model, with its precision where it was not float32 (another experiment, e.g. ``sd35m (bfloat16)``)."""
    loading = results.get("config", {}).get("model") if isinstance(results.get("config"), dict) else None
    dtype = loading.get("dtype") if isinstance(loading, dict) else None
    return str(results["model"]) + (f" ({dtype})" if dtype not in (None, "float32") else "")


def _budget(config: dict, method: str) -> Any:
    """A student method's configured optimizer steps (cascade: its stages' sum), or None."""
    section = config.get(method) if isinstance(config, dict) else None
    if not isinstance(section, dict):
        return None
    if method == "cascade":
        stages = section.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, list) and len(s) == 2 and _finite(s[1]) for s in stages):
            return None
        return sum(s[1] for s in stages)
    return section.get("steps")


def check_listable(results: dict) -> None:
    """What a listing needs beyond a consistent file: a listed preset and that preset's budget."""
    preset = results.get("preset")
    if preset not in LISTED_PRESETS:
        raise SubmissionError(f"preset is {preset!r}; only {' or '.join(LISTED_PRESETS)} runs are listed (smoke runs "
                              "check the pipeline, their scores are not results), submit a --preset standard run")
    from dataclasses import asdict

    from opd_bench.harness import plan  # the installed definition of the preset

    planned = plan(preset)
    # through JSON, as results.json holds it (the cascade's stages become lists)
    expected_config = json.loads(json.dumps({"opd": asdict(planned.opd), "opd-ppo": asdict(planned.opd_ppo),
                                             "multi-reward": asdict(planned.multi_reward), "cascade": asdict(planned.cascade)}))
    compute = results.get("compute") if isinstance(results.get("compute"), dict) else {}
    for method in (m for m in STUDENT_METHODS if m in results["results"]):
        configured, expected = _budget(results.get("config"), method), _budget(expected_config, method)
        if configured != expected:
            raise SubmissionError(f"config[{method!r}] trains {configured!r} optimizer steps but the {preset} preset trains "
                                  f"{expected!r}; submit an unmodified --preset {preset} run")
        steps = compute.get(method, {}).get("optimizer_steps") if isinstance(compute.get(method), dict) else None
        if steps != expected:
            raise SubmissionError(f"compute[{method!r}]['optimizer_steps'] is {steps!r} but the {preset} preset trains "
                                  f"{expected!r}; submit a finished, unmodified --preset {preset} run")


def validate(results: dict) -> None:
    """Raise ``SubmissionError`` (one line: the problem and the fix) unless ``results`` can be submitted:
    a consistent file of the current schema, of a listed preset with that preset's budget."""
    check_results(results)
    if results["schema_version"] != SCHEMA_VERSION:
        raise SubmissionError(f"schema_version is {results['schema_version']!r}; submissions need version {SCHEMA_VERSION} "
                              "(per-image scores, adapter hashes and one evaluation noise seed, so they can be verified), re-run with this opd-bench")
    check_listable(results)


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


def read_results(path: str | Path) -> dict:
    """Parse a result file, refusing it before reading when it is over ``MAX_FILE_BYTES``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise SubmissionError(f"cannot read {path} ({error.strerror}); pass a run directory with a results.json") from None
    if size > MAX_FILE_BYTES:
        raise SubmissionError(f"{path} is {size / 2**20:.1f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB cap for result "
                              "files; submit the results.json written by `opd-bench run`")
    return _load(path)


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


def submit(run_dir: str | Path, name: str, root: str | Path = "leaderboard", *, unverified: bool = False,
           verify: Callable[[Path], dict] | None = None) -> Path:
    """Validate and verify ``run_dir/results.json`` and store it as ``root/submissions/<suite>/<name>.json``.

    ``run_dir`` may also be the results file itself (its folder must hold the run's adapters).
    ``verify(run_dir) -> report`` re-evaluates a sample from the adapters (default:
    ``opd_bench.verify.verify_run``); a run whose report is not ``ok`` is refused, unless
    ``unverified``, which stores it without verifying for the separate, unranked unverified table.
    Nothing under ``root`` changes on a refusal. Run ``rebuild(root)`` (``opd-bench leaderboard``)
    afterwards to regenerate the tables.
    """
    check_name(name)
    path = _results_path(run_dir)
    if not path.is_file():
        raise SubmissionError(f"{path} does not exist; pass the run directory written by `opd-bench run --out`")
    results = read_results(path)
    validate(results)
    folder = Path(root) / "submissions" / results["suite"]
    target = folder / f"{name}.json"
    if folder.is_dir() and any(p.name.lower() == target.name.lower() for p in folder.iterdir()):
        raise SubmissionError(f"a submission named {name!r} already exists for suite {results['suite']!r} "
                              f"({target}); choose another --name")
    verified = None
    if not unverified:
        if verify is None:
            from opd_bench.verify import verify_run as verify
        report = verify(path.parent)
        if not report["ok"]:
            first = report["mismatches"][0]
            raise SubmissionError(
                f"{path.parent} does not verify: {len(report['mismatches'])} re-generated images score differently, e.g. "
                f"{first['model']} seed {first['seed']} {first['benchmark']} image {first['image']}: recorded "
                f"{first['recorded']}, now {first['recomputed']:.6g}; submit an unedited run, or pass --unverified "
                "to list it in the unverified table"
            )
        verified = {key: report.get(key) for key in ("prompts_per_benchmark", "images_checked", "tolerance", "salt")}
        verified["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {key: value for key, value in results.items() if key != "submission"}
    record["submission"] = {"name": name, "submitted": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "verified": verified}
    data = json_text(record, compact_lists=True).encode("utf-8")
    if len(data) > MAX_FILE_BYTES:
        raise SubmissionError(f"the stored submission would be {len(data) / 2**20:.1f} MiB, over the "
                              f"{MAX_FILE_BYTES / 2**20:.0f} MiB cap; submit the results.json written by `opd-bench run`")
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


def _status(results: dict) -> str:
    """verified (re-evaluated by `submit`), unverified (submitted with --unverified) or legacy (schema 1)."""
    if results["schema_version"] < 2:
        return "legacy"
    submission = results.get("submission")
    return "verified" if isinstance(submission, dict) and isinstance(submission.get("verified"), dict) else "unverified"


def _rows(root: Path) -> tuple[list[dict], list[str], dict[str, list[str]]]:
    """Rows for every valid submission, the benchmark columns per suite, and skipped files with reasons."""
    rows: list[dict] = []
    skipped: list[str] = []
    bench_by_suite: dict[str, list[str]] = {}
    for path in sorted((root / "submissions").glob("*/*.json")):
        where = path.relative_to(root).as_posix()
        try:
            results = read_results(path)
            check_results(results)
            check_listable(results)
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
            forwards = total_forwards(budget)
            first = scores[benches[0]]
            seeds = first.get("seeds") or (results["seeds"] if len(first["per_seed"]) == len(results["seeds"]) else results["seeds"][:1])
            rows.append({
                "submission": name,
                "method": method,
                "kind": "student" if method in STUDENT_METHODS else "reference",
                "status": _status(results),
                "preset": results["preset"],
                "model": _model_label(results),
                "suite": results["suite"],
                "overall": sum(scores[b]["mean"] for b in results["headline"]) / len(results["headline"]),
                "scores": {b: (scores[b]["mean"], scores[b]["std"]) for b in benches if b in scores},
                "optimizer_steps": budget.get("optimizer_steps") if _finite(budget.get("optimizer_steps")) else None,
                "forward_passes": forwards,
                "seeds": " ".join(str(s) for s in seeds),
                "date": str(results.get("date") or ""),
            })
    # Sort: verified first, suite, preset, overall descending (rounded, so ties are exact and stable),
    # submission, method. Only verified student rows are ranked, within their suite and preset.
    rows.sort(key=lambda r: (r["status"] != "verified", r["suite"], r["preset"], -round(r["overall"], 9),
                             r["submission"], _method_key(r["method"])))
    for r in rows:
        if r["status"] == "verified" and r["kind"] == "student":
            r["rank"] = 1 + sum(1 for o in rows if o["status"] == "verified" and o["kind"] == "student"
                                and (o["suite"], o["preset"]) == (r["suite"], r["preset"])
                                and round(o["overall"], 9) > round(r["overall"], 9))
    return rows, skipped, bench_by_suite


def _csv(rows: list[dict], bench_by_suite: dict[str, list[str]]) -> bytes:
    benches: list[str] = []
    for columns in bench_by_suite.values():
        benches += [b for b in columns if b not in benches]
    header = ["rank", "status", "submission", "method", "kind", "model", "suite", "preset", "overall"]
    for b in benches:
        header += [f"{b}_mean", f"{b}_std"]
    header += ["optimizer_steps", "forward_passes", "seeds", "date"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [r.get("rank", ""), r["status"], r["submission"], r["method"], r["kind"], r["model"], r["suite"],
                r["preset"], _f(r["overall"])]
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

**How entries are made.** Run the benchmark (preset `standard`, or `paper` for real models; smoke
runs are refused), then submit its run directory and regenerate this page:

```bash
opd-bench run --method all --out runs/NAME
opd-bench submit runs/NAME --name NAME
opd-bench leaderboard
```

**How entries are checked.** `submit` accepts a `results.json` (schema version 3, at most 2 MiB)
only if its suite and suite version are installed, the sha256 of every prompt file (test and train)
matches the installed suite, a run of a shipped base (`tiny`) used the installed base's weights (its
recorded fingerprint: a new release's base makes older entries no longer valid), every method
reports every benchmark of the suite, every score is finite and in range ([0, 1], except the
unbounded learned `pref` score), every per-seed score is the suite's aggregate of the recorded
per-image scores and every mean and std those of the per-seed scores, and the preset is `standard`
or `paper` with that preset's number of optimizer steps. It then **verifies** the run (`opd-bench
verify RUN_DIR`): it checks the sha256 of every trained adapter in the run folder, regenerates 8
test prompts per benchmark (chosen by a hash of the run's identity and adapter hashes) for every
model and seed with the recorded seeds and sampler settings, scores them and compares every image
with its recorded score (within 1e-3; one image per model, seed and benchmark may differ, a
detection or OCR read flipped by float rounding). Runs that do not verify are refused; `submit
--unverified` lists them, unranked, in the separate unverified table. Names are 1-64 letters,
digits, `.`, `_` or `-`; an existing name is never overwritten. Files under `submissions/` that no
longer validate (e.g. after a suite update) are listed at the end instead.

**What verification does not prove.** The sample is drawn from the run's own adapters, so scores
cannot be edited without changing images that may be re-checked, but the sample can be computed
by anyone: a maintainer re-checks an entry with the submitter's run folder and
`opd-bench verify RUN_DIR --salt ANYTHING --prompts 32`, and the adapter hashes in the entry tie it
to those weights. The training budget is checked against the preset's configuration, not
re-trained: compute beyond the declared budget cannot be detected.

**Columns.** `model` is the base model, with its precision where a run loaded it in another than
float32 (`--dtype`; the default on a GPU is bfloat16). `overall` is the mean of the suite's headline benchmarks (each in [0, 1]); benchmark
cells are mean ± std over seeds (the mean alone for a single seed); `steps` are student optimizer steps and `forwards` transformer
forward passes (student + teacher + the frozen reference of a KL penalty) of one run (mean over seeds; teachers' training is listed in the
teacher rows). Verified student methods are ranked by `overall` within their suite and preset;
`base` and `teacher/*` rows are references (no rank). Machine-readable copy:
[`leaderboard.csv`](leaderboard.csv).
"""


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict], benches: list[str], ranked: bool) -> str:
    header = (["rank"] if ranked else ["status"]) + ["submission", "method", "model", "preset", "overall"] + benches
    header += ["steps", "forwards", "seeds", "date"]
    text = ("submission", "method", "model", "preset", "seeds", "date", "status")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h in text else "---:" for h in header) + "|"]
    for r in rows:
        cells = [str(r.get("rank", "")) if ranked else r["status"], r["submission"],
                 r["method"] if r["kind"] == "student" else f"*{r['method']}*", r["model"], r["preset"], f"{r['overall']:.3f}"]
        single = len(r["seeds"].split()) == 1  # one seed has no spread to show (base and teachers)
        for b in benches:
            mean, std = r["scores"].get(b, (None, None))
            cells.append("" if mean is None else f"{mean:.3f}" if single else f"{mean:.3f} ± {std:.3f}")
        cells += ["" if r["optimizer_steps"] is None else f"{int(r['optimizer_steps']):,}",
                  "" if r["forward_passes"] is None else f"{int(round(r['forward_passes'])):,}",
                  r["seeds"], r["date"][:10]]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _readme(rows: list[dict], skipped: list[str], bench_by_suite: dict[str, list[str]]) -> bytes:
    out = [HEADER]
    verified = [r for r in rows if r["status"] == "verified"]
    if not verified:
        out.append("No verified submissions yet.\n")
    for suite, preset in sorted({(r["suite"], r["preset"]) for r in verified}):
        out.append(f"## Suite `{suite}`, preset `{preset}`\n")
        out.append(_table([r for r in verified if (r["suite"], r["preset"]) == (suite, preset)], bench_by_suite[suite], True))
    others = [r for r in rows if r["status"] != "verified"]
    if others:
        out.append("## Unverified (not ranked)\n")
        out.append("Scores as submitted, not re-evaluated: `unverified` entries were submitted with `--unverified`; "
                   "`legacy` entries are schema-1 result files from before verification existed (no per-image scores "
                   "or adapter hashes), kept until a new run replaces them.\n")
        for suite in sorted({r["suite"] for r in others}):
            out.append(f"### Suite `{suite}`\n")
            out.append(_table([r for r in others if r["suite"] == suite], bench_by_suite[suite], False))
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
