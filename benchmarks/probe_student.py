"""How much of its teachers' gains does a DiffusionOPD student keep? One student run from a finished
run's teachers, then base, teachers and student on the same held-out prompts and noise.

    python benchmarks/probe_student.py --run runs/standard-v4 --set steps=60 --set lr=3e-3
    python benchmarks/probe_student.py --run runs/standard-v10 --tasks pref --set prompts_per_task=12

Starts from the `standard` preset's OPD config; every ``--set FIELD=VALUE`` changes one field
(``--set mode=ppo --set noise_level=0.7`` probes the PPO-style student). Prints one JSON line: the
settings, wall minutes, held-out scores (first ``--eval-limit`` test prompts of every task, 2 images
each, the suite's evaluation sampler) and the share of each teacher's gain the student keeps.
``--tasks`` distils from only the listed teachers (and scores them, or the ``--score`` ones): does
sharing the student's steps between three teachers cost a task its share? ``--as-base geneval,ocr``
replaces those teachers by the base itself (their adapters with every ``lora_B`` zeroed): does a
teacher with nothing to give cost the others as much?
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings
from opd_bench.presets import plan
from opd_bench.policy import Policy
from opd_bench.trainers.opd import OPDTrainer
from probe_args import held_out, probe_config, probe_parser


def base_equal_copy(adapter: Path, out: Path) -> Path:
    """A copy of a LoRA adapter folder with every ``lora_B`` zeroed: the same modules and rank,
    and exactly the base model's output."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    for path in out.glob("*.safetensors"):
        weights = load_file(path)
        save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, path)
    return out


def find_teachers(run: Path, tasks: list[str], chosen: list[str]) -> dict[str, Path]:
    """The finished teacher adapter (``.../final``) of each task in ``run``; ``chosen`` holds
    ``--teacher TASK=FOLDER`` picks. Raises ValueError where a task has none, or several and no pick:
    a run folder keeps one teacher per setting (``TASK-<hash>``), and taking one silently could
    take another run's."""
    picks = {}
    for pair in chosen:
        task, _, folder = pair.partition("=")
        final = Path(folder) / "final" if (Path(folder) / "final").is_dir() else Path(folder)
        if task not in tasks or not (final / "adapter_config.json").is_file():
            raise ValueError(f"--teacher {pair!r}: give TASK=FOLDER with TASK one of {', '.join(tasks)} and FOLDER a "
                             "finished teacher (holding final/adapter_config.json)")
        picks[task] = final
    found = {task: sorted(p.parent for p in (run / "teachers").glob(f"{task}-*/final/adapter_config.json"))
             for task in tasks if task not in picks}
    missing = [task for task, paths in found.items() if not paths]
    if missing:
        raise ValueError(f"{run} holds no finished teacher for {', '.join(missing)}; give a run whose teachers finished")
    several = {task: paths for task, paths in found.items() if len(paths) > 1}
    if several:
        listed = "; ".join(f"{task}: {', '.join(str(p.parent) for p in paths)}" for task, paths in several.items())
        raise ValueError(f"{run} holds several teachers for one task ({listed}); choose with --teacher TASK=FOLDER")
    return {**{task: paths[0] for task, paths in found.items()}, **picks}


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--run", required=True, type=Path, help="a finished `opd-bench run` folder with teachers")
    parser.add_argument("--tasks", default=None, help="comma-separated teachers to distil from (default: all the suite's)")
    parser.add_argument("--score", default=None, help="comma-separated tasks to score (default: the distilled ones)")
    parser.add_argument("--as-base", default="", help="comma-separated teachers replaced by the base (zeroed lora_B)")
    parser.add_argument("--teacher", action="append", default=[], metavar="TASK=FOLDER",
                        help="the teacher of TASK (a teachers/TASK-<hash> folder), where the run holds several")
    args = parser.parse_args()
    config, overrides = probe_config(parser, args, plan("standard").opd, eval_every=0, checkpoint_every=0, monitor_rewards=False)

    suite = suites.get("tiny")
    tasks = list(suite.tasks) if args.tasks is None else [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown or not tasks:
        parser.error(f"--tasks {args.tasks!r}: choose from {', '.join(suite.tasks)}")
    scored = tasks if args.score is None else [t for t in args.score.split(",") if t]
    if not set(scored) <= set(tasks) or not scored:
        parser.error(f"--score {args.score!r}: choose from the distilled tasks, {', '.join(tasks)}")
    try:
        teachers = find_teachers(args.run, tasks, args.teacher)
    except ValueError as error:
        parser.error(str(error))
    teacher_paths = {task: str(path) for task, path in teachers.items()}  # before --as-base replaces any
    as_base = [t for t in args.as_base.split(",") if t]
    if not set(as_base) <= set(tasks) - set(scored):
        parser.error(f"--as-base {args.as_base!r}: choose from the distilled tasks that are not scored")
    workdir = tempfile.TemporaryDirectory()
    for task in as_base:
        teachers[task] = base_equal_copy(teachers[task], Path(workdir.name) / task)
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    settings = SamplerSettings.of_suite(suite)
    specs = {task: suite.benchmark(task) for task in tasks}
    rewards = {task: {"main": spec.build_reward()} for task, spec in specs.items()}

    extra: dict[str, dict] = {}  # the benchmarks' evaluation-only rewards (pref_oracle), per model

    def score(adapter: str | None, task: str) -> float:
        result = held_out(policy, adapter, specs[task], settings, rewards[task], args.eval_limit)
        extra.setdefault(str(adapter), {}).update({key: round(value, 4) for key, value in result["extra"].items()})
        return round(result["score"], 4)

    base = {task: score(None, task) for task in scored}
    teacher = {}
    for task in scored:
        policy.load_adapter(f"teacher_{task}", teachers[task])
        teacher[task] = score(f"teacher_{task}", task)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        final = OPDTrainer(config, policy=policy, prompts={t: s.prompts("train") for t, s in specs.items()},
                           teachers=teachers, run_dir=run_dir, adapter="probe").train(progress=False)
        minutes = (time.perf_counter() - started) / 60
        # the saved adapter, as the harness evaluates it: with `ema` set it holds the averaged weights
        policy.load_adapter("probe_final", final)
        student = {task: score("probe_final", task) for task in scored}
    kept = {task: round((student[task] - base[task]) / (teacher[task] - base[task]), 3)
            for task in scored if teacher[task] != base[task]}
    workdir.cleanup()
    print(json.dumps({"run": str(args.run), "tasks": tasks, "teachers": teacher_paths, "as_base": as_base, "overrides": overrides, "steps": config.steps, "threads": args.threads,
                      "seed": args.seed, "train_minutes": round(minutes, 2), "base": base, "teacher": teacher,
                      "student": student, "kept": kept, "evaluation_only": extra}))


if __name__ == "__main__":
    main()
