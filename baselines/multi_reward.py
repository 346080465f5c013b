"""Multi-reward RL: one Flow-GRPO run on the union of the tasks' prompts.

``reward_mode="own"``: each sample is rewarded by its own task's reward. ``"weighted-sum"``: every
sample gets the weighted sum of all rewards (a reward that does not apply counts 0), aggregated
``sum-then-normalise`` (what ``aggregation`` left at ``own`` becomes) or ``normalise-then-sum``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

from opd_bench.policy import Policy
from opd_bench.rewards import Reward
from opd_bench.rollout import Prompt
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer


@dataclass
class MultiRewardConfig(GRPOConfig):
    reward_mode: Literal["own", "weighted-sum"] = "own"

    def __post_init__(self) -> None:
        # A weighted sum needs a sum aggregation: the first one, unless another is named, so that
        # `--set multi-reward.reward_mode=weighted-sum` alone is a valid change (reward_mode's own
        # check runs in super().__post_init__, with the other Literal fields).
        if self.reward_mode == "weighted-sum" and self.aggregation == "own":
            self.aggregation = "sum-then-normalise"
        super().__post_init__()
        if self.reward_mode == "own" and self.aggregation != "own":
            raise ValueError("reward_mode='own' uses aggregation='own'; the sum aggregations go with reward_mode='weighted-sum'")
        if self.reward_mode == "own" and self.reward_weights:
            raise ValueError("reward_weights weigh the rewards of reward_mode='weighted-sum'; with reward_mode='own' each "
                             "sample has its own task's reward alone: set reward_mode='weighted-sum' as well")


def interleave(pools: Mapping[str, Sequence[Prompt]]) -> list[Prompt]:
    """The union of the pools, balanced: each task contributes equally many prompts. Smaller pools
    repeat up to the largest one's size, so that no prompt is dropped (real prompt files differ in
    size by several times). Steps draw from it at random (``sample_prompts``), so the tasks are
    balanced over a run, not within each step."""
    empty = sorted(task for task, pool in pools.items() if not pool)
    if empty:
        raise ValueError(f"multi-reward RL has no prompts for task(s) {empty}; give every task a prompt file")
    size = max(len(pool) for pool in pools.values())
    return [pools[task][i % len(pools[task])] for i in range(size) for task in pools]


class MultiRewardTrainer:
    def __init__(
        self,
        config: MultiRewardConfig,
        *,
        policy: Policy,
        prompts: Mapping[str, Sequence[Prompt]],
        rewards: Mapping[str, Reward],
        run_dir: str | Path,
        adapter: str = "student",
        evaluate: Callable | None = None,
        overwrite: bool = False,
    ):
        missing = sorted(set(prompts) - set(rewards))
        if missing:
            raise ValueError(f"no reward for task(s) {missing}")
        self.engine = GRPOTrainer(
            config, policy=policy, prompts=interleave(prompts), rewards=rewards, run_dir=run_dir,
            adapter=adapter, evaluate=evaluate, overwrite=overwrite,
            extra_config={"method": "multi-reward", "tasks": list(prompts)},
        )

    def train(self, progress: bool = True) -> Path:
        return self.engine.train(progress)
