"""Read-only access to a result file (``results.json``): final scores, per-seed and per-image
values, curves and cascade stages, tolerant of anything missing or malformed (a missing value is
None, never an exception). The report's sections and its findings both read the file through
``ResultView``, so they cannot disagree on what a number is."""

from __future__ import annotations

import math
import statistics
from typing import Any

from opd_bench.result_schema import STUDENT_METHODS, paired_evaluation, total_forwards

REFERENCE_ORDER = ("base", "teacher/geneval", "teacher/ocr", "teacher/pref")
STUDENT_ORDER = STUDENT_METHODS


def num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, inf, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 3) -> str:
    value = num(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_g(value: Any) -> str:
    value = num(value)
    return "n/a" if value is None else f"{value:.3g}"


def counted(count: Any, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def spread_text(mean: Any, sd: Any, seeds: int | None = None) -> str:
    """'0.396 ± 0.015 (2 seeds)': a mean, its seed sd (None for one seed; shown only beside a finite
    mean) and, where given, how many seeds the mean is over."""
    text = fmt(mean) + (f" ± {num(sd):.3f}" if num(mean) is not None and num(sd) is not None else "")
    return text + ("" if seeds is None else f" ({counted(seeds, 'seed')})")


def fmt_int(value: Any) -> str:
    value = num(value)
    return "n/a" if value is None else f"{round(value):,}"


def method_key(method: str) -> tuple:
    """Sort order: base, teachers, then the student methods in a fixed order, then anything else."""
    if method in REFERENCE_ORDER:
        return (0, REFERENCE_ORDER.index(method), method)
    if method.startswith("teacher/"):
        return (1, 0, method)
    if method in STUDENT_ORDER:
        return (2, STUDENT_ORDER.index(method), method)
    return (3, 0, method)


def is_student(method: str) -> bool:
    return method != "base" and not method.startswith("teacher/")


def paired_gain(model: list[float], base: list[float]) -> tuple[float, float]:
    """Mean per-image difference ``model - base`` and its standard error, for two evaluations of
    the same prompts from the same starting noise (image ``i`` of one pairs with image ``i`` of the other)."""
    differences = [m - b for m, b in zip(model, base, strict=True)]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def by_stratum(values: list[float], strata: list[Any]) -> dict[Any, list[float]]:
    groups: dict[Any, list[float]] = {}
    for value, stratum in zip(values, strata, strict=True):
        groups.setdefault(stratum, []).append(value)
    return groups


def stratified_paired_se(model: list[float], base: list[float], strata: list[Any]) -> float | None:
    """Standard error of a score that is the mean over strata of each stratum's mean (GenEval: its
    tags), for the paired per-image differences ``model - base``; one stratum is ``paired_gain``'s
    s.e. None where a stratum has fewer than two images."""
    groups = by_stratum([m - b for m, b in zip(model, base, strict=True)], strata)
    if not groups or any(len(g) < 2 for g in groups.values()):
        return None
    return math.sqrt(sum(statistics.variance(g) / len(g) for g in groups.values())) / len(groups)


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (None for fewer than two values) of per-seed values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, sd


class ResultView:
    """One result file, with its methods (sorted: base, teachers, students), benchmarks and headline."""

    def __init__(self, results: dict) -> None:
        self.r = results
        self.results = as_dict(results.get("results"))
        self.methods = sorted(self.results, key=method_key)
        benchmarks = [b for b in as_list(results.get("benchmarks")) if isinstance(b, str)]
        for method in self.methods:
            for bench in as_dict(self.results[method]):
                if bench not in benchmarks:
                    benchmarks.append(bench)
        self.benchmarks = benchmarks
        headline = [b for b in as_list(results.get("headline")) if isinstance(b, str)]
        self.headline = headline or [b for b in benchmarks if b != "pref"]
        self._strata: dict[tuple[str, int], list[Any] | None] = {}

    # -- data access --
    def score(self, method: str, bench: str) -> dict:
        return as_dict(as_dict(self.results.get(method)).get(bench))

    def mean(self, method: str, bench: str) -> float | None:
        return num(self.score(method, bench).get("mean"))

    def overall(self, method: str) -> float | None:
        values = [self.mean(method, b) for b in self.headline]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def teacher_for(self, bench: str) -> str | None:
        """The teacher trained on ``bench`` (pref_oracle -> teacher/pref)."""
        if f"teacher/{bench}" in self.results:
            return f"teacher/{bench}"
        for method in self.methods:
            task = method.partition("/")[2]
            if method.startswith("teacher/") and bench.startswith(task + "_"):
                return method
        return None

    def cascade_stages(self, frame) -> list[dict]:
        stages = [as_dict(s) for s in as_list(self.r.get("cascade_stages"))]
        if not stages and not frame.empty:  # fall back to the stage column of the curve rows
            seen: dict[Any, dict] = {}
            for _, row in frame.sort_values("step").iterrows():
                if row["stage"] is not None and row["stage"] == row["stage"]:
                    seen.setdefault(row["stage"], {"stage": row["stage"], "task": row["stage_task"]})["end_step"] = row["step"]
            stages = list(seen.values())
        return stages

    def curve_evaluation(self) -> tuple[int, int] | None:
        """(test prompts per benchmark, images per prompt) the training curves score, where the file
        records it (``curve_evaluation``, runs since 2026-12-06)."""
        curve = as_dict(self.r.get("curve_evaluation"))
        limit, images = num(curve.get("limit")), num(curve.get("images_per_prompt"))
        return None if limit is None or images is None else (round(limit), round(images))

    def curves_note(self) -> str:
        """'; curves: 12 test prompts per benchmark', or nothing where the file does not say."""
        size = self.curve_evaluation()
        return "" if size is None else f"; curves: {size[0]} test prompts per benchmark"

    def stage_scores(self, frame) -> list[dict]:
        """Per cascade stage, on the curves (``frame``: the cascade's ``curves_frame``), the benchmark
        of the reward it trains on (its task's; else the task's headline score), per seed: ``before`` (the last evaluation at or before the stage's first
        step; NaN if none), ``end`` (at or before its last step) and ``final``; ``last``: it is the cascade's last
        stage (nothing after it to forget it; a stage the curves cannot place has no row, so this is not the
        last row). Forgetting is ``end - final``; the findings and the report's table both read it from here."""
        rows, start = [], 0.0
        stages = self.cascade_stages(frame)
        for index, stage in enumerate(stages):
            task, end = str(stage.get("task")), num(stage.get("end_step"))
            own = task in frame and frame[task].notna().any()  # e.g. the learned pref, which the pref stage trains on
            bench = task if own or task in self.headline else next((b for b in self.headline if b.startswith(task + "_")), None)
            if frame.empty or end is None or bench is None or bench not in frame:
                start = end if end is not None else start
                continue
            per_seed: dict[str, list[float]] = {"before": [], "end": [], "final": []}
            for _, curve in frame.dropna(subset=[bench]).sort_values("step").groupby("seed"):
                before, at_end = curve[curve["step"] <= start], curve[curve["step"] <= end]
                if at_end.empty:
                    continue
                for key, value in (("before", before[bench].iloc[-1] if not before.empty else math.nan),
                                   ("end", at_end[bench].iloc[-1]), ("final", curve[bench].iloc[-1])):
                    per_seed[key].append(float(value))
            rows.append({"stage": stage.get("stage", index), "task": task, "bench": bench, "end_step": end,
                         "last": index == len(stages) - 1, **per_seed})
            start = end
        return rows

    def score_text(self, method: str, bench: str) -> str:
        """'mean ± seed sd (n seeds)' of one final score."""
        mean, sd, n = self.score_cell(method, bench)
        return spread_text(mean, sd, n)

    def score_cell(self, method: str, bench: str) -> tuple[float | None, float | None, int]:
        """Mean, seed sd (None for fewer than two seeds) and number of seeds of one final score;
        ``bench`` "overall": of the per-seed overall scores where every headline benchmark has them,
        so that its mean and its sd are of the same values (else the mean of the means, no sd, 0 seeds)."""
        if bench == "overall":
            per_seed = self.overall_seeds(method)
            if not per_seed:
                return self.overall(method), None, 0
            mean, sd = mean_sd(per_seed)
            return mean, sd, len(per_seed)
        cell = self.score(method, bench)
        n = len(as_list(cell.get("per_seed")))
        return self.mean(method, bench), num(cell.get("std")) if n > 1 else None, n

    def overall_seeds(self, method: str) -> list[float]:
        """Per-seed overall scores (mean of the headline benchmarks' per-seed scores)."""
        per = [[num(v) for v in as_list(self.score(method, b).get("per_seed"))] for b in self.headline]
        if not per or any(len(p) != len(per[0]) or None in p for p in per):
            return []
        return [sum(p[i] for p in per) / len(per) for i in range(len(per[0]))]

    def image_strata(self, bench: str, count: int) -> list[Any] | None:
        """The stratum of each of ``bench``'s ``count`` evaluation images that its score averages over:
        GenEval's tag, one stratum for a plain mean. Read from the installed suite's test prompts,
        so only where the run's suite version and prompt file are the installed ones; else None."""
        if (bench, count) not in self._strata:  # reading and hashing the prompt file once per benchmark
            self._strata[bench, count] = self._read_strata(bench, count)
        return self._strata[bench, count]

    def _read_strata(self, bench: str, count: int) -> list[Any] | None:
        from opd_bench import suites
        from opd_bench.result_schema import evaluation_images

        try:
            suite = suites.get(str(self.r.get("suite")))
            task = bench if bench in suite.tasks else next(t for t in suite.tasks if bench in suite.benchmark(t).extra_rewards)
            recorded = as_dict(as_dict(self.r.get("prompt_hashes")).get(task)).get("test")
            if self.r.get("suite_version") != suite.version or recorded != suite.benchmark(task).file_hash("test"):
                return None
            metric, metadata = evaluation_images(self.r, suite, bench)
        except Exception:  # another or an unconfigured suite, a malformed file: no strata known
            return None
        if len(metadata) != count:
            return None
        return [m.get("tag", "untagged") for m in metadata] if metric == "geneval" else [None] * count

    def paired_se(self, model: str, bench: str) -> float | None:
        """Standard error of ``model``'s gain over the base on ``bench`` from the per-image
        differences, where both were scored on the same noise (one evaluation seed, schema 3):
        stratified by GenEval's tags where its score is their mean (the installed suite says which
        image has which tag), or of the plain mean where the score is that; else None."""
        if not paired_evaluation(self.r):
            return None

        def first_seed_images(name: str) -> list:  # teachers and the base have one seed
            seeds = as_list(self.score(name, bench).get("seeds"))
            per_seed = as_dict(as_dict(self.r.get("per_image")).get(name))
            return [num(v) for v in as_list(as_dict(per_seed.get(str(seeds[0]))).get(bench))] if seeds else []

        ours, base = first_seed_images(model), first_seed_images("base")
        if len(ours) < 2 or len(ours) != len(base) or any(v is None for v in ours + base):
            return None
        strata = self.image_strata(bench, len(ours)) or [None] * len(ours)
        groups = by_stratum(ours, strata)
        mean, score = self.mean(model, bench), sum(sum(g) / len(g) for g in groups.values()) / len(groups)
        if mean is None or abs(score - mean) > 1e-6 * max(1.0, abs(mean)):  # not the score these images make
            return None
        return stratified_paired_se(ours, base, strata)

    def curves_frame(self, methods: list[str]):
        import pandas as pd

        records = []
        curves = as_dict(self.r.get("curves"))
        for method in methods:
            for seed, rows in as_dict(curves.get(method)).items():
                for row in as_list(rows):
                    row = as_dict(row)
                    step = num(row.get("step"))
                    if step is None:
                        continue
                    forwards = total_forwards(row)  # NaN, not 0: a row without counts has no place on a forwards axis
                    record = {"method": method, "seed": str(seed), "step": step,
                              "forwards": math.nan if forwards is None else forwards,
                              "stage": row.get("stage"), "stage_task": row.get("stage_task")}
                    for bench in self.benchmarks:
                        record[bench] = num(row.get(f"eval/{bench}"))
                    records.append(record)
        frame = pd.DataFrame.from_records(records)
        for bench in self.benchmarks:
            if bench in frame:
                frame[bench] = pd.to_numeric(frame[bench], errors="coerce")
        return frame
