"""Sanity check that GRPO moves the shipped base model on a reward it can move: mean brightness.

    python benchmarks/bench_grpo_sanity.py [--steps 15]

Prints the held-out reward (fixed prompts and seeds, ODE sampler) before and after, and the
training-batch reward per step.
"""

from __future__ import annotations

import argparse
import tempfile

from opd_bench import rewards, suites
from opd_bench.policy import Policy
from opd_bench.rollout import Prompt, rollout
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
from opd_bench.training import read_metrics

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a picture of a green star", "a photo of two hearts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    prompts = [Prompt(text, "bright") for text in PROMPTS]
    reward = rewards.get("toy/brightness")

    def held_out() -> float:
        with policy.use("student"):
            t = rollout(policy, prompts, images_per_prompt=2, num_steps=8, noise_level=0.0, seed=123, keep={"images"})
        return reward(t.images, t.prompts, t.metadata).scores.mean().item()

    config = GRPOConfig(
        steps=args.steps, prompts_per_step=4, group_size=4, num_steps=8, lr=3e-3, micro_batch=64,
        eval_every=0, checkpoint_every=0, clip_range=0.2, train_fraction=0.5,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(config, policy=policy, prompts=prompts, rewards={"bright": reward}, run_dir=run_dir)
        before = held_out()
        trainer.train(progress=False)
        after = held_out()
        curve = [round(r["reward/bright/mean"], 3) for r in read_metrics(f"{run_dir}/metrics.jsonl")]
    print(f"held-out brightness: {before:.3f} -> {after:.3f}; training batches: {curve}")


if __name__ == "__main__":
    main()
