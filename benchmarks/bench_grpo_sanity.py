"""Sanity check that GRPO moves the shipped base model on rewards it can move.

    python benchmarks/bench_grpo_sanity.py [--steps 15]                    # mean brightness
    python benchmarks/bench_grpo_sanity.py --conditional --steps 40        # brightness for "red" prompts,
                                                                           # darkness for "blue" prompts

The conditional reward depends on the prompt, as GenEval's and OCR's do: if GRPO learns it, the
trainer can learn prompt-dependent behaviour, and a task it does not learn is hard for this base at
this budget rather than blocked by the loop. Prints the held-out reward (fixed prompts and seeds, ODE
sampler) before and after, and the training-batch reward per step.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from opd_bench import rewards, suites
from opd_bench.policy import Policy
from opd_bench.rewards.base import RewardOutput, call_reward
from opd_bench.rollout import Prompt, rollout
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
from opd_bench.training import read_metrics

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a picture of a green star", "a photo of two hearts"]
CONDITIONAL_PROMPTS = ["a photo of a red circle", "a photo of a blue circle", "a photo of a red square", "a photo of a blue square"]


def red_bright_blue_dark(images: torch.Tensor, prompts, metadata) -> RewardOutput:
    """Mean brightness for prompts that say "red", minus mean brightness for the others."""
    sign = torch.tensor([1.0 if "red" in p else -1.0 for p in prompts])
    return RewardOutput(scores=images.mean(dim=(1, 2, 3)) * sign)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--conditional", action="store_true", help="the prompt-dependent reward")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    texts, reward = (CONDITIONAL_PROMPTS, red_bright_blue_dark) if args.conditional else (PROMPTS, rewards.get("toy/brightness"))
    prompts = [Prompt(text, "toy") for text in texts]

    def held_out() -> list[float]:
        """Held-out reward per prompt (4 images each)."""
        with policy.use("student"):
            t = rollout(policy, prompts, images_per_prompt=4, num_steps=8, noise_level=0.0, seed=123, keep={"images"})
        return [round(v, 3) for v in call_reward(reward, "sanity", t.images, t.prompts, t.metadata).scores.view(len(prompts), 4).mean(1).tolist()]

    config = GRPOConfig(
        steps=args.steps, prompts_per_step=4, group_size=8 if args.conditional else 4, num_steps=8,
        lr=1e-3 if args.conditional else 3e-3, micro_batch=64, eval_every=0, checkpoint_every=0, clip_range=0.2,
        # the group std and one update per rollout: the settings its documented results were measured with
        train_fraction=0.5, adv_std="group", updates_per_rollout=1,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(config, policy=policy, prompts=prompts, rewards={"toy": reward}, run_dir=run_dir)
        before = held_out()
        trainer.train(progress=False)
        after = held_out()
        curve = [round(r["reward/toy/mean"], 3) for r in read_metrics(f"{run_dir}/metrics.jsonl")]
    print(f"held-out reward per prompt {texts}: {before} -> {after}; training batches: {curve}")


if __name__ == "__main__":
    main()
