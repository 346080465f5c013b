"""Rewards built from other rewards: per-task routing and weighted sums.

Both take reward *objects* or ``(name, options)`` specs, so configs can stay declarative.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from opd_bench.rewards.base import Reward, RewardOutput, call_reward, check_batch

RewardSpec = "Reward | str | tuple[str, dict[str, Any]]"


def build(spec: Any) -> Reward:
    """Turn a reward, a registered name, or ``(name, options)`` into a reward object."""
    from opd_bench import rewards

    if isinstance(spec, type):  # a class is callable too, but calling it builds a reward, not a score
        raise TypeError(f"cannot use the class {spec.__name__} as a reward; pass an instance "
                        f"({spec.__name__}(...)) or a registered name")
    if callable(spec):
        return spec
    if isinstance(spec, str):
        return rewards.get(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        return rewards.get(spec[0], **dict(spec[1]))
    raise TypeError(f"cannot build a reward from {spec!r}; pass a callable, a name or (name, options)")


class PerTaskReward:
    """Score each sample with the reward of its own task (``metadata[i]['task']``).

    Samples whose task has no reward get NaN. ``details`` carries each task's details under
    ``"<task>/<key>"``: its per-sample lists put back at their samples' places in the batch (None
    for the other samples), so that entry i of every list is sample i's; its other values as they
    are. ``details["task"]`` names the reward that scored each sample (None where none did).
    """

    def __init__(self, rewards: Mapping[str, Any]):
        if not rewards:
            raise ValueError("per-task reward needs at least one task: rewards={'task': reward}")
        self.rewards = {task: build(spec) for task, spec in rewards.items()}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        check_batch(images, prompts, metadata)
        total = len(prompts)
        scores = torch.full((total,), math.nan)
        details: dict[str, Any] = {"task": [None] * total}
        for task, reward in self.rewards.items():
            index = [i for i, meta in enumerate(metadata) if meta.get("task") == task]
            if not index:
                continue
            out = call_reward(reward, task, images[index], [prompts[i] for i in index], [metadata[i] for i in index])
            scores[index] = out.scores
            for i in index:
                details["task"][i] = task
            for key, value in out.details.items():
                name = f"{task}/{key}"  # never "task": that has no "/"
                if name in details:  # task "a" with key "b/c" and task "a/b" with key "c"
                    raise ValueError(f"per-task reward: two of the tasks {sorted(self.rewards)} give the detail "
                                     f"{name!r}; rename a task so that none starts with another's name and '/'")
                # a per-sample list (a remote reward's chunk bookkeeping is per chunk, not per sample)
                if isinstance(value, list) and len(value) == len(index) and key != "chunk_sizes" and not key.endswith("/per_chunk"):
                    value = _spread(value, index, total)
                details[name] = value
        return RewardOutput(scores, details)


def _spread(values: list, index: list[int], total: int) -> list:
    """``values[k]`` at place ``index[k]`` of a list of ``total`` Nones."""
    full: list[Any] = [None] * total
    for i, value in zip(index, values):
        full[i] = value
    return full


class WeightedSumReward:
    """``sum_k weight_k * reward_k`` on every sample; NaN scores count as 0, so a sample that no
    reward applies to (all NaN) scores 0, not NaN. A reward ``weights`` does not name has weight
    1, as in a GRPO config's ``reward_weights``. ``details[key]``: reward ``key``'s scores."""

    def __init__(self, rewards: Mapping[str, Any], weights: Mapping[str, float] | None = None):
        if not rewards:
            raise ValueError("weighted-sum reward needs at least one reward")
        self.rewards = {key: build(spec) for key, spec in rewards.items()}
        weights = dict(weights or {key: 1.0 for key in rewards})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"weights name rewards that are not given: {sorted(unknown)}")
        self.weights = {key: float(weights.get(key, 1.0)) for key in rewards}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        check_batch(images, prompts, metadata)
        total = torch.zeros(len(prompts))
        details: dict[str, Any] = {}
        for key, reward in self.rewards.items():
            scores = call_reward(reward, key, images, prompts, metadata).scores
            details[key] = scores.tolist()
            total += self.weights[key] * torch.nan_to_num(scores, nan=0.0)
        return RewardOutput(total, details)
