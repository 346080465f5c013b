"""How much of its teachers' gains does a DiffusionOPD student keep? One student run from a finished
run's teachers, then base, teachers and student on the same held-out prompts and noise.

    python benchmarks/probe_student.py --run runs/standard-v4 --set steps=60 --set lr=3e-3

Starts from the `standard` preset's OPD config; every ``--set FIELD=VALUE`` changes one field
(``--set mode=ppo --set noise_level=0.7`` probes the PPO-style student). Prints one JSON line: the
settings, wall minutes, held-out scores (first ``--eval-limit`` test prompts of every task, 2 images
each, the suite's evaluation sampler) and the share of each teacher's gain the student keeps.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings
from opd_bench.harness import plan
from opd_bench.policy import Policy
from opd_bench.trainers.opd import OPDTrainer
from probe_args import held_out, probe_config, probe_parser


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--run", required=True, type=Path, help="a finished `opd-bench run` folder with teachers")
    args = parser.parse_args()
    config, overrides = probe_config(parser, args, plan("standard").opd, eval_every=0, checkpoint_every=0, monitor_rewards=False)

    suite = suites.get("tiny")
    found = {task: sorted((args.run / "teachers").glob(f"{task}-*/final/adapter_config.json")) for task in suite.tasks}
    missing = [task for task, paths in found.items() if not paths]
    if missing:
        parser.error(f"{args.run} holds no finished teacher for {', '.join(missing)}; give a run whose teachers finished")
    teachers = {task: paths[-1].parent for task, paths in found.items()}
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    settings = SamplerSettings.of_suite(suite)
    specs = {task: suite.benchmark(task) for task in suite.tasks}
    rewards = {task: {"main": spec.build_reward()} for task, spec in specs.items()}

    def score(adapter: str | None, task: str) -> float:
        return round(held_out(policy, adapter, specs[task], settings, rewards[task], args.eval_limit)["score"], 4)

    base = {task: score(None, task) for task in suite.tasks}
    teacher = {}
    for task, path in teachers.items():
        policy.load_adapter(f"teacher_{task}", path)
        teacher[task] = score(f"teacher_{task}", task)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        final = OPDTrainer(config, policy=policy, prompts={t: s.prompts("train") for t, s in specs.items()},
                           teachers=teachers, run_dir=run_dir, adapter="probe").train(progress=False)
        minutes = (time.perf_counter() - started) / 60
        # the saved adapter, as the harness evaluates it: with `ema` set it holds the averaged weights
        policy.load_adapter("probe_final", final)
        student = {task: score("probe_final", task) for task in suite.tasks}
    kept = {task: round((student[task] - base[task]) / (teacher[task] - base[task]), 3)
            for task in suite.tasks if teacher[task] != base[task]}
    print(json.dumps({"run": str(args.run), "overrides": overrides, "steps": config.steps, "threads": args.threads,
                      "seed": args.seed, "train_minutes": round(minutes, 2), "base": base, "teacher": teacher,
                      "student": student, "kept": kept}))


if __name__ == "__main__":
    main()
