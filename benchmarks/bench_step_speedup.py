"""One GRPO step and one DiffusionOPD step: this tree against an older commit, alternated in one run.

    git worktree add /tmp/old_e75db72 e75db72
    python benchmarks/bench_step_speedup.py --old /tmp/old_e75db72 --reps 7
    git worktree remove /tmp/old_e75db72

Issue 11's settings: GRPO with 2 prompts x 4 images, 8 sampling steps, CFG 4.5, noise level 0.7,
half the steps trained, LoRA rank 8, micro-batch 8; OPD with three teachers, 2 prompts per task,
the same steps, CFG and LoRA, deterministic rollouts (its default), half the steps trained.

Why this shape: the machine is shared and its load drifts, so old and new run alternately (the
order flips every repetition), each in a fresh subprocess that imports one tree only, with the same
thread count; the ratio of the two sides' medians is what is reported, for wall time and for the
process's CPU time (one thread, so equal to wall time on an idle machine, and far less disturbed
by other jobs on a loaded one), with the median and range of the paired ratios (old/new within
one repetition, the two run back to back), and each tree's commit and uncommitted state, the torch
version and the CPU model. Both sides load one model
folder, built once by the *old* tree's tiny builder from a fixed config sized like the shipped tiny
base (4 MMDiT layers, width 96), so neither a replaced base nor edits to the builder change it.
Each subprocess runs ``--steps`` optimizer steps through the real trainer after one warm-up step
and reports its median step time, plus the transformer calls and the sample-forwards counted by
the policy: sample-forwards must be equal on both sides (the same work, done faster), else the
run fails. Transformer calls may differ: GRPO's detached unconditional half is its own call.

``--profile`` instead profiles a few steps of this tree in-process (cProfile, top functions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_model, git_state, stray_modules, torch_version  # noqa: E402
# Sized like the shipped tiny base (docs/tiny_base.md), fixed here so the benchmark never moves.
MODEL = dict(
    num_layers=4, num_heads=3, head_dim=32, text_hidden=48, text_projection=48, max_prompt_tokens=24,
    vae_channels=(8, 16, 32), vae_norm_groups=2, vae_mid_attention=False,
)
TASKS = ("geneval", "ocr", "pref")
WORDS = ["red", "blue", "green", "circle", "square", "star", "two", "three", "a", "photo", "of"]


def import_tree(tree: Path):
    """Import ``opd_bench`` (with its ``trainers`` and ``baselines`` subpackages) from ``tree`` only.

    The installed package maps ``opd_bench.trainers`` to the checkout's ``trainers/`` through an
    editable-install finder that would answer for any tree; registering the two subpackages from
    ``tree`` first keeps every module on one side, which is then checked.
    """
    sys.path.insert(0, str(tree))
    import opd_bench

    for sub in ("trainers", "baselines"):
        spec = importlib.util.spec_from_file_location(
            f"opd_bench.{sub}", tree / sub / "__init__.py", submodule_search_locations=[str(tree / sub)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(opd_bench, sub, module)
    return opd_bench


def check_tree(tree: Path) -> None:
    stray = stray_modules(tree)
    if stray:
        raise RuntimeError(f"modules imported from outside {tree}: {stray}")


def paired_ratios(old: list[float], new: list[float]) -> dict:
    """Median and range of old/new within each repetition: the two sides of a repetition ran back
    to back, so their ratio sees the same machine load, which the ratio of medians mixes across."""
    ratios = [o / n for o, n in zip(old, new, strict=True)]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def prompts_for(task: str, count: int):
    from opd_bench.rollout import Prompt

    return [Prompt(f"a photo of {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {task}", task) for i in range(count)]


def make_trainer(method: str, policy, run_dir: Path, steps: int, teacher: Path | None):
    from opd_bench import rewards
    from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
    from opd_bench.trainers.opd import OPDConfig, OPDTrainer

    common = dict(steps=steps, num_steps=8, guidance_scale=4.5, train_fraction=0.5, lora_rank=8, lora_alpha=16,
                  micro_batch=8, eval_every=10**6, checkpoint_every=10**6)
    if method == "grpo":
        # the step, one rollout and one update, in trees from before updates_per_rollout as well
        one_update = {"updates_per_rollout": 1} if "updates_per_rollout" in GRPOConfig.__dataclass_fields__ else {}
        config = GRPOConfig(prompts_per_step=2, group_size=4, noise_level=0.7, **common, **one_update)
        return GRPOTrainer(config, policy=policy, prompts=prompts_for("geneval", 16),
                           rewards={"geneval": rewards.get("toy/brightness")}, run_dir=run_dir, adapter=f"bench-{run_dir.name}")
    config = OPDConfig(prompts_per_task=2, monitor_rewards=False, **common)
    return OPDTrainer(config, policy=policy, prompts={t: prompts_for(t, 16) for t in TASKS},
                      teachers={t: teacher for t in TASKS}, run_dir=run_dir, adapter=f"bench-{run_dir.name}")


def child(args) -> None:
    """Runs inside one subprocess: build the model folder, or time ``--steps`` steps of one method."""
    import torch

    torch.set_num_threads(args.threads)
    tree = Path(args.tree)
    import_tree(tree)
    if args.child == "build":
        from opd_bench.tiny import TinyConfig, save_tiny

        save_tiny(args.model, TinyConfig(**MODEL), seed=0)
        return
    from opd_bench.policy import Policy
    from opd_bench.training import TrainingRun

    # Clock every optimizer step where the shared loop closes it: wall time, and this process's CPU
    # time, which a loaded machine inflates far less (one thread: CPU time ~ wall time when idle).
    clocks = []
    end_step = TrainingRun.end_step

    def timed_end_step(self, *a, **k):
        clocks.append((time.perf_counter(), time.process_time()))
        return end_step(self, *a, **k)

    TrainingRun.end_step = timed_end_step
    policy = Policy.from_pretrained(args.model)
    calls = [0]
    policy.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher = None
        if args.method == "opd":
            policy.add_adapter("bench_teacher", rank=8, alpha=16, trainable=False, seed=1)
            with torch.no_grad():  # a teacher that differs from the base, as a trained one would
                for p in policy.parameters("bench_teacher"):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
            teacher = policy.save_adapter("bench_teacher", scratch / "teacher")
        trainer = make_trainer(args.method, policy, scratch / "run", 1 + args.steps, teacher)
        before_calls, before_counts = calls[0], dict(policy.forward_counts)
        trainer.train(progress=False)
    # the first step (warm-up) is not timed
    seconds = [b[0] - a[0] for a, b in zip(clocks, clocks[1:])]
    cpu_seconds = [b[1] - a[1] for a, b in zip(clocks, clocks[1:])]
    sample_forwards = sum(policy.forward_counts.values()) - sum(before_counts.values())
    check_tree(tree)
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "steps": 1 + args.steps,
        "transformer_calls_per_step": (calls[0] - before_calls) / (1 + args.steps),
        "sample_forwards_per_step": sample_forwards / (1 + args.steps),
    }))


def run_child(tree: Path, *extra: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *extra, "--tree", str(tree), "--threads", str(threads)],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    if out.returncode:
        raise RuntimeError(f"child failed for {tree}:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def profile(args) -> None:
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(args.threads)
    import_tree(ROOT)
    from opd_bench.policy import Policy
    from opd_bench.tiny import TinyConfig, save_tiny

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        save_tiny(scratch / "model", TinyConfig(**MODEL), seed=0)
        policy = Policy.from_pretrained(str(scratch / "model"))
        teacher = None
        if args.method == "opd":
            policy.add_adapter("bench_teacher", rank=8, alpha=16, trainable=False, seed=1)
            teacher = policy.save_adapter("bench_teacher", scratch / "teacher")
        make_trainer(args.method, policy, scratch / "warm", 1, teacher).train(progress=False)
        trainer = make_trainer(args.method, policy, scratch / "run", args.steps, teacher)
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train(progress=False)
        profiler.disable()
    pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="/tmp/old_e75db72", help="checkout of the commit to compare against")
    parser.add_argument("--reps", type=int, default=7, help="alternations of old and new per method")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per subprocess (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--methods", default="grpo,opd")
    parser.add_argument("--profile", action="store_true", help="profile this tree in-process instead")
    parser.add_argument("--method", default="grpo", help="with --profile (or --child): grpo or opd")
    parser.add_argument("--sort", default="tottime", help="with --profile: pstats sort key")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--child", choices=["build", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        return profile(args)

    old, new = Path(args.old).resolve(), ROOT
    if not (old / "opd_bench").is_dir():
        raise SystemExit(f"{old} is not a checkout; make one with `git worktree add {old} e75db72`")
    report = {"old": str(old), "new": str(new), "trees": {"old": git_state(old), "new": git_state(new)},
              "torch": torch_version(), "cpu": cpu_model(), "threads": args.threads, "reps": args.reps,
              "timed_steps_per_run": args.steps, "date": time.strftime("%Y-%m-%d"), "methods": {}}
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "model"
        run_child(old, "build", "--model", str(model), threads=args.threads)
        for method in args.methods.split(","):
            sides: dict[str, list[dict]] = {"old": [], "new": []}
            for rep in range(args.reps):
                for side in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                    tree = old if side == "old" else new
                    result = run_child(tree, "time", "--model", str(model), "--method", method, "--steps", str(args.steps), threads=args.threads)
                    sides[side].append(result)
                    print(f"{method} rep {rep} {side}: {statistics.median(result['seconds']):.3f} s/step wall, "
                          f"{statistics.median(result['cpu_seconds']):.3f} s CPU", file=sys.stderr, flush=True)
            row = {}
            for side, results in sides.items():
                row[side] = {
                    "median_s": round(statistics.median(statistics.median(r["seconds"]) for r in results), 4),
                    "median_cpu_s": round(statistics.median(statistics.median(r["cpu_seconds"]) for r in results), 4),
                    "per_rep_s": [round(statistics.median(r["seconds"]), 4) for r in results],
                    "per_rep_cpu_s": [round(statistics.median(r["cpu_seconds"]), 4) for r in results],
                    "transformer_calls_per_step": results[0]["transformer_calls_per_step"],
                    "sample_forwards_per_step": results[0]["sample_forwards_per_step"],
                }
            # The work is the same: every sample-forward of the transformer (CFG counts 2) on both
            # sides. Transformer *calls* may differ: a detached unconditional half is its own call.
            forwards = {r["sample_forwards_per_step"] for r in sides["old"] + sides["new"]}
            if len(forwards) != 1:
                raise SystemExit(f"{method}: sample-forwards per step differ between old and new: {sorted(forwards)}")
            row["speedup_wall"] = round(row["old"]["median_s"] / row["new"]["median_s"], 3)
            row["speedup_cpu"] = round(row["old"]["median_cpu_s"] / row["new"]["median_cpu_s"], 3)
            row["paired_speedup_wall"] = paired_ratios(row["old"]["per_rep_s"], row["new"]["per_rep_s"])
            row["paired_speedup_cpu"] = paired_ratios(row["old"]["per_rep_cpu_s"], row["new"]["per_rep_cpu_s"])
            report["methods"][method] = row
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
