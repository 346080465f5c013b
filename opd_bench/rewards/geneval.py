"""GenEval rewards of the tiny world: the world's detector + GenEval's rules.

``TinyGenEvalReward(strict=False)``: Flow-GRPO's partial-credit reward
(:func:`opd_bench.geneval.score_partial`; ``partial="flow-grpo"``, the default, is Flow-GRPO's
reward server's exactly and can be negative, ``partial="clipped"`` stays in [0, 1]);
``strict=True``: 1.0 / 0.0 by GenEval's rules
(:func:`opd_bench.geneval.evaluate_image`). Samples whose metadata has no ``"include"`` key
(not GenEval records) score NaN. Colours come from the detector's ``"color"`` field.
"""

from __future__ import annotations

from typing import Sequence

import torch

from opd_bench import geneval
from opd_bench.rewards.base import RewardOutput, check_batch


class TinyGenEvalReward:
    """GenEval reward on tiny-world images (64x64 coloured shapes)."""

    def __init__(self, strict: bool = False, partial: str = geneval.DEFAULT_PARTIAL_FORM):
        if partial not in geneval.PARTIAL_FORMS:
            raise ValueError(f"partial must be one of {geneval.PARTIAL_FORMS}, got {partial!r}")
        self.strict = bool(strict)
        self.partial = partial

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        from opd_bench.world.detect import detect

        scores: list[float] = []
        tags: list = []
        corrects: list = []
        reasons: list = []
        n_dets: list = []
        imgs = images.detach().float().cpu().clamp(0, 1)
        for img, meta in zip(imgs, metadata):
            if not isinstance(meta, dict) or "include" not in meta:
                scores.append(float("nan"))
                tags.append(None)
                corrects.append(None)
                reasons.append("not a geneval record")
                n_dets.append(None)
                continue
            dets = detect(img)
            ok, reason = geneval.evaluate_image(meta, dets)
            scores.append(float(ok) if self.strict else geneval.score_partial(meta, dets, form=self.partial))
            tags.append(meta.get("tag"))
            corrects.append(bool(ok))
            reasons.append(reason)
            n_dets.append(len(dets))
        return RewardOutput(
            torch.tensor(scores, dtype=torch.float32),
            {"tag": tags, "correct": corrects, "reason": reasons, "n_detections": n_dets},
        )


class TinyGenEvalStrictReward(TinyGenEvalReward):
    """``TinyGenEvalReward(strict=True)``: 1.0 / 0.0 by GenEval's rules (a registry target)."""

    def __init__(self) -> None:
        super().__init__(strict=True)
