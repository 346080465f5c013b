"""Dependency-free rewards for tests and smoke runs of the training loops.

They are real rewards (deterministic, learnable, same signature as every other reward) but
measure nothing a user cares about; the tiny suite's rewards replace them in real runs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from opd_bench.rewards.base import RewardOutput, check_batch


class Brightness:
    """Mean pixel value of the image, in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        check_batch(images, prompts, metadata)
        return RewardOutput(images.float().mean(dim=(1, 2, 3)))


class ColorMatch:
    """1 - (distance of the image's mean RGB to ``target``) / sqrt(3), in [0, 1]."""

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)):
        if len(target) != 3 or not all(0.0 <= float(c) <= 1.0 for c in target):
            raise ValueError(f"toy/color target must be three values in [0, 1], got {target!r}")
        self.target = torch.tensor([float(c) for c in target])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        check_batch(images, prompts, metadata)
        mean_rgb = images.float().mean(dim=(2, 3)).cpu()
        distance = (mean_rgb - self.target).norm(dim=1) / 3**0.5
        return RewardOutput(1.0 - distance, {"mean_rgb": mean_rgb.tolist()})
