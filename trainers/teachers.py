"""Teachers: one Flow-GRPO run per task from the base model, saved as a LoRA adapter.

A teacher is identified by (base model, suite version, task, GRPO config); if a finished run with
that identity exists under ``root`` it is reused instead of retrained (refused if it was trained on
other prompts: the suite version names the prompt set).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

from opd_bench.io import holds_weights, read_json, without_later_settings
from opd_bench.policy import Policy
from opd_bench.rewards import Reward
from opd_bench.rollout import Prompt
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
from opd_bench.training import retrain_hint, training_data


def teacher_key(base: str, suite_version: str, task: str, config: GRPOConfig) -> str:
    # settings added later, at the value earlier teachers trained with, leave the key as it was
    identity = {"base": base, "suite_version": suite_version, "task": task, "config": without_later_settings(config.to_dict())}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def teacher_run_dir(root: str | Path, task: str, key: str) -> Path:
    return Path(root) / f"{task}-{key}"


def finished_teacher(run_dir: Path) -> dict | None:
    """The DONE record of a finished teacher run, or None."""
    done = run_dir / "DONE"
    return read_json(done, fix=retrain_hint(run_dir)) if done.exists() and holds_weights(run_dir / "final") else None


def train_teacher(
    task: str,
    *,
    policy: Policy,
    prompts: list[Prompt],
    reward: Reward,
    config: GRPOConfig,
    root: str | Path,
    base: str,
    suite_version: str,
    evaluate: Callable | None = None,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the teacher of ``task``; returns its run folder (adapter in ``final/``)."""
    key = teacher_key(base, suite_version, task, config)
    run_dir = teacher_run_dir(root, task, key)
    if finished_teacher(run_dir) is not None:
        saved = read_json(run_dir / "config.json", fix=retrain_hint(run_dir)).get("data")
        if saved is not None and saved != training_data(prompts, [task]):  # runs made before the record reuse as before
            raise ValueError(
                f"{run_dir} holds the {task} teacher of this base, suite version and config trained on other prompts; "
                "pass another suite_version for another prompt set, or another root"
            )
        return run_dir
    trainer = GRPOTrainer(
        config, policy=policy, prompts=prompts, rewards={task: reward}, run_dir=run_dir,
        adapter=f"train_teacher_{run_dir.name}", evaluate=evaluate,  # one per config: each teacher starts from the base
        extra_config={"role": "teacher", "task": task, "base": base, "suite_version": suite_version},
    )
    trainer.train(progress=progress)
    return run_dir


def train_teachers(
    prompts: Mapping[str, list[Prompt]], rewards: Mapping[str, Reward], **options
) -> dict[str, Path]:
    """Every task's teacher; ``options`` as for :func:`train_teacher`."""
    return {task: train_teacher(task, prompts=prompts[task], reward=rewards[task], **options) for task in prompts}
