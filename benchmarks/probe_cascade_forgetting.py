"""Does cascade RL forget? Each stage's end, scored by the run's own final evaluation.

    python benchmarks/probe_cascade_forgetting.py runs/NAME [--threads 2]

The report reads forgetting off the training curves (12 test prompts, 1 image each: noisy). This
scores the adapter every cascade stage saved (``methods/cascade/seed*/stage*/final``) with the
run's final evaluation (same prompts, images per prompt and noise seed, so image ``i`` pairs with
image ``i`` of the cascade's final score and of the base's), and prints, per seed and stage, each
benchmark's change from that stage's end to the cascade's end with its paired s.e. (per image,
stratified by GenEval's tags), the stage's own task first. Stage evaluations are
cached in ``RUN/evals/cascade-stage<k>-seed<s>.json``; a rerun only prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, evaluate_suite, policy_source
from opd_bench.io import atomic_write_json
from opd_bench.policy import DTYPES, Policy
from opd_bench.report import load_results
from opd_bench.result_schema import eval_noise_seed, model_loading
from opd_bench.results_view import ResultView, stratified_paired_se


def stage_evaluation(path: Path, policy: Policy, adapter_dir: Path, results: dict, seed: int) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    record = results["config"]["eval"]
    settings = SamplerSettings(record["num_steps"], record["guidance_scale"], record["noise_level"])
    name = f"stage_{path.stem}"
    policy.load_adapter(name, adapter_dir)
    with policy.use(name):
        result = evaluate_suite(suites.get(results["suite"]), policy_source(policy, settings),
                                seed=eval_noise_seed(record.get("seed"), seed), limit=record["limit"],
                                images_per_prompt=record["images_per_prompt"], progress=False)
    saved = {"seed": seed, "adapter": str(adapter_dir), "scores": result["scores"], "per_image": result["per_image"]}
    atomic_write_json(path, saved, compact_lists=True)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the run's, so the images match its evaluations to the bit)")
    args = parser.parse_args()
    results = load_results(args.run)
    torch.set_num_threads(args.threads or int(results.get("environment", {}).get("threads") or 1))
    if "cascade" not in results.get("results", {}):
        parser.error(f"{args.run} has no cascade results; run `opd-bench run --method cascade --out {args.run}` first")
    view = ResultView(results)
    loading = model_loading(results)  # as the run loaded it
    policy = Policy.from_pretrained(suites.resolve_model(results["model"]), dtype=DTYPES[loading["dtype"]],
                                    drop_t5=loading["drop_t5"], resolution=results["config"]["eval"].get("resolution"))
    rows = []
    for seed in results["results"]["cascade"][view.benchmarks[0]]["seeds"]:
        final = results["per_image"]["cascade"][str(seed)]
        stages = sorted((args.run / "methods" / "cascade" / f"seed{seed}").glob("stage*-*/final"))
        for stage_dir in stages[:-1]:  # the last stage's end is the cascade's end
            stage = stage_dir.parent.name  # stage<k>-<task>
            record = stage_evaluation(args.run / "evals" / f"cascade-{stage.split('-')[0]}-seed{seed}.json",
                                      policy, stage_dir, results, seed)
            task = stage.split("-", 1)[1]
            for bench in sorted(view.benchmarks, key=lambda b: (not b.startswith(task), b)):
                at_end, after = record["per_image"][bench], final[bench]
                strata = view.image_strata(bench, len(after)) or [None] * len(after)
                cell = results["results"]["cascade"][bench]
                start, end = record["scores"][bench], cell["per_seed"][cell["seeds"].index(seed)]
                se = stratified_paired_se(after, at_end, strata)
                rows.append({"seed": seed, "stage": stage, "benchmark": bench, "at_stage_end": round(start, 4),
                             "at_cascade_end": round(end, 4), "change": round(end - start, 4),
                             "se": None if se is None else round(se, 4)})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
