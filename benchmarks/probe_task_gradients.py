"""Do DiffusionOPD's tasks pull its student apart? Cosines between the tasks' gradients in one step.

    python benchmarks/probe_task_gradients.py --run runs/standard-v13 [--adapter DIR] [--batches 8]

The OPD student keeps less of the pref teacher's gain when it also distils other teachers, even
teachers equal to the base (docs/benchmarks.md, X0-X4). If that is the tasks' gradients pointing
against each other, the pref batch's gradient and the geneval / OCR batches' gradients of the same
step have negative cosines. This draws ``--batches`` optimizer steps' worth of task batches (each
task's prompts as the `standard` preset's OPD step draws them, the student's own rollouts) and takes
each task's gradient of its distillation loss alone, at the fresh student (``lora_B`` zero: the
base) or at a trained one (``--adapter``, e.g. RUN/methods/opd/seed0/final). It prints one JSON
line: each task's gradient norm, each pair's cosine within a step, and each task's cosine with its
own gradient of the next step (how consistent one task's direction is from batch to batch), as
mean ± sd over the batches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from opd_bench import suites
from opd_bench.policy import Policy
from opd_bench.presets import plan
from opd_bench.trainers.opd import opd_task_step, teacher_adapter_name
from opd_bench.training import add_student, sample_prompts, step_seed


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def cosines(grads: list[dict[str, torch.Tensor]], tasks: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per batch (task -> flat gradient): each pair's cosine within a batch, and each task's cosine
    with its own gradient of the next batch."""
    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    return {
        "within": {f"{a}/{b}": [cosine(g[a], g[b]) for g in grads] for a, b in itertools.combinations(tasks, 2)},
        "next": {task: [cosine(x[task], y[task]) for x, y in zip(grads, grads[1:])] for task in tasks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished `opd-bench run` folder with teachers")
    parser.add_argument("--adapter", type=Path, default=None, help="a trained student adapter (default: a fresh one)")
    parser.add_argument("--batches", type=int, default=8, help="optimizer steps' worth of task batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    suite = suites.get("tiny")
    config = plan("standard").opd
    teachers = {task: sorted((args.run / "teachers").glob(f"{task}-*/final/adapter_config.json")) for task in suite.tasks}
    missing = [task for task, found in teachers.items() if not found]
    if missing:
        parser.error(f"{args.run} holds no finished teacher for {', '.join(missing)}")
    policy = Policy.from_pretrained(suites.resolve_model(suite.default_model), resolution=suite.image_side())
    for task, found in teachers.items():
        policy.load_adapter(teacher_adapter_name(task), found[-1].parent)
    if args.adapter is not None:
        policy.load_adapter("student", args.adapter, trainable=True)
    params = add_student(policy, "student", config)
    pools = {task: suite.benchmark(task).prompts("train") for task in suite.tasks}

    start = time.perf_counter()
    grads: list[dict[str, torch.Tensor]] = []  # per batch: task -> flat gradient
    for step in range(args.batches):
        per_task = {}
        for k, task in enumerate(suite.tasks):  # the prompts and noise a training step of this seed draws
            for p in params:
                p.grad = None
            prompts = sample_prompts(pools[task], config.prompts_per_task, step_seed(args.seed, step, 10 + k))
            opd_task_step(policy, "student", teacher_adapter_name(task), prompts, config,
                          teacher_guidance=config.teacher_guidance.get(task, config.guidance_scale),
                          seed=step_seed(args.seed, step, 100 + k), reward=None, loss_scale=1.0, grad_variance=None)
            per_task[task] = torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None])
        grads.append(per_task)

    found = cosines(grads, list(suite.tasks))
    print(json.dumps({
        "run": str(args.run), "student": str(args.adapter) if args.adapter else "fresh (the base)",
        "batches": args.batches, "seed": args.seed, "minutes": round((time.perf_counter() - start) / 60, 1),
        "norm": {task: f"{statistics.fmean(float(g[task].norm()) for g in grads):.3g}" for task in suite.tasks},
        "cosine within a step": {pair: summary(values) for pair, values in found["within"].items()},
        "cosine with the next step's, same task": {task: summary(values) for task, values in found["next"].items()},
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
