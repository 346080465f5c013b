"""Flow-GRPO: single-task RL (how teachers are made) and the engine of the RL baselines.

One rollout: sample prompts, roll out ``group_size`` SDE trajectories per prompt with the trained
adapter, score them and turn rewards into per-prompt advantages. Then ``updates_per_rollout``
optimizer steps, each on its share of the samples: minimise the clipped ratio loss on the first
``train_fraction`` of each trajectory's steps, plus an optional closed-form KL to the adapter-free
base. Defaults follow Flow-GRPO's ``train_sd3.py`` and its published SD3.5 configs exactly
(population std of the whole batch, first-k steps, unconditional half of guidance detached as in the
loop issue 11 compared against (not in train_sd3.py at 74db691: README), the KL over 2 std_dev_t^2,
two updates per rollout); each difference has an option. ``rewards`` maps names to rewards; ``aggregation`` says how several
rewards become one advantage (multi-reward RL); a teacher has one reward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from opd_bench import distributed
from opd_bench.distributed import SINGLE, ProcessGroup
from opd_bench.policy import Policy
from opd_bench.rewards import Reward
from opd_bench.rewards.base import call_reward
from opd_bench.rl import clipped_policy_loss, group_advantages, step_at, train_step_indices, zero_spread_share
from opd_bench.rollout import Prompt, rollout
from opd_bench.sde import step_kl
from opd_bench.training import (
    GradVariance, LRSchedule, TrainingRun, check_field_types, check_fields, check_reward_names,
    sample_prompts, shared_rules, step_seed, student_optimizer, training_data,
)

Aggregation = Literal["own", "sum-then-normalise", "normalise-then-sum"]


@dataclass
class GRPOConfig:
    steps: int = 40  # optimizer steps
    prompts_per_step: int = 8  # prompts whose samples one optimizer step trains on
    group_size: int = 4  # images per prompt
    # Optimizer steps per rollout. A rollout samples updates_per_rollout x prompts_per_step prompts,
    # normalises their advantages together and deals each group's samples at random into that many
    # equal parts, one per step; so every step still trains on prompts_per_step x group_size samples,
    # and the later ones are slightly off-policy, which is where the ratio clip can bind. 2 is Flow-GRPO's SD3.5 configs
    # (gradient_accumulation_steps = num_batches_per_epoch // 2: "updated twice per epoch"); 1
    # makes every step on-policy (this project before issue 11's second review).
    updates_per_rollout: int = 2
    num_steps: int = 10  # sampling steps
    # One SDE noise level for every sampling step (Flow-GRPO), or one per step: 0 makes a step
    # deterministic (an ODE step), e.g. after the trained window as MixGRPO / Flow-GRPO-Fast sample.
    # The trained steps share one level (a micro-batch re-evaluates several steps together).
    noise_level: float | list[float] = 0.7
    guidance_scale: float = 4.5
    train_fraction: float = 0.6  # share of each trajectory's steps trained on
    # "first": steps 0 .. int(train_fraction * num_steps) - 1 of every sample (Flow-GRPO);
    # "random": a random subset per sample (this project before issue 11)
    train_steps: Literal["first", "random"] = "first"
    # Gradients through the conditional half of guidance only, as the Flow-GRPO loop of issue 11's check
    # (noise_pred_uncond.detach()); flow_grpo's train_sd3.py at 74db691 does not detach: False matches it
    detach_uncond: bool = True
    clip_range: float = 1e-4  # Flow-GRPO's ratio clip on SD3.5
    # "batch": (r - group mean) / (std of the whole rollout's rewards, every process's, + 1e-4), as
    # Flow-GRPO's published SD3.5 configs (global_std=True); "group": the group's own std
    adv_std: Literal["group", "batch"] = "batch"
    adv_ddof: int = 0  # 0: population std, np.std's default (Flow-GRPO); 1: unbiased std
    adv_clip: float | None = 5.0  # None: no clipping
    kl_beta: float = 0.0
    # Flow-GRPO's KL penalty divides by 2 std_s^2 ("reference"), not by the step's variance
    # 2 std_s^2 |dt| ("step", the exact KL), so its published betas (0.04, 0.01) mean "reference";
    # "step" weighs step s 1/|dt| times more (9-19x on the standard teachers' 4 trained steps).
    kl_weighting: Literal["step", "reference"] = "reference"
    lr: float = 3e-4
    lr_schedule: LRSchedule = "constant"  # cosine: decays to 0 over `steps`
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16
    full_params: bool = False  # train a full copy of the transformer instead of a LoRA adapter
    micro_batch: int = 32  # (sample, step) pairs per backward
    ema: float | None = None
    aggregation: Aggregation = "own"
    reward_weights: dict[str, float] = field(default_factory=dict)  # for the two sum aggregations
    eval_every: int = 10
    # Read by nothing: a trainer's curves come from the `evaluate` it is given (the harness's scores
    # RunPlan.train_eval_limit prompts). Kept so runs and teachers recorded so far keep their keys.
    eval_limit: int = 16
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types("GRPO config", self)  # train_steps, adv_std, aggregation, ... among its Literal fields
        check_fields("GRPO config", self, {
            "steps": (self.steps >= 1, ">= 1"), "prompts_per_step": (self.prompts_per_step >= 1, ">= 1"),
            "group_size": (self.group_size >= 2, ">= 2: advantages need a group"), "num_steps": (self.num_steps >= 1, ">= 1"),
            "train_fraction": (0 < self.train_fraction <= 1, "0 < x <= 1"), "clip_range": (self.clip_range > 0, "> 0"),
            "lr": (self.lr > 0, "> 0"), "micro_batch": (self.micro_batch >= 1, ">= 1"), "kl_beta": (self.kl_beta >= 0, ">= 0"),
            "lora_rank": (self.lora_rank >= 1, ">= 1"), "ema": (self.ema is None or 0 < self.ema < 1, "0 < x < 1, or null"),
            "updates_per_rollout": (self.updates_per_rollout >= 1 and self.group_size % self.updates_per_rollout == 0,
                                    f">= 1 and dividing group_size={self.group_size}: each group is dealt evenly over the updates"),
            **shared_rules(self),
        })
        self._check_rollout_boundaries()
        self._check_noise_level()
        if self.adv_ddof not in (0, 1):
            raise ValueError(f"adv_ddof must be 0 (population std, Flow-GRPO) or 1 (unbiased), got {self.adv_ddof!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def _check_rollout_boundaries(self) -> None:
        """A run ends, checkpoints and evaluates between rollouts: a resume then never needs a
        rollout that only the killed process held, and a curve's point counts whole rollouts."""
        per = self.updates_per_rollout
        for name in ("steps", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            if value % per:
                fix = ", ".join(str(v) for v in sorted({max(per, value - value % per), value - value % per + per}))
                raise ValueError(f"{name}={value} is not a multiple of updates_per_rollout={per} (each rollout serves "
                                 f"{per} optimizer steps, and runs end, checkpoint and evaluate between rollouts); use "
                                 f"{name} {fix}, or updates_per_rollout=1")

    def _check_noise_level(self) -> None:
        levels = self.noise_level if isinstance(self.noise_level, list) else [self.noise_level]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in levels):
            raise ValueError(f"noise_level must be a number > 0 or a list of numbers >= 0, got {self.noise_level!r}")
        if not isinstance(self.noise_level, list):
            if self.noise_level <= 0:
                raise ValueError(f"invalid GRPO config value(s): noise_level={self.noise_level!r} (needs > 0: GRPO needs stochastic steps)")
            return
        if len(levels) != self.num_steps:
            raise ValueError(f"noise_level lists {len(levels)} levels for num_steps={self.num_steps}; give one per sampling step")
        trained = (range(self.num_steps) if self.train_steps == "random" else
                   train_step_indices(1, self.num_steps, self.train_fraction, mode="first")[0].tolist())
        if any(levels[step] <= 0 for step in trained):
            raise ValueError(f"noise_level {self.noise_level!r} is 0 on a trained step (train_steps={self.train_steps!r}, "
                             f"train_fraction={self.train_fraction}): GRPO needs stochastic steps where it trains")
        if len({levels[step] for step in trained}) > 1:  # a micro-batch re-evaluates several steps in one call
            raise ValueError(f"noise_level {self.noise_level!r} varies over the trained steps (train_steps={self.train_steps!r}, "
                             f"train_fraction={self.train_fraction}); give them one level, and vary only the untrained steps")


def aggregate_advantages(
    scores: Mapping[str, torch.Tensor], group: torch.Tensor, tasks: Sequence[str], config: GRPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of several tasks -> (one scalar reward per sample, advantages).

    ``own``: each sample is scored by its own task's reward. ``sum-then-normalise``: the weighted
    sum of all rewards (NaN counts 0), then normalised (``config.adv_std``: by the group's or the
    batch's std). ``normalise-then-sum``: each reward normalised separately over the samples it
    applies to (a NaN sample gets advantage 0 from that reward), then the weighted sum of the
    advantages.
    """
    options = dict(std=config.adv_std, clip=config.adv_clip, ddof=config.adv_ddof)
    if config.aggregation == "own":
        own = torch.stack([scores[task][i] if task in scores else torch.tensor(math.nan) for i, task in enumerate(tasks)])
        if torch.isnan(own).any():
            missing = sorted({t for t, v in zip(tasks, own.tolist()) if math.isnan(v)})
            scored = [t for t in missing if t in scores]
            if scored:  # the task's own reward said "does not apply" to its own samples
                count = sum(1 for t, v in zip(tasks, own.tolist()) if t == scored[0] and math.isnan(v))
                total = sum(t == scored[0] for t in tasks)
                raise ValueError(f"reward {scored[0]!r} returned NaN for {count} of its task's {total} samples; "
                                 "NaN means 'does not apply', and a task's own reward must score its samples")
            raise ValueError(f"no reward for samples of task(s) {missing}; pass rewards={{task: reward}} for each "
                             f"(given: {sorted(scores)})")
        # Each task's samples are normalised among themselves: with the batch std, tasks whose
        # rewards sit on other scales (pref ~3, OCR in [0, 1]) would otherwise set each other's std.
        advantages = torch.zeros_like(own)
        for task in dict.fromkeys(tasks):
            index = torch.tensor([t == task for t in tasks])
            advantages[index] = group_advantages(own[index], group[index], **options)
        return own, advantages
    weights = {name: config.reward_weights.get(name, 1.0) for name in scores}
    if config.aggregation == "sum-then-normalise":
        total = sum(weights[n] * torch.nan_to_num(s, nan=0.0) for n, s in scores.items())
        return total, group_advantages(total, group, **options)
    total = sum(weights[n] * torch.nan_to_num(s, nan=0.0) for n, s in scores.items())
    advantages = torch.zeros(len(tasks))
    for name, values in scores.items():
        # Over the applicable samples only: zeros standing in for "does not apply" would enter the
        # batch std and shrink this reward's advantages by how many samples it does not score.
        applies = ~torch.isnan(values)
        if applies.any():
            advantages[applies] += weights[name] * group_advantages(values[applies], group[applies], **options)
    return total, advantages


def score_samples(trajectory, rewards: Mapping[str, Reward], *, own: bool) -> dict[str, torch.Tensor]:
    """Scores per reward name; with ``own`` each reward scores only the samples of its task."""
    scores = {}
    for name, reward in rewards.items():
        index = [i for i, task in enumerate(trajectory.tasks) if task == name] if own else list(range(len(trajectory)))
        values = torch.full((len(trajectory),), math.nan)
        if index:
            out = call_reward(reward, name, trajectory.images[index], [trajectory.prompts[i] for i in index],
                              [trajectory.metadata[i] for i in index])
            values[index] = out.scores
        scores[name] = values
    return scores


@dataclass
class ScoredRollout:
    """One rollout made ready for its updates: this rank's samples, advantages and trained steps,
    which of its samples each update trains on, and the rollout's global reward metrics."""

    trajectory: Any
    advantages: torch.Tensor  # this rank's samples', on the policy's device
    steps: torch.Tensor  # [samples, k] trained step indices
    parts: list[list[int]]  # this rank's sample indices, one list per update
    metrics: dict[str, float]


def grpo_rollout(policy: Policy, prompts: Sequence[Prompt], rewards: Mapping[str, Reward], config: GRPOConfig, *,
                 seed: int, ranks: ProcessGroup = SINGLE, updates: int | None = None) -> ScoredRollout:
    """Roll out ``prompts`` (the whole rollout's, every rank's) with the active adapter, score them
    and split this rank's samples into ``updates`` (default ``config.updates_per_rollout``) parts.

    With several processes this rank rolls out its share, whole prompt groups so advantages stay
    exact, with the noise and trained steps of those samples' global indices; the metrics are global.
    """
    updates = config.updates_per_rollout if updates is None else updates
    local, first = ranks.shard(prompts)
    offset = first * config.group_size  # global index of this rank's first sample
    trajectory = rollout(
        policy, local, images_per_prompt=config.group_size, num_steps=config.num_steps,
        noise_level=config.noise_level, guidance_scale=config.guidance_scale, seed=seed,
        keep={"latents", "images"}, sample_offset=offset,
    )
    diverged = int((~torch.isfinite(trajectory.images.flatten(1)).all(dim=1)).sum())
    if diverged:  # a diverged sampler's latents and log-probabilities are not finite either: nothing to learn from
        raise FloatingPointError(f"the rollout drew {diverged} of {len(trajectory)} images with NaN or inf pixels: the "
                                 "sampler diverged (a guidance scale or noise level too large for the model, or weights "
                                 "already broken); lower them, or resume from an earlier checkpoint")
    scores = score_samples(trajectory, rewards, own=config.aggregation == "own")
    # Advantages from the whole rollout, every process's samples (Flow-GRPO gathers them: its batch
    # std is over all of them), then this rank's slice; groups never straddle two ranks.
    all_groups = torch.arange(len(prompts)).repeat_interleave(config.group_size)
    all_tasks = [p.task for p in prompts for _ in range(config.group_size)]
    all_scores = {name: ranks.all_gather(values) for name, values in scores.items()}
    all_rewards, all_advantages = aggregate_advantages(all_scores, all_groups, all_tasks, config)
    # drawn for the whole batch, then sliced: every sample trains on the same steps in any world size
    generator = torch.Generator().manual_seed(seed)
    steps = train_step_indices(
        len(prompts) * config.group_size, config.num_steps, config.train_fraction, generator, mode=config.train_steps
    )
    samples = len(trajectory)
    # Each prompt's group is dealt evenly over the updates, at random, drawn for the whole batch and
    # sliced like the steps, so every update sees every prompt and the split is the same on any
    # number of processes (Flow-GRPO shuffles each process's samples without regard to groups).
    parts = [list(range(samples))]
    if updates > 1:
        share = config.group_size // updates
        order = torch.stack([torch.randperm(config.group_size, generator=generator) for _ in prompts])
        order += torch.arange(len(prompts))[:, None] * config.group_size  # global sample indices
        parts = [sorted(i - offset for i in order[:, k * share : (k + 1) * share].flatten().tolist() if offset <= i < offset + samples)
                 for k in range(updates)]
    metrics = {"zero_spread_share": zero_spread_share(all_rewards, all_groups)}
    for task in sorted(set(all_tasks)):
        # the task's own reward on its samples (in the sum modes all_rewards is the weighted total)
        values = all_scores.get(task, all_rewards)[torch.tensor([t == task for t in all_tasks])]
        metrics[f"reward/{task}/mean"] = float(values.mean())
        metrics[f"reward/{task}/std"] = float(values.std()) if len(values) > 1 else 0.0
    if config.aggregation != "own":
        metrics["reward/weighted_sum/mean"] = float(all_rewards.mean())
    return ScoredRollout(trajectory, all_advantages[offset : offset + samples].to(policy.device),
                         steps[offset : offset + samples], parts, metrics)


def grpo_update(policy: Policy, batch: ScoredRollout, part: int, config: GRPOConfig, *,
                grad_variance: GradVariance | None = None, ranks: ProcessGroup = SINGLE) -> dict:
    """Accumulate the GRPO gradient of ``batch``'s part ``part`` into ``.grad`` with the active
    adapter: this rank's share of the global mean (the caller averages over ranks); returns global
    metrics, the rollout's reward metrics among them."""
    trajectory = batch.trajectory
    pairs = [(i, int(s)) for i in batch.parts[part] for s in batch.steps[i]]
    totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    pair_loss: list[float] = []
    device = policy.device
    for start in range(0, len(pairs), config.micro_batch):
        chunk = pairs[start : start + config.micro_batch]
        index = torch.tensor([i for i, _ in chunk])
        step = torch.tensor([s for _, s in chunk])
        current = step_at(policy, trajectory, index, step, guidance_scale=config.guidance_scale, detach_uncond=config.detach_uncond)
        old = trajectory.log_probs[index, step].to(device)
        per_pair, stats = clipped_policy_loss(current.log_prob, old, batch.advantages[index.to(device)], config.clip_range)
        if config.kl_beta > 0:
            with torch.no_grad(), policy.use(None):
                reference = step_at(policy, trajectory, index, step, guidance_scale=config.guidance_scale)
            kl = step_kl(current.mean, reference.mean, current.std, weighting=config.kl_weighting, dt=current.dt)
            per_pair = per_pair + config.kl_beta * kl
            totals["kl"] += float(kl.detach().sum())
        (per_pair.sum() / len(pairs)).backward()
        if grad_variance is not None:
            grad_variance.record(len(chunk) / len(pairs))
        per_pair = per_pair.detach().cpu()
        totals["loss"] += float(per_pair.sum())
        totals["clip_fraction"] += stats["clip_fraction"] * len(chunk)
        totals["approx_kl"] += stats["approx_kl"] * len(chunk)
        pair_loss.extend(per_pair.tolist())
    # Metrics over the whole update: sums and per-pair values gathered from every rank.
    num_pairs = len(pairs) * ranks.world_size
    summed = ranks.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()
    metrics: dict[str, float] = {key: value / num_pairs for key, value in zip(totals, summed)}
    if config.kl_beta == 0:
        metrics.pop("kl")
    metrics.update(batch.metrics)  # the rollout's rewards, logged with each of its updates
    all_loss = ranks.all_gather(torch.tensor(pair_loss, dtype=torch.float64)).tolist()
    all_bins = ranks.all_gather(torch.tensor([s * 4 // config.num_steps for _, s in pairs])).tolist()
    by_bin: dict[int, list[float]] = {}
    for b, value in zip(all_bins, all_loss):
        by_bin.setdefault(b, []).append(value)
    for b, values in sorted(by_bin.items()):
        metrics[f"loss/bin{b}"] = sum(values) / len(values)
    return metrics


def grpo_step(
    policy: Policy,
    adapter: str,
    prompts: Sequence[Prompt],
    rewards: Mapping[str, Reward],
    config: GRPOConfig,
    *,
    seed: int,
    params: Sequence[torch.nn.Parameter],
    grad_variance: GradVariance | None = None,
    ranks: ProcessGroup = SINGLE,
) -> tuple[dict, int]:
    """One rollout of ``prompts`` and one update on all of its samples (a trainer's step when
    ``updates_per_rollout`` is 1): accumulates the gradient into ``.grad``; returns (metrics, images),
    ``images`` counting this rank's samples."""
    with policy.use(adapter):  # one switch for the whole step (rollout and training)
        batch = grpo_rollout(policy, prompts, rewards, config, seed=seed, ranks=ranks, updates=1)
        metrics = grpo_update(policy, batch, 0, config, grad_variance=grad_variance, ranks=ranks)
    return metrics, len(batch.trajectory)


def grpo_run_config(config: GRPOConfig, prompts: Sequence[Prompt], rewards: Mapping[str, Any],
                    extra_config: dict | None = None) -> dict:
    """What a GRPO run folder's ``config.json`` records: the config, what it trains on and the
    caller's ``extra_config``; a resume, or a finished cascade stage, is checked against it."""
    return {"method": "grpo", **config.to_dict(), "data": training_data(prompts, rewards), **(extra_config or {})}


class GRPOTrainer:
    """Flow-GRPO on ``prompts`` with ``rewards``, training LoRA adapter ``adapter`` of ``policy``."""

    def __init__(
        self,
        config: GRPOConfig,
        *,
        policy: Policy,
        prompts: Sequence[Prompt],
        rewards: Mapping[str, Reward],
        run_dir: str | Path,
        adapter: str = "student",
        evaluate: Callable | None = None,
        overwrite: bool = False,
        extra_config: dict | None = None,
        reuse_adapter: bool = False,
    ):
        """``reuse_adapter``: train on the policy's existing ``adapter`` (a cascade's next stage)
        rather than refuse it."""
        if not prompts:
            raise ValueError("GRPO needs a non-empty prompt pool")
        check_reward_names("reward_weights", config.reward_weights, rewards)
        self.config, self.policy, self.prompts, self.rewards, self.adapter = config, policy, list(prompts), dict(rewards), adapter
        self.ranks = distributed.current()
        if config.prompts_per_step % self.ranks.world_size:
            raise ValueError(
                f"prompts_per_step={config.prompts_per_step} cannot be split over {self.ranks.world_size} processes "
                "(each prompt's group stays on one process); use a multiple of the number of processes"
            )
        self.params, self.optimizer, self.ema = student_optimizer(policy, adapter, config, reuse=reuse_adapter)
        self.run = TrainingRun(
            run_dir, config=grpo_run_config(config, self.prompts, self.rewards, extra_config), policy=policy,
            adapter=adapter, params=self.params, optimizer=self.optimizer, ema=self.ema, evaluate=evaluate,
            eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, overwrite=overwrite,
        )
        self.grad_variance = GradVariance(self.params)

    def train(self, progress: bool = True) -> Path:
        config = self.config
        batch: ScoredRollout | None = None

        def step_fn(step: int) -> tuple[dict, int]:
            nonlocal batch
            index, part = divmod(step, config.updates_per_rollout)
            with self.policy.use(self.adapter):  # one switch for the whole step (rollout and training)
                if part == 0:
                    prompts = sample_prompts(self.prompts, config.prompts_per_step * config.updates_per_rollout,
                                             step_seed(config.seed, index, 1))
                    batch = grpo_rollout(self.policy, prompts, self.rewards, config, seed=step_seed(config.seed, index, 2),
                                         ranks=self.ranks)
                # runs start and resume on a rollout's first step (steps and checkpoint_every are multiples)
                assert batch is not None, f"step {step} continues a rollout this process did not make"
                metrics = grpo_update(self.policy, batch, part, config, grad_variance=self.grad_variance, ranks=self.ranks)
            images = len(batch.trajectory) if part == 0 else 0
            if part == config.updates_per_rollout - 1:
                batch = None  # freed before the next rollout, an evaluation or the final save
            return metrics, images

        return self.run.train(
            step_fn, steps=config.steps, max_grad_norm=config.max_grad_norm, grad_variance=self.grad_variance,
            desc=f"grpo {self.adapter}", lr=config.lr, lr_schedule=config.lr_schedule, progress=progress,
        )
