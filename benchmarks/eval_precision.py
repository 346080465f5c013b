"""How precise is a run's final evaluation? Paired gains over the base, from a result file alone.

A schema-3 run scores every model on the same noise (one evaluation seed), so image ``i`` of a
model and image ``i`` of the base show the same prompt from the same starting noise. This prints,
for every model and benchmark, the mean per-image difference to the base and its standard error
(averaged over the model's seeds), and how the teachers' gains and the share of them the OPD student
keeps move when only the first ``k`` prompts of the evaluation are kept:

    python benchmarks/eval_precision.py runs/standard-v9 --prompts 32,64,96,160

``--against OTHER_RUN`` compares two runs evaluated on the same prompts and noise (e.g. one design
change between them): for every model in both, the mean per-image difference ``RUN - OTHER_RUN``
and its standard error, seed by seed. The base is the same model in both, so its difference must
be zero: the check that the two evaluations pair up.

GenEval's score is a mean over tags, so its per-image mean difference is only close to the gain in
the results table; for the other benchmarks it is the gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opd_bench.result_schema import paired_evaluation
from opd_bench.results_view import paired_gain


def share_kept(student: list[float], teacher: list[float], base: list[float]) -> float:
    """The student's gain over the base as a share of the teacher's (plain means)."""
    base_mean = statistics.fmean(base)
    return (statistics.fmean(student) - base_mean) / (statistics.fmean(teacher) - base_mean)


def load_paired(run: Path) -> dict:
    """A run's results, refused unless every model in it was scored on one noise seed."""
    path = run / "results.json" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; pass a finished run folder (opd-bench run --out) or its results.json")
    results = json.loads(path.read_text())
    if not paired_evaluation(results):
        raise SystemExit(f"{path} scored each cell with its own noise seed (schema 2): its images do not pair up; "
                         "use a run made with opd-bench's schema 3")
    return results


def compare_runs(results: dict, other: dict) -> None:
    """Print ``results - other`` per model, benchmark and seed, on the images both runs share."""
    keys = ("seed", "limit", "images_per_prompt")
    if [results["config"]["eval"][k] for k in keys] != [other["config"]["eval"][k] for k in keys]:
        raise SystemExit("the two runs' evaluations differ (seed, prompts or images per prompt): their images do not pair up")
    for name, per_seed in results["per_image"].items():
        theirs = other["per_image"].get(name, {})
        for seed in sorted(set(per_seed) & set(theirs)):
            cells = []
            for bench in results["benchmarks"]:
                if bench in per_seed[seed] and bench in theirs[seed]:
                    gain, se = paired_gain(per_seed[seed][bench], theirs[seed][bench])
                    cells.append(f"{bench} {gain:+.3f} ± {se:.3f}")
            print(json.dumps({"model": name, "seed": seed, "difference ± s.e.": cells}, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (or its results.json)")
    parser.add_argument("--prompts", default="", help="comma-separated prompt counts k for the subsample table")
    parser.add_argument("--against", type=Path, default=None, help="another run on the same evaluation: print RUN - AGAINST per model")
    args = parser.parse_args()
    results = load_paired(args.run)
    if args.against is not None:
        compare_runs(results, load_paired(args.against))
        return
    images, per_prompt = results["per_image"], results["config"]["eval"]["images_per_prompt"] or 1
    base = images["base"][str(results["results"]["base"][results["benchmarks"][0]]["seeds"][0])]
    for name, per_seed in images.items():
        if name == "base":
            continue
        cells = []
        for bench in results["benchmarks"]:
            gains = [paired_gain(scores[bench], base[bench]) for scores in per_seed.values()]
            cells.append(f"{bench} {statistics.fmean(g for g, _ in gains):+.3f} ± {statistics.fmean(s for _, s in gains):.3f}")
        print(json.dumps({"model": name, "seeds": len(per_seed), "gain ± s.e.": cells}, ensure_ascii=False))

    def teacher_images(task: str) -> dict:  # a teacher has one seed
        return next(iter(images[f"teacher/{task}"].values()))

    for k in [int(v) for v in args.prompts.split(",") if v]:
        n = k * per_prompt
        row = {"prompts": k}
        for task in ("pref", "ocr"):
            if f"teacher/{task}" not in images or "opd" not in images:
                continue
            teacher, ref = teacher_images(task)[task][:n], base[task][:n]
            gain, se = paired_gain(teacher, ref)
            kept = [share_kept(scores[task][:n], teacher, ref) for scores in images["opd"].values()]
            row[task] = {"teacher gain": round(gain, 3), "s.e.": round(se, 3),
                         "unpaired s.e.": round((statistics.variance(teacher) / n + statistics.variance(ref) / n) ** 0.5, 3),
                         "opd kept": round(statistics.fmean(kept), 2),
                         "kept sd": round(statistics.stdev(kept), 2) if len(kept) > 1 else None}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
