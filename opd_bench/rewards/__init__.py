"""Reward registry: ``opd_bench.rewards.get(name, **options)`` builds a reward by name.

Modules are imported lazily, so ``names()`` is cheap and a reward's heavy dependencies are
only needed when that reward is used. Third-party code adds rewards with ``register``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from opd_bench.registry import Registry, check_options

if TYPE_CHECKING:
    from opd_bench.rewards.base import Reward

_FROM_BASE = ("Reward", "RewardOutput", "check_batch")  # imported on first use: base imports torch


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from opd_bench.rewards import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

REGISTRY = Registry("reward")

REGISTRY.register(
    "per-task",
    "opd_bench.rewards.combine:PerTaskReward",
    "route each sample to the reward of its task (metadata['task']); NaN elsewhere",
)
REGISTRY.register(
    "weighted-sum",
    "opd_bench.rewards.combine:WeightedSumReward",
    "weighted sum of several rewards on every sample",
)
REGISTRY.register(
    "tiny/geneval",
    "opd_bench.rewards.geneval:TinyGenEvalReward",
    "tiny world: detector + GenEval rules, Flow-GRPO's partial credit (partial=flow-grpo|clipped); NaN off geneval records",
)
REGISTRY.register(
    "tiny/geneval-strict",
    "opd_bench.rewards.geneval:TinyGenEvalStrictReward",
    "tiny world: 1/0 by GenEval's rules; NaN off geneval records",
)
REGISTRY.register(
    "sd/geneval",
    "opd_bench.rewards.geneval_sd:SDGenEvalReward",
    "GenEval on real images: detector (owlv2 in-process; mmdet) + CLIP colour + GenEval's rules, 1/0",
)
REGISTRY.register(
    "sd/geneval-partial",
    "opd_bench.rewards.geneval_sd:SDGenEvalPartialReward",
    "sd/geneval with Flow-GRPO's partial credit (partial=flow-grpo|clipped; training reward)",
)
REGISTRY.register(
    "sd/geneval-mmdet",
    "opd_bench.rewards.geneval_mmdet:MMDetGenEvalReward",
    "sd/geneval with GenEval's Mask2Former via mmdet; serve it from an mmdet environment (unverified)",
)
for _name in ("hpsv2", "clipscore", "imagereward"):
    REGISTRY.register(
        f"sd/{_name}",
        f"opd_bench.suites.sd:{_name}_reward",
        f"{_name} with the weights given in the sd suite config (pref.{_name}); sd/pref's extra score",
    )
del _name
REGISTRY.register(
    "ocr",
    "opd_bench.rewards.ocr:OCRReward",
    "OCR (rapidocr detection + recognition) vs the quoted text; 1 - normalised edit distance",
)
REGISTRY.register(
    "tiny/pref",
    "opd_bench.rewards.pref:TinyPrefReward",
    "tiny world: the learned two-tower preference model (PickScore-style score)",
)
REGISTRY.register(
    "tiny/pref-oracle",
    "opd_bench.rewards.pref:TinyPrefOracleReward",
    "tiny world: the hidden taste the preference model was trained on (evaluation only)",
)
REGISTRY.register(
    "pickscore",
    "opd_bench.rewards.clip_rewards:PickScoreReward",
    "PickScore v1 from local weights: logit_scale.exp() * cos(text, image)",
)
REGISTRY.register(
    "clipscore",
    "opd_bench.rewards.clip_rewards:CLIPScoreReward",
    "CLIPScore from a local open_clip checkpoint: 100 * max(cos(image, text), 0)",
)
REGISTRY.register(
    "hpsv2",
    "opd_bench.rewards.clip_rewards:HPSv2Reward",
    "HPS v2 / v2.1 from a local checkpoint (open_clip ViT-H-14): cos(image, text)",
)
REGISTRY.register(
    "toy/brightness",
    "opd_bench.rewards.toy:Brightness",
    "mean pixel brightness; a dependency-free reward for tests and smoke runs",
)
REGISTRY.register(
    "toy/color",
    "opd_bench.rewards.toy:ColorMatch",
    "closeness of the mean colour to a target RGB; a dependency-free reward for tests",
)
REGISTRY.register(
    "remote",
    "opd_bench.rewards.remote:RemoteReward",
    "a reward scored by an `opd-bench serve-reward` server (url=...), e.g. in another environment",
)
REGISTRY.register(
    "imagereward",
    "opd_bench.rewards.image_reward:ImageReward",
    "ImageReward (THUDM) from its published ImageReward.pt + med_config.json; package-equal scores",
)


def get(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name`` with keyword ``options`` (a misspelt one is an
    ``UnknownOptionError`` naming the close option, before anything loads)."""
    check(name, options)
    return REGISTRY.resolve(name)(**options)


def check(name: str, options: dict[str, Any]) -> None:
    """What ``get`` checks before it builds: a registered name and options its factory takes."""
    check_options(f"reward {name!r}", REGISTRY.resolve(name), options)


def locate_weights(name: str, options: dict[str, Any]) -> None:
    """Find the weight files of reward ``name`` with ``options`` without loading them (its factory's
    ``locate_weights(**options)``, where it has one: those that load weights when built), so that a
    run or an evaluation with a missing file stops before its first image, not when its turn comes."""
    check(name, options)
    if options.get("device") is not None:  # e.g. a suite config's "device": "cuda" on a machine without one
        from opd_bench.policy import check_device

        try:
            check_device(str(options["device"]))
        except ValueError as error:
            raise ValueError(f"reward {name!r}: {error} (its device option, e.g. the suite config's \"device\")") from None
    locate = getattr(REGISTRY.resolve(name), "locate_weights", None)
    if locate is not None:
        locate(**options)


def register(name: str, target: str | Callable[..., Reward], help: str = "") -> None:
    """Register ``target`` under ``name``: a factory that builds a reward from keyword options (a
    reward class, or a function returning a reward), or its ``"module:attribute"`` path, imported
    on first use. ``get(name, **options)`` then calls ``target(**options)``."""
    REGISTRY.register(name, target, help)


def names() -> list[str]:
    return REGISTRY.names()


__all__ = ["Reward", "RewardOutput", "check", "check_batch", "get", "register", "names", "REGISTRY"]
