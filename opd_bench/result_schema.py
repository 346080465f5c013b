"""The result file (``results.json``): its version and what makes one well-formed.

``opd-bench run`` writes it, ``report`` and ``verify`` read it, ``submit`` takes it. ``check_results``
checks a results dict's shape and internal consistency against the *installed* suite: its
version, the sha256 of every prompt file, and, from schema 2 on, that every per-seed score is the
suite's aggregate of the recorded per-image scores and every mean and std those of the per-seed
scores. Every refusal is a ``SubmissionError`` with one line that names the problem and the fix.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# The result file's version: what `opd-bench run` writes and `submit` takes.
# 2: per-image scores of the final evaluations, the seeds of every result cell, adapter hashes.
# 3: config['eval']['seed'], the noise seed of every final evaluation (in 2, each cell's training seed).
# Versions 1 and 2 are still read (report, leaderboard); 1 is listed as legacy, never verified or submitted.
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
STUDENT_METHODS = ("opd", "opd-ppo", "multi-reward", "cascade")
UNBOUNDED = frozenset({"pref"})  # finite, any value; every other benchmark is a score in [0, 1]
# Weight precisions a run can load its model in, by the names `--dtype` and results.json use.
MODEL_DTYPES = ("float32", "bfloat16")


def model_loading(results: dict) -> dict[str, Any]:
    """How the run loaded its model (``config['model']``): ``dtype`` and ``drop_t5``. Results written
    before the record existed loaded float32 with T5, and read so."""
    config = results.get("config")
    loading = config.get("model") if isinstance(config, dict) else None
    loading = loading if isinstance(loading, dict) else {}
    return {"dtype": loading.get("dtype", "float32"), "drop_t5": bool(loading.get("drop_t5", False))}


def _check_model_loading(results: dict) -> None:
    """``config['model']``, where recorded, must be what `opd-bench run` writes: the leaderboard
    labels and ranks runs by it (another precision is another experiment)."""
    config = results.get("config")
    loading = config.get("model") if isinstance(config, dict) else None
    if loading is None:
        return
    if (not isinstance(loading, dict) or loading.get("dtype", "float32") not in MODEL_DTYPES
            or not isinstance(loading.get("drop_t5", False), bool)):
        raise SubmissionError(f"config['model'] is {loading!r}; it must record the run's precision "
                              f"(dtype: one of {', '.join(MODEL_DTYPES)}) and drop_t5 (true or false), "
                              "as `opd-bench run` writes; submit the results.json that run wrote")


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


def is_finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range (JSON allows any number of digits)
        return False


def is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_past_utc_time(value: Any) -> bool:
    """``YYYY-MM-DDTHH:MM:SSZ``, a real time and not later than now (a minute's slack for clocks)."""
    if not isinstance(value, str) or not value.isascii():
        return False
    try:
        when = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return False
    return when <= datetime.now(timezone.utc) + timedelta(minutes=1)


# The transformer forward passes a method is charged for: its own, the teachers' (DiffusionOPD) and
# the frozen reference model's (GRPO's KL penalty to the base). Results without a kind count it 0.
FORWARD_KEYS = ("student_forwards", "teacher_forwards", "reference_forwards")


def total_forwards(budget: dict) -> float | None:
    """A method's forward passes of every kind, or None where it records none."""
    values = [budget[key] for key in FORWARD_KEYS if is_finite_number(budget.get(key))]
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
    if not is_finite_number(value):
        raise SubmissionError(f"{where} is {value!r}, not a finite number; re-run the evaluation that produced it")
    if bench not in UNBOUNDED and not 0.0 <= value <= 1.0:
        raise SubmissionError(f"{where} = {value!r} is outside [0, 1] ({bench} is a score in [0, 1]); "
                              "the file is corrupt or was edited, submit the results.json written by `opd-bench run`")


def _sample_std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...`` where every level is an object; None where one is missing or is not (an edited file)."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _edited(where: str, what: str, got: Any, expected: Any) -> SubmissionError:
    return SubmissionError(f"{where} = {got!r} is not {what} ({expected!r}); the file was edited, "
                           "submit the results.json written by `opd-bench run`")


def evaluation_images(results: dict, suite, bench: str, cache: dict | None = None) -> tuple[str, list[dict]]:
    """``bench``'s aggregation metric and the metadata of each of its final-evaluation images, in
    the order the result file lists their scores (image ``i`` shows test prompt ``i // images_per_prompt``)."""
    task = bench if bench in suite.tasks else next(t for t in suite.tasks if bench in suite.benchmark(t).extra_rewards)
    spec = suite.benchmark(task)
    evaluation = results.get("config", {}).get("eval") if isinstance(results.get("config"), dict) else None
    limit, repeats = (evaluation.get("limit"), evaluation.get("images_per_prompt")) if isinstance(evaluation, dict) else (0, 0)
    def count(value) -> bool:  # a positive integer or null; true is no count (bool is an int to Python)
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)

    if not (count(limit) and count(repeats)):
        raise SubmissionError("config['eval'] must give the final evaluation's 'limit' and 'images_per_prompt' "
                              "(integers or null); submit the results.json written by `opd-bench run`")
    repeats = repeats or spec.images_per_prompt
    cache = {} if cache is None else cache
    if (task, limit, repeats) not in cache:  # reading a prompt file costs more than all the other checks
        cache[task, limit, repeats] = [p.metadata for p in spec.prompts("test", limit) for _ in range(repeats)]
    return (spec.metric if bench == task else "mean"), cache[task, limit, repeats]


def _check_per_image(results: dict, suite, method: str, seed: int, bench: str, expected: float, cache: dict) -> None:
    """Schema 2: the per-seed score must be the suite's aggregate of the recorded per-image scores."""
    from opd_bench.benchmarks import aggregate

    where = f"per_image[{method!r}][{str(seed)!r}][{bench!r}]"
    metric, metadata = evaluation_images(results, suite, bench, cache)
    values = dig(results, "per_image", method, str(seed), bench)
    if not isinstance(values, list) or len(values) != len(metadata):
        raise SubmissionError(f"{where} must list the {len(metadata)} scores of the final evaluation's images; "
                              "submit the results.json written by `opd-bench run`")
    for i, value in enumerate(values):
        if value is not None:
            _check_score(f"{where}[{i}]", bench, value)
    score = aggregate(metric, [math.nan if v is None else v for v in values], metadata)["score"]
    if not math.isclose(score, expected, rel_tol=1e-5, abs_tol=1e-5):
        raise _edited(f"results[{method!r}][{bench!r}] seed {seed}", "the score of its per-image values", expected, score)


def schema_problem(version: Any) -> str | None:
    """One line naming what is wrong with a file's ``schema_version`` (an integer this opd-bench
    reads: not 3.0, not true) and the fix; None when it is readable."""
    if type(version) is int and version in READABLE_SCHEMAS:
        return None
    return (f"schema_version is {version!r}, this opd-bench reads versions {list(READABLE_SCHEMAS)}; "
            "re-run with this opd-bench version or upgrade opd-bench")


EVAL_NOT_RUN = ("this is the results.json of `opd-bench eval` (one model's scores), not of a run; "
                "pass the folder of an `opd-bench run`")


def is_eval_result(results: dict) -> bool:
    """Whether ``results`` is what ``opd-bench eval`` writes (no schema version; its sampler and image count)."""
    return results.get("schema_version") is None and "num_images" in results and "sampler" in results


def check_results(results: dict) -> None:
    """Raise ``SubmissionError`` (one line: the problem and the fix) unless ``results`` is a
    well-formed, internally consistent result file (schema 1, 2 or 3) of an installed suite."""
    if not isinstance(results, dict):
        raise SubmissionError(f"results must be a JSON object, got {type(results).__name__}; "
                              "submit the results.json written by `opd-bench run`")
    if is_eval_result(results):
        raise SubmissionError(EVAL_NOT_RUN)
    version = results.get("schema_version")
    problem = schema_problem(version)
    if problem:
        raise SubmissionError(problem)
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
        raise SubmissionError(f"{str(error).rstrip('.')}; only runs on an installed suite can be submitted") from None
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
            got = dig(hashes, task, split)
            if got != spec.file_hash(split):
                ours, fix = ((f"the installed {name} suite's", "re-run with the installed suite") if suite.settings() is None
                             else (f"the {name} suite config's", "give the suite config the run used"))
                raise SubmissionError(
                    f"prompt_hashes[{task!r}][{split!r}] does not match {ours} {split} prompt "
                    f"file for {task} (got {str(got)[:12]}...); the run used other prompts, {fix}"
                )

    date = results.get("date")
    if not _is_past_utc_time(date):
        raise SubmissionError(f"'date' is {date!r}; it must be the UTC time the run wrote the file (YYYY-MM-DDTHH:MM:SSZ, "
                              "not in the future), as `opd-bench run` records it")

    seeds = results.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SubmissionError(f"'seeds' is {seeds!r}; it must be a non-empty list of integers, as `opd-bench run` writes")
    if len(set(seeds)) != len(seeds):
        raise SubmissionError(f"'seeds' {seeds!r} has repeats; each seed must be a distinct run")

    model = results.get("model")
    if not isinstance(model, str) or not model.strip():
        raise SubmissionError(f"'model' is {model!r}; it must name the model the run trained (e.g. \"tiny\")")
    _check_model_loading(results)

    required = suite_benchmarks(suite)
    listed = results.get("benchmarks")
    # exactly the suite's: the table's columns and a method's seeds are read from this list
    if not is_string_list(listed) or sorted(listed) != sorted(required):
        raise SubmissionError(f"'benchmarks' is {listed!r} but must list each {name} benchmark {required} once; "
                              "evaluate on the full suite")
    headline = results.get("headline")
    if (not is_string_list(headline) or not headline
            or not set(headline) <= set(required) or set(headline) & UNBOUNDED):
        raise SubmissionError(f"'headline' is {headline!r}; it must be a non-empty list of the suite's [0, 1] "
                              f"benchmarks ({[b for b in required if b not in UNBOUNDED]})")

    expected = getattr(suite, "headline", None)
    if len(set(headline)) != len(headline):  # a repeat would weigh one benchmark twice in the overall score
        raise SubmissionError(f"'headline' {headline!r} repeats a benchmark; list each once, as `opd-bench run` writes")
    if expected is not None and set(headline) != set(expected):
        raise SubmissionError(f"'headline' is {headline!r} but the {name} suite's headline benchmarks are "
                              f"{list(expected)!r}; the overall score must use the suite's own headline")

    scores = results.get("results")
    if not isinstance(scores, dict) or not scores:
        raise SubmissionError("'results' is missing or empty; submit a run that evaluated at least one method")
    known = _known_methods(suite)
    prompt_cache: dict = {}
    if not any(m in STUDENT_METHODS for m in scores):
        raise SubmissionError(f"'results' has no student method ({', '.join(STUDENT_METHODS)}): a run of teachers alone "
                              "can be reported, not verified or submitted; train a student into the same --out "
                              "(opd-bench run --method opd ...) first")
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
            if not is_finite_number(std) or std < 0:
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
                record = dig(results, "artifacts", method, str(seed))
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
                    not is_finite_number(value) or value < 0):
                raise SubmissionError(f"compute[{method!r}][{key!r}] is {value!r}; it must be a finite number >= 0")
