"""The variance experiment: analytic DiffusionOPD gradient versus the PPO-style estimator.

At fixed student parameters, ``repeats`` independent batches of student trajectories are drawn
(SDE rollouts at noise level ``a``); on each batch, on the very same states and sampled next
states, both estimators of the gradient of the per-step KL to the teacher are computed:

* analytic: grad of ``step_kl(mu_theta, mu_T, std)`` (pathwise through the student's mean);
* PPO-style: grad of ``-r * rho`` with ``r = log pi_T(x') - log pi_theta_old(x')`` and
  ``rho = pi_theta / pi_theta_old`` (= 1 at the current parameters): a score-function estimate.

Both use the per-dimension mean reduction and the exact step weighting, so they estimate the same
quantity. Reported per (batch size, noise level): the trace of each estimator's covariance over
the repeats, their ratio (PPO over analytic), and the cosine between the two mean gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from opd_bench.policy import Policy
from opd_bench.rl import distillation_loss, process_reward, step_at
from opd_bench.rollout import Prompt, rollout
from opd_bench.training import sample_prompts, step_seed


def _flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float() for p in params])


def estimate_gradients(
    policy: Policy,
    student: str,
    teacher: str,
    prompts: Sequence[Prompt],
    *,
    noise_level: float,
    num_steps: int,
    guidance_scale: float,
    teacher_guidance: float,
    seed: int,
    micro_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(analytic, ppo) gradients on one batch of student trajectories, all steps trained; the
    (sample, step) pairs go ``micro_batch`` at a time through each backward (None: all at once),
    as a trainer's do, so that the experiment fits where the training does."""
    params = policy.parameters(student)
    with policy.use(student):
        trajectory = rollout(
            policy, prompts, num_steps=num_steps, noise_level=noise_level,
            guidance_scale=guidance_scale, seed=seed, keep={"latents"},
        )
    index = torch.arange(len(trajectory)).repeat_interleave(num_steps)
    step = torch.arange(num_steps).repeat(len(trajectory))
    with torch.no_grad(), policy.use(teacher):
        target = step_at(policy, trajectory, index, step, guidance_scale=teacher_guidance)
    grads = []
    size = micro_batch or len(index)
    for estimator in ("analytic", "ppo"):
        for p in params:
            p.grad = None
        for start in range(0, len(index), size):  # each chunk adds its share of the mean over all pairs
            chunk = slice(start, start + size)
            # backward inside use(student): with gradient checkpointing the forward is recomputed
            # there, and must see the same adapter (outside it, the student's LoRA is switched off)
            with policy.use(student):
                current = step_at(policy, trajectory, index[chunk], step[chunk], guidance_scale=guidance_scale)
                if estimator == "analytic":
                    per_pair = distillation_loss(current, target.select(chunk))
                else:
                    old = trajectory.log_probs[index[chunk], step[chunk]].to(current.log_prob.device)
                    reward = process_reward(old, target.log_prob[chunk], trajectory.final[0].numel())
                    per_pair = -(reward * torch.exp(current.log_prob - old))
                (per_pair.sum() / len(index)).backward()
        grads.append(_flat_grad(params))
    for p in params:
        p.grad = None
    return grads[0], grads[1]


def variance_experiment(
    policy: Policy,
    student: str,
    teacher: str,
    prompts: Sequence[Prompt],
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    noise_levels: Sequence[float] = (0.1, 0.3, 0.7, 1.0),
    repeats: int = 8,
    num_steps: int = 10,
    guidance_scale: float = 4.5,
    teacher_guidance: float | None = None,
    seed: int = 0,
    micro_batch: int | None = None,
) -> list[dict]:
    """One row per (batch size, noise level) with both estimators' variance and their ratio.
    ``teacher_guidance``: the teacher's CFG scale, as DiffusionOPD's ``teacher_guidance`` sets it
    for the task (default: ``guidance_scale``); ``micro_batch``: (sample, step) pairs per backward."""
    teacher_guidance = guidance_scale if teacher_guidance is None else teacher_guidance
    if repeats < 2:
        raise ValueError("the variance needs at least 2 repeats")
    rows = []
    for noise_level in noise_levels:
        if noise_level <= 0:
            raise ValueError("the PPO-style estimator needs noise_level > 0")
        for batch in batch_sizes:
            analytic, ppo = [], []
            for k in range(repeats):
                chosen = sample_prompts(prompts, batch, step_seed(seed, k, batch))
                a, p = estimate_gradients(
                    policy, student, teacher, chosen, noise_level=noise_level, num_steps=num_steps,
                    guidance_scale=guidance_scale, teacher_guidance=teacher_guidance,
                    seed=step_seed(seed, k, 1000 + batch), micro_batch=micro_batch,
                )
                analytic.append(a)
                ppo.append(p)
            rows.append({"batch": batch, "noise_level": noise_level, "repeats": repeats, **_compare(torch.stack(analytic), torch.stack(ppo))})
    return rows


def _compare(analytic: torch.Tensor, ppo: torch.Tensor) -> dict:
    def trace(g):
        return float(((g - g.mean(0)) ** 2).sum(1).sum() / (len(g) - 1))

    var_a, var_p = trace(analytic), trace(ppo)
    mean_a, mean_p = analytic.mean(0), ppo.mean(0)
    cosine = float(torch.nn.functional.cosine_similarity(mean_a, mean_p, dim=0))
    return {
        "var_analytic": var_a,
        "var_ppo": var_p,
        "ratio_ppo_over_analytic": var_p / var_a if var_a > 0 else math.nan,  # undefined if student == teacher
        "rel_var_analytic": var_a / max(float(mean_a.pow(2).sum()), 1e-30),
        "rel_var_ppo": var_p / max(float(mean_p.pow(2).sum()), 1e-30),
        "cosine_of_means": cosine,
    }
