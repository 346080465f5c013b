"""The one reward signature every trainer and evaluator uses.

A reward is any callable ``reward(images, prompts, metadata) -> RewardOutput``:

* ``images``: float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (RGB);
* ``prompts``: ``B`` strings;
* ``metadata``: ``B`` dicts (the prompt file's record for each sample, possibly empty);
* ``RewardOutput.scores``: float32 tensor ``[B]`` on the CPU; ``NaN`` means "this reward does
  not apply to this sample" (e.g. an OCR reward on a prompt without quoted text);
* ``RewardOutput.details``: free-form per-batch diagnostics (lists of length ``B`` or scalars),
  never used for the loss.

An image with a NaN or infinite pixel (a diverged sample) is scored as a saved PNG of it would
hold it: ``call_reward``, through which trainers, evaluators and ``verify`` call rewards, hands
every reward the image with NaN and -inf pixels black (0) and +inf ones white (1). Left to each
reward, a float model (``tiny/pref``) returned NaN, which evaluation reads as "does not apply" and
leaves out of the mean (a model whose images diverge would score higher), while an 8-bit scorer
(OCR, the CLIP family) cast NaN to an arbitrary byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class RewardOutput:
    scores: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must have shape [B], got {tuple(scores.shape)}")
        self.scores = scores


def call_reward(reward, name: str, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
    """``reward(images, prompts, metadata)``, checked: a ``RewardOutput`` with one score per image,
    each finite or NaN ("does not apply"). An infinite score would turn the loss and then every
    trained weight into NaN; a single score would be broadcast over the batch and teach nothing.
    An image with a non-finite pixel is scored as its PNG would be (module docstring)."""
    out = reward(png_values(images), prompts, metadata)
    if not isinstance(out, RewardOutput):
        raise TypeError(f"reward {name!r} returned a {type(out).__name__}; a reward returns "
                        "RewardOutput(scores) with one float per image (opd_bench.rewards.RewardOutput)")
    if out.scores.shape[0] != len(prompts):
        raise ValueError(f"reward {name!r} returned {out.scores.shape[0]} scores for {len(prompts)} images; return one per image")
    infinite = int(torch.isinf(out.scores).sum())
    if infinite:
        raise ValueError(f"reward {name!r} returned an infinite score for {infinite} of {len(prompts)} images; "
                         "return finite scores, or NaN where the reward does not apply")
    return out


@runtime_checkable
class Reward(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput: ...


def png_values(images):
    """``images`` with each non-finite pixel as a saved PNG would hold it: NaN and -inf black (0),
    +inf white (1); the same tensor where every pixel is finite (or where it is no float tensor,
    which ``check_batch`` refuses)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point() and not torch.isfinite(images).all():
        return torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return images


def to_uint8(images: torch.Tensor):
    """``[B, 3, H, W]`` floats in [0, 1] -> uint8 ``[B, H, W, 3]`` numpy array (what saved PNGs hold).

    Scorers that take 8-bit images (PIL images, the reward server's PNGs) see images through this
    one rounding, so a generated image scores the same as its saved PNG. The OCR reward is the
    exception: it upscales the float image and rounds only then (``ocr.prepare_images``; kept, as
    committed OCR results are verified by rescoring), so in rare cases its reading of a generated
    image differs from that of the saved PNG (in a review, on 24 degraded OCR renders: 21% of the
    pixels the engine saw differed by one level; one reading of 24 changed case, same score).
    """
    x = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] -> B RGB PIL images (8 bits, as a saved PNG)."""
    from PIL import Image

    return [Image.fromarray(array) for array in to_uint8(images)]


def check_batch(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
    """Validate the shared call signature; rewards call this first so misuse fails loudly."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if not images.is_floating_point():  # 8-bit pixels (0-255) would score as values far outside [0, 1]
        raise ValueError(f"reward images must be floats in [0, 1], got {images.dtype}; "
                         "convert 8-bit images with images.float() / 255")
    if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
        raise ValueError(
            f"reward got {images.shape[0]} images, {len(prompts)} prompts and {len(metadata)} "
            "metadata records; pass one prompt and one (possibly empty) dict per image"
        )
