"""Is each task learnable by GRPO from a model? Share of GRPO groups whose reward has no spread.

Samples groups the way the standard preset's teachers do (SDE sampler, noise 0.7, 8 steps, CFG
4.5, groups of 4) on evenly spaced train prompts of each task, scores them with the task's
training reward and prints, per task, the mean reward and the share of groups in which every
image got the same reward (such a group has zero advantage and teaches GRPO nothing).

    python benchmarks/bench_reward_spread.py [--model tiny] [--prompts 48] [--group 4]
"""
from __future__ import annotations

import argparse
import json

from opd_bench import suites
from opd_bench.policy import Policy
from opd_bench.rewards.base import call_reward
from opd_bench.rl import zero_spread_share
from opd_bench.rollout import rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=48, help="train prompts per task (evenly spaced)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--num-steps", type=int, default=8)
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    suite = suites.get("tiny")
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    out = {}
    for task in suite.tasks:
        spec = suite.benchmark(task)
        prompts = spec.prompts("train", limit=args.prompts)
        traj = rollout(policy, prompts, images_per_prompt=args.group, num_steps=args.num_steps,
                       noise_level=args.noise_level, guidance_scale=args.guidance, seed=args.seed, keep={"images"})
        scores = call_reward(spec.build_reward("train"), task, traj.images, traj.prompts, traj.metadata).scores
        out[task] = {"mean_reward": round(float(scores.mean()), 4),
                     "zero_spread_share": round(zero_spread_share(scores, traj.group), 3), "groups": len(prompts)}
        print(task, json.dumps(out[task]), flush=True)
    print(json.dumps({**vars(args), "tasks": out}))


if __name__ == "__main__":
    main()
