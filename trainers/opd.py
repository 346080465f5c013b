"""DiffusionOPD: distil per-task teachers into one student by on-policy distillation.

Each optimizer step visits every task once (round-robin, gradients accumulated over the task
batches): the student rolls out its own trajectories for that task's prompts; at each trained
step the task's teacher (a frozen adapter on the same backbone, with its own guidance scale)
gives its transition at the student's state. Two modes:

* ``analytic``: minimise the closed-form per-step KL (mean matching on ODE steps), a pathwise
  gradient through the student's mean only (``opd_bench.rl.distillation_loss``);
* ``ppo``: the teacher as a process reward ``log pi_T(x') - log pi_theta(x')`` on the sampled next
  state, optimised with the clipped ratio objective (needs stochastic steps).

Task rewards are only monitored, never in the loss.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch

from opd_bench import distributed
from opd_bench.distributed import SINGLE, ProcessGroup
from opd_bench.policy import Policy
from opd_bench.rewards import Reward
from opd_bench.rewards.base import call_reward
from opd_bench.rl import clipped_policy_loss, distillation_loss, process_reward, step_at, train_step_indices
from opd_bench.rollout import Prompt, rollout
from opd_bench.sde import step_kl
from opd_bench.training import (
    GradVariance, LRSchedule, TrainingRun, check_field_types, check_fields, check_reward_names,
    sample_prompts, shared_rules, step_seed, student_optimizer, training_data,
)


def teacher_adapter_name(task: str) -> str:
    return f"teacher_{task}"


def _teacher_on(policy: Policy, task: str, folder: str | Path) -> str:
    """The adapter name of ``task``'s teacher from ``folder`` on ``policy``, loaded if not yet there.
    Trainers on one policy share a teacher loaded from the same folder; one from another folder is
    loaded beside it (reusing it made a second trainer distil the first trainer's teacher)."""
    folder = Path(folder).resolve()
    name = teacher_adapter_name(task)
    if name in policy.adapters and policy.adapter_source(name) != folder:
        name = f"{name}@{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    if name not in policy.adapters:
        policy.load_adapter(name, folder, trainable=False)
    return name


def _teacher_record(teachers: Mapping[str, str | Path], run_dir: str | Path) -> dict[str, str]:
    """The teachers' folders for the run's saved config, relative to the run folder: the same
    run resumed from another working directory, or with ``--out`` spelled another way, matches."""
    def relative(folder: Path) -> str:
        try:
            return Path(os.path.relpath(folder, Path(run_dir).resolve())).as_posix()
        except ValueError:  # on another drive (Windows): no relative path
            return folder.as_posix()

    return {task: relative(Path(folder).resolve()) for task, folder in teachers.items()}


@dataclass
class OPDConfig:
    mode: Literal["analytic", "ppo"] = "analytic"
    steps: int = 40
    prompts_per_task: int = 8  # one batch per teacher per optimizer step
    images_per_prompt: int = 1
    num_steps: int = 10
    noise_level: float = 0.0  # 0 = deterministic rollouts (the paper's setting); ppo needs > 0
    guidance_scale: float = 4.5  # the student's
    teacher_guidance: dict[str, float] = field(default_factory=dict)  # per task; default guidance_scale
    train_fraction: float = 0.9  # 9 of 10 steps
    weighting: Literal["step", "reference"] = "step"
    # False: the student's loss differentiates its whole guided velocity, as the paper's student is
    # the CFG-4.5 model; True drops the unconditional half's gradient (as GRPOConfig's default), faster.
    detach_uncond: bool = False
    clip_range: float = 0.2  # ppo mode
    lr: float = 3e-4
    lr_schedule: LRSchedule = "constant"  # cosine: decays to 0 over `steps`
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16
    full_params: bool = False  # train a full copy of the transformer instead of a LoRA adapter
    micro_batch: int = 32
    ema: float | None = None
    monitor_rewards: bool = True
    eval_every: int = 10
    # Read by nothing: a trainer's curves come from the `evaluate` it is given (the harness's scores
    # RunPlan.train_eval_limit prompts). Kept so runs and teachers recorded so far keep their keys.
    eval_limit: int = 16
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types("OPD config", self)  # mode, weighting and lr_schedule among its Literal fields
        if self.mode == "ppo" and self.noise_level <= 0:
            raise ValueError("mode='ppo' needs noise_level > 0: a deterministic step has no log-probability to form the process reward")
        check_fields("OPD config", self, {
            "steps": (self.steps >= 1, ">= 1"), "prompts_per_task": (self.prompts_per_task >= 1, ">= 1"),
            "images_per_prompt": (self.images_per_prompt >= 1, ">= 1"), "num_steps": (self.num_steps >= 1, ">= 1"),
            "noise_level": (self.noise_level >= 0, ">= 0"), "train_fraction": (0 < self.train_fraction <= 1, "0 < x <= 1"),
            "clip_range": (self.clip_range > 0, "> 0"), "lr": (self.lr > 0, "> 0"),
            "micro_batch": (self.micro_batch >= 1, ">= 1"), "lora_rank": (self.lora_rank >= 1, ">= 1"),
            "ema": (self.ema is None or 0 < self.ema < 1, "0 < x < 1, or null"), **shared_rules(self),
            "teacher_guidance": (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                                     for v in self.teacher_guidance.values()), "a finite scale >= 0 for each task"),
        })

    def to_dict(self) -> dict:
        return asdict(self)


def opd_task_step(
    policy: Policy,
    adapter: str,
    teacher: str,
    prompts: Sequence[Prompt],
    config: OPDConfig,
    *,
    teacher_guidance: float,
    seed: int,
    reward: Reward | None,
    loss_scale: float,
    grad_variance: GradVariance | None,
    ranks: ProcessGroup = SINGLE,
) -> tuple[dict, int]:
    """One task's batch: student rollout, teacher targets, gradient accumulated into ``.grad``.

    ``prompts`` are the task's whole batch; with several processes (``ranks``) this rank takes
    its share, with the noise and trained steps of those samples' global indices, and the
    metrics are global (see ``grpo_step``). ``images`` counts this rank's samples.
    """
    with policy.use(adapter):  # the student stays active but for the teacher's calls
        return _opd_task_step(
            policy, adapter, teacher, prompts, config, teacher_guidance=teacher_guidance, seed=seed, reward=reward,
            loss_scale=loss_scale, grad_variance=grad_variance, ranks=ranks,
        )


def _opd_task_step(
    policy, adapter, teacher, prompts, config: OPDConfig, *, teacher_guidance, seed, reward, loss_scale, grad_variance, ranks
) -> tuple[dict, int]:
    local, first = ranks.shard(prompts, "prompts per task")
    offset = first * config.images_per_prompt
    keep = {"latents", "images"} if reward is not None else {"latents"}
    trajectory = rollout(
        policy, local, images_per_prompt=config.images_per_prompt, num_steps=config.num_steps,
        noise_level=config.noise_level, guidance_scale=config.guidance_scale, seed=seed, keep=keep,
        sample_offset=offset,
    )
    # drawn for the whole batch, then sliced: every sample trains on the same steps in any world size
    steps = train_step_indices(len(prompts) * config.images_per_prompt, config.num_steps, config.train_fraction, torch.Generator().manual_seed(seed))
    steps = steps[offset : offset + len(trajectory)]
    pairs = [(i, int(s)) for i in range(len(trajectory)) for s in steps[i]]
    totals = {"loss": 0.0, "kl": 0.0}
    for start in range(0, len(pairs), config.micro_batch):
        chunk = pairs[start : start + config.micro_batch]
        index, step = torch.tensor([i for i, _ in chunk]), torch.tensor([s for _, s in chunk])
        student = step_at(policy, trajectory, index, step, guidance_scale=config.guidance_scale, detach_uncond=config.detach_uncond)
        with torch.no_grad(), policy.use(teacher):
            target = step_at(policy, trajectory, index, step, guidance_scale=teacher_guidance)
        kl = step_kl(student.mean.detach(), target.mean, student.std, weighting=config.weighting, dt=student.dt)
        if config.mode == "analytic":
            per_pair = distillation_loss(student, target, weighting=config.weighting)
        else:
            old = trajectory.log_probs[index, step].to(student.log_prob.device)
            advantage = process_reward(old, target.log_prob, trajectory.final[0].numel())
            per_pair, _ = clipped_policy_loss(student.log_prob, old, advantage, config.clip_range)
        (per_pair.sum() * loss_scale / len(pairs)).backward()
        if grad_variance is not None:
            grad_variance.record(loss_scale * len(chunk) / len(pairs))
        totals["loss"] += per_pair.detach().sum().item()
        totals["kl"] += kl.sum().item()
    summed = ranks.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()
    metrics = {key: value / (len(pairs) * ranks.world_size) for key, value in zip(totals, summed)}
    if reward is not None:
        scores = ranks.all_gather(call_reward(reward, "monitored", trajectory.images, trajectory.prompts, trajectory.metadata).scores)
        metrics["reward/mean"] = scores.nanmean().item()
        metrics["reward/std"] = scores[~scores.isnan()].std().item() if (~scores.isnan()).sum() > 1 else 0.0
    return metrics, len(trajectory)


class OPDTrainer:
    """Distil ``teachers`` (task -> adapter folder) into a new student adapter of ``policy``."""

    def __init__(
        self,
        config: OPDConfig,
        *,
        policy: Policy,
        prompts: Mapping[str, Sequence[Prompt]],
        teachers: Mapping[str, str | Path],
        run_dir: str | Path,
        rewards: Mapping[str, Reward] | None = None,
        adapter: str = "student",
        evaluate: Callable | None = None,
        overwrite: bool = False,
        extra_config: dict | None = None,
    ):
        missing = sorted(set(prompts) - set(teachers))
        if missing:
            raise ValueError(f"no teacher for task(s) {missing}; pass teachers={{task: adapter_folder}}")
        self.config, self.policy, self.adapter = config, policy, adapter
        self.ranks = distributed.current()
        if config.prompts_per_task % self.ranks.world_size:
            raise ValueError(
                f"prompts_per_task={config.prompts_per_task} cannot be split over {self.ranks.world_size} processes; "
                "use a multiple of the number of processes"
            )
        self.tasks = list(prompts)
        self.prompts = {task: list(pool) for task, pool in prompts.items()}
        check_reward_names("teacher_guidance", config.teacher_guidance, self.tasks, "tasks")
        if config.monitor_rewards:
            check_reward_names("rewards", rewards or {}, self.tasks, "tasks")
        self.rewards = dict(rewards or {}) if config.monitor_rewards else {}
        self.teachers = {task: _teacher_on(policy, task, teachers[task]) for task in self.tasks}
        self.params, self.optimizer, self.ema = student_optimizer(policy, adapter, config)
        method = "opd" if config.mode == "analytic" else "opd-ppo"
        self.run = TrainingRun(
            run_dir, config={"method": method, **config.to_dict(), "teachers": _teacher_record(teachers, run_dir),
                             "data": {task: training_data(pool) for task, pool in self.prompts.items()}, **(extra_config or {})},
            policy=policy, adapter=adapter, params=self.params, optimizer=self.optimizer, ema=self.ema,
            teachers=list(self.teachers.values()), evaluate=evaluate, eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every, overwrite=overwrite,
        )
        self.grad_variance = GradVariance(self.params)

    def train(self, progress: bool = True) -> Path:
        config = self.config

        def step_fn(step: int) -> tuple[dict, int]:
            metrics: dict[str, float] = {"loss": 0.0, "kl": 0.0}
            images = 0
            for k, task in enumerate(self.tasks):
                prompts = sample_prompts(self.prompts[task], config.prompts_per_task, step_seed(config.seed, step, 10 + k))
                task_metrics, n = opd_task_step(
                    self.policy, self.adapter, self.teachers[task], prompts, config,
                    teacher_guidance=config.teacher_guidance.get(task, config.guidance_scale),
                    seed=step_seed(config.seed, step, 100 + k), reward=self.rewards.get(task),
                    loss_scale=1 / len(self.tasks), grad_variance=self.grad_variance, ranks=self.ranks,
                )
                images += n
                for key, value in task_metrics.items():
                    if key in ("loss", "kl"):
                        metrics[key] += value / len(self.tasks)
                        metrics[f"{key}/{task}"] = value
                    else:
                        metrics[key.replace("reward/", f"reward/{task}/")] = value
            return metrics, images

        return self.run.train(
            step_fn, steps=config.steps, max_grad_norm=config.max_grad_norm, grad_variance=self.grad_variance,
            desc=f"opd-{config.mode}", lr=config.lr, lr_schedule=config.lr_schedule, progress=progress,
        )
