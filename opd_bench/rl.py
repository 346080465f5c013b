"""Shared RL and distillation math: advantages, the clipped GRPO loss, per-step recomputation.

Functions, not classes: every trainer (Flow-GRPO teachers, DiffusionOPD, multi-reward and
cascade RL) composes the same few pieces. Formulas: PAPER.md sections 1-2.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from opd_bench.policy import Policy
from opd_bench.rollout import Trajectory
from opd_bench.sde import StepOutput, flow_step, step_kl


def group_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    *,
    std: Literal["group", "batch"] = "group",
    clip: float | None = 5.0,
    eps: float = 1e-4,
    ddof: int = 0,
) -> torch.Tensor:
    """``A_i = (r_i - mean of its prompt's group) / (std + eps)``, clipped to ``[-clip, clip]``.

    ``std="group"`` divides by the group's own std, ``"batch"`` by the std of the whole batch.
    ``ddof=0``: the population std (``np.std``'s default, as Flow-GRPO); ``ddof=1``: the unbiased
    std, which on a group of 4 is sqrt(4/3) larger, so advantages are 0.87x Flow-GRPO's.
    Groups whose rewards are all equal get advantage 0. NaN rewards are not allowed here: route
    samples to their task's reward first.
    """
    rewards = rewards.float()
    if torch.isnan(rewards).any():
        raise ValueError("advantages need a finite reward for every sample; got NaN (a reward not applicable)")
    if std not in ("group", "batch"):
        raise ValueError(f"std must be 'group' or 'batch', got {std!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (unbiased), got {ddof!r}")
    _, inverse = torch.unique(group, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if std == "group":
        var = torch.zeros_like(count).index_add_(0, inverse, centred**2) / (count - ddof).clamp(min=1)
        scale = var.sqrt()[inverse]
    else:
        scale = rewards.std(correction=ddof).expand_as(rewards) if len(rewards) > 1 else torch.zeros_like(rewards)
    advantages = torch.where(centred == 0, torch.zeros_like(centred), centred / (scale + eps))
    return advantages.clamp(-clip, clip) if clip is not None else advantages


def zero_spread_share(rewards: torch.Tensor, group: torch.Tensor, tol: float = 1e-6) -> float:
    """Share of prompt groups whose rewards are all (nearly) equal: they teach GRPO nothing."""
    ids = group.unique()
    flat = sum(bool((rewards[group == g].max() - rewards[group == g].min()) <= tol) for g in ids)
    return flat / len(ids)


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """Per-sample ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with ``rho = exp(log p - log p_old)``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().item(),
        }
    return loss, stats


def train_step_indices(
    num_samples: int,
    num_steps: int,
    fraction: float,
    generator: torch.Generator | None = None,
    trainable: Sequence[int] | None = None,
    *,
    mode: Literal["first", "random"] = "random",
) -> torch.Tensor:
    """For each sample, which of its steps to train on; returns ``[num_samples, k]`` step indices.

    ``mode="first"``: the first ``k = int(fraction * n)`` of the ``n`` trainable steps, the same for
    every sample (Flow-GRPO's ``timestep_fraction``: its loop trains steps ``0 .. k-1``).
    ``mode="random"``: a random ``k = round(fraction * n)`` of them per sample (drawn from
    ``generator``), so every step is trained on across the batch. ``k`` is at least 1.
    """
    steps = torch.as_tensor(list(trainable) if trainable is not None else range(num_steps))
    if mode == "first":
        k = max(1, int(fraction * len(steps)))  # int(), not round(): Flow-GRPO's count
        return steps[:k].expand(num_samples, k)
    if mode != "random":
        raise ValueError(f"mode must be 'first' or 'random', got {mode!r}")
    if generator is None:
        raise ValueError("mode='random' needs a generator (the subsets must be reproducible)")
    k = max(1, round(fraction * len(steps)))
    order = torch.stack([torch.randperm(len(steps), generator=generator) for _ in range(num_samples)])
    return steps[order[:, :k]]


def step_at(
    policy: Policy,
    trajectory: Trajectory,
    index: torch.Tensor,
    step: torch.Tensor,
    *,
    guidance_scale: float,
    sigma_max: float | None = None,
    detach_uncond: bool = False,
) -> StepOutput:
    """Re-evaluate step ``step[j]`` of sample ``index[j]`` with the policy's active adapter.

    Scores the stored next state, so ``log_prob`` is the current policy's density of the action
    actually taken; gradients flow when called outside ``no_grad`` (through the conditional half
    of guidance only with ``detach_uncond``, see ``Policy.velocity``).
    """
    if trajectory.latents is None:
        raise ValueError("this needs the states: roll out with keep={'latents', ...}")
    device = policy.device
    index, step = index.to(trajectory.latents.device), step.to(trajectory.latents.device)
    x = trajectory.latents[index, step]
    x_next = trajectory.latents[index, step + 1]
    sigma = trajectory.sigmas[step.cpu()].to(device)
    sigma_next = trajectory.sigmas[step.cpu() + 1].to(device)
    levels = torch.tensor([trajectory.noise_levels[s] for s in step.tolist()])
    if len(set(levels.tolist())) > 1:
        raise ValueError("steps re-evaluated together must share a noise level")
    cond = trajectory.embeds.select(index.to(trajectory.embeds.embeds.device))
    velocity = policy.velocity(x, sigma, cond, guidance_scale, detach_uncond=detach_uncond)
    if sigma_max is None:
        below = trajectory.sigmas[trajectory.sigmas < 1]
        sigma_max = float(below.max()) if len(below) else None
    return flow_step(x, velocity, sigma, sigma_next, float(levels[0]), prev_sample=x_next, sigma_max=sigma_max)


def distillation_loss(
    student: StepOutput, teacher: StepOutput, *, weighting: Literal["step", "reference"] = "step"
) -> torch.Tensor:
    """DiffusionOPD's per-sample objective: closed-form per-step KL / mean matching (student first)."""
    return step_kl(student.mean, teacher.mean.detach(), student.std, weighting=weighting, dt=student.dt)


def process_reward(student_log_prob: torch.Tensor, teacher_log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    """The PPO-style variant's per-step reward: the true log-ratio ``log pi_T(x') - log pi_theta(x')``.

    Log-probs here are per-dimension means (``flow_step``'s default), so the difference is scaled
    back by ``num_dims``: with ``r`` the true log-ratio and the ratio built from mean log-probs,
    ``E[-r grad log pi]`` equals the gradient of the per-dimension KL that the analytic loss
    (``step_kl(reduce="mean")``) differentiates, so the two estimators target the same gradient.
    (Using the mean log-ratio as the reward would shrink the PPO gradient by another ``num_dims``.)
    """
    if torch.isnan(student_log_prob).any() or torch.isnan(teacher_log_prob).any():
        raise ValueError("the process reward needs stochastic steps (noise_level > 0): ODE steps have no density")
    return (teacher_log_prob - student_log_prob) * num_dims
