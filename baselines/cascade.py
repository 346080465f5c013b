"""Cascade RL: single-task Flow-GRPO stages in sequence, each starting from the previous weights.

Stages are ``(task, steps)`` pairs (e.g. pref 800 -> geneval 300 -> ...). Each stage is a GRPO run
in ``run_dir/stage<k>-<task>``; a finished stage is skipped on rerun (its weights are loaded), so a
killed cascade resumes where it stopped. ``metrics.jsonl`` concatenates the stages with steps and
compute counters made cumulative, so the cascade reads as one curve.

Each stage is a GRPO run of its own: a fresh optimizer (Adam's moments start at zero) and its own
learning-rate schedule (with ``lr_schedule="cosine"`` the rate decays to 0 in every stage), as
separate Flow-GRPO runs would. Stage ``k`` of the cascade with seed ``s`` draws with seed ``s + k``;
so with a task repeated among the stages, two seeds' cells can train that task on the same noise
(stage ``k`` of seed ``s`` and stage ``j`` of seed ``s + k - j``). The shipped presets repeat no task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from opd_bench import distributed
from opd_bench.io import atomic_write_bytes, read_json
from opd_bench.policy import Policy
from opd_bench.rewards import Reward
from opd_bench.rollout import Prompt
from opd_bench.training import add_student, config_differences, read_metrics
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer, grpo_run_config

COUNTERS = ("student_forwards", "teacher_forwards", "reference_forwards", "images", "wall_seconds")


@dataclass
class CascadeConfig:
    stages: list[tuple[str, int]] = field(default_factory=lambda: [("pref", 14), ("geneval", 14), ("ocr", 12)])
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # steps is taken from each stage

    def __post_init__(self) -> None:
        def is_stage(stage) -> bool:
            return (isinstance(stage, (list, tuple)) and len(stage) == 2 and isinstance(stage[0], str)
                    and isinstance(stage[1], int) and not isinstance(stage[1], bool) and stage[1] >= 1)

        if not isinstance(self.stages, (list, tuple)) or not self.stages or not all(is_stage(s) for s in self.stages):
            raise ValueError(f"cascade stages must be a non-empty list of (task, steps >= 1), e.g. [('pref', 20), "
                             f"('geneval', 20)], got {self.stages!r}")
        per = self.grpo.updates_per_rollout
        uneven = [list(stage) for stage in self.stages if stage[1] % per]
        if uneven:  # each stage is a GRPO run, which ends between rollouts
            raise ValueError(f"cascade stage(s) {uneven} take a number of steps that is not a multiple of the GRPO config's "
                             f"updates_per_rollout={per}; give each stage a multiple of {per}, or set updates_per_rollout=1")

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.stages)


class CascadeTrainer:
    def __init__(
        self,
        config: CascadeConfig,
        *,
        policy: Policy,
        prompts: Mapping[str, Sequence[Prompt]],
        rewards: Mapping[str, Reward],
        run_dir: str | Path,
        adapter: str = "student",
        evaluate: Callable | None = None,
        overwrite: bool = False,
    ):
        missing = sorted({task for task, _ in config.stages} - (set(prompts) & set(rewards)))
        if missing:
            raise ValueError(f"cascade stage task(s) {missing} have no prompts or reward")
        self.config, self.policy, self.prompts, self.rewards = config, policy, prompts, rewards
        self.run_dir, self.adapter, self.evaluate, self.overwrite = Path(run_dir), adapter, evaluate, overwrite

    def train(self, progress: bool = True) -> Path:
        final = None
        for k, (task, steps) in enumerate(self.config.stages):
            folder = stage_dir(self.run_dir, k, task)
            config = replace(self.config.grpo, steps=steps, seed=self.config.grpo.seed + k)
            extra = {"method": "cascade", "stage": k, "stages": [list(s) for s in self.config.stages]}
            if (folder / "DONE").exists() and not self.overwrite:
                recorded = grpo_run_config(config, self.prompts[task], {task: self.rewards[task]}, extra)
                differences = config_differences(read_json(folder / "config.json"), recorded)
                if differences:  # a finished stage of other settings is not this cascade's
                    raise ValueError(f"{folder} holds a finished stage with a different config "
                                     f"({differences}); use another folder or pass overwrite/--force")
                add_student(self.policy, self.adapter, self.config.grpo, reuse=k > 0)
                self.policy.copy_adapter_weights(self.adapter, folder / "final")
                final = folder / "final"
                continue
            trainer = GRPOTrainer(
                config, policy=self.policy, prompts=self.prompts[task], rewards={task: self.rewards[task]},
                run_dir=folder, adapter=self.adapter, evaluate=self.evaluate, overwrite=self.overwrite,
                extra_config=extra, reuse_adapter=k > 0,
            )
            final = trainer.train(progress)
            if self.config.grpo.ema is not None and k + 1 < len(self.config.stages):
                # the next stage starts from what this one saved (its average), as a resumed cascade does
                self.policy.copy_adapter_weights(self.adapter, final)
        if distributed.current().is_main:  # one writer; the stages' files are complete (finish() waits for them)
            write_cascade_metrics(self.run_dir, self.config.stages)
        return final


def stage_dir(run_dir: str | Path, k: int, task: str) -> Path:
    return Path(run_dir) / f"stage{k}-{task}"


def write_cascade_metrics(run_dir: str | Path, stages: Sequence[tuple[str, int]]) -> Path:
    """Concatenate the stages' metrics with cumulative steps and counters into the cascade's own
    ``metrics.jsonl``; needs only the stages' files, no model."""
    offset = {key: 0.0 for key in COUNTERS}
    offset_step = 0
    lines = []
    for k, (task, steps) in enumerate(stages):
        records = read_metrics(stage_dir(run_dir, k, task) / "metrics.jsonl")
        for record in records:
            if k > 0 and record["step"] == 0:
                continue  # the stage's initial evaluation repeats the previous stage's last one
            shifted = {**record, "step": record["step"] + offset_step, "stage": k, "stage_task": task}
            for key in COUNTERS:
                shifted[key] = record.get(key, 0) + offset[key]
            lines.append(json.dumps(shifted))
        last = records[-1]
        offset = {key: offset[key] + last.get(key, 0) for key in COUNTERS}
        offset_step += steps
    path = Path(run_dir) / "metrics.jsonl"
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
    return path
