"""How much of a GRPO group's reward spread does the initial noise decide? (issue 11, teacher probes)

For each of ``--prompts`` train prompts of a task, draws ``--starts`` initial noises x_T and, from
each, ``--continuations`` SDE trajectories with the teachers' training sampler (the `standard`
preset's teacher settings). The reward spread of one prompt's samples splits into the part between
starts (decided by x_T, which no log-probability credits) and the part within a start (decided by
the SDE steps, which the policy gradient credits). With ``--branch-at N`` a start shares the noise of
the first N steps as well, which measures how much of the outcome those steps have settled:

    python benchmarks/probe_noise_share.py --task geneval --prompts 32 --starts 4 --continuations 4

Prints one JSON line per task: the share of the reward variance between starts, and how many
groups of ``--continuations`` samples that share a start have any reward spread.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from opd_bench import suites
from opd_bench.presets import plan
from opd_bench.policy import Policy
from opd_bench.rewards.base import call_reward
from opd_bench.sde import flow_step
from probe_args import task_probe_parser


@torch.no_grad()
def sample(policy: Policy, prompts, starts: int, continuations: int, config, seed: int, branch_at: int = 0) -> torch.Tensor:
    """Final latents [prompts, starts, continuations, ...]; x_T and the noise of the first
    ``branch_at`` steps are shared within a start."""
    per_prompt = starts * continuations
    batch = len(prompts) * per_prompt
    shape = policy.latent_shape(batch)
    start_gen = torch.Generator().manual_seed(seed)
    x_start = torch.randn((len(prompts) * starts, *shape[1:]), generator=start_gen)
    x = x_start.repeat_interleave(continuations, dim=0).to(policy.device, policy.dtype)
    cond = policy.encode([p.text for p in prompts]).repeat_interleave(per_prompt)
    sigmas = policy.sigmas(config.num_steps, shape)
    sigma_max = float(sigmas[sigmas < 1].max())
    step_gen = torch.Generator().manual_seed(seed + 1)
    for i in range(config.num_steps):
        velocity = policy.velocity(x, sigmas[i], cond, config.guidance_scale)
        if i < branch_at:  # still on the shared prefix: one draw per start
            noise = torch.randn((len(prompts) * starts, *shape[1:]), generator=step_gen).repeat_interleave(continuations, dim=0)
        else:
            noise = torch.randn(x.shape, generator=step_gen)
        noise = noise.to(policy.device)
        x = flow_step(x, velocity, sigmas[i], sigmas[i + 1], config.noise_level, noise=noise, sigma_max=sigma_max).prev_sample
    return x


def decompose(rewards: torch.Tensor) -> dict:
    """rewards [P, K, M] -> the share of the variance between starts (one-way ANOVA components,
    unbiased, pooled over prompts), and the share of groups with spread."""
    continuations = rewards.shape[2]
    within = rewards.var(dim=2, unbiased=True).mean()  # sigma_w^2
    between = (rewards.mean(dim=2).var(dim=1, unbiased=True).mean() - within / continuations).clamp_min(0)
    spread = (rewards.max(dim=2).values > rewards.min(dim=2).values).float()  # [P, K]
    firsts = rewards[:, :, 0]  # one sample per start: a group with fresh starts, as GRPO draws it
    fresh_spread = (firsts.max(dim=1).values > firsts.min(dim=1).values).float()
    return {
        "mean_reward": round(float(rewards.mean()), 4),
        "between_share": round(float(between / (between + within).clamp_min(1e-12)), 3),
        "groups_with_spread_shared_start": round(float(spread.mean()), 3),
        "groups_with_spread_fresh_starts": round(float(fresh_spread.mean()), 3),
    }


def main() -> None:
    parser = task_probe_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--starts", type=int, default=4)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--branch-at", type=int, default=0, help="share the first N steps' noise too, not only x_T")
    parser.add_argument("--noise-level", type=float, default=None, help="default: the teachers' training sampler")
    parser.add_argument("--chunk", type=int, default=4, help="prompts per forward batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = plan("standard").teacher
    if args.noise_level is not None:
        config = replace(config, noise_level=args.noise_level)
    suite = suites.get("tiny")
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    for task in args.task:
        spec = suite.benchmark(task)
        reward = spec.build_reward("train")
        prompts = spec.prompts("train", limit=args.prompts)
        started = time.perf_counter()
        scores = []
        for at in range(0, len(prompts), args.chunk):
            chunk = prompts[at : at + args.chunk]
            images = policy.decode(sample(policy, chunk, args.starts, args.continuations, config, args.seed + at, args.branch_at))
            texts = [p.text for p in chunk for _ in range(args.starts * args.continuations)]
            metadata = [p.metadata for p in chunk for _ in range(args.starts * args.continuations)]
            scores.append(call_reward(reward, "reward", images, texts, metadata).scores.view(len(chunk), args.starts, args.continuations))
        rewards = torch.cat(scores)
        print(json.dumps({
            "task": task, "prompts": len(prompts), "starts": args.starts, "continuations": args.continuations,
            "branch_at": args.branch_at, "noise_level": config.noise_level, "num_steps": config.num_steps, "seed": args.seed,
            "minutes": round((time.perf_counter() - started) / 60, 2), **decompose(rewards),
        }), flush=True)


if __name__ == "__main__":
    main()
