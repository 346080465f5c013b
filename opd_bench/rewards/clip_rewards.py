"""Real preference rewards built on CLIP: PickScore, CLIPScore and HPSv2, from local weights.

* :class:`PickScoreReward` - PickScore v1 (a CLIP-H fine-tuned on Pick-a-Pic), loaded with
  transformers (``CLIPModel`` + the LAION CLIP-H processor). score = logit_scale.exp() *
  cos(text, image), as the PickScore model card computes it (about 18-24 on real images;
  Flow-GRPO divides by 26, ``divide_by=26``).
* :class:`CLIPScoreReward` - an open_clip CLIP; score = ``weight`` * max(cos(image, text), 0).
  ``weight=100`` (default) is torchmetrics' CLIPScore, 0-100 scale; ``weight=2.5`` is the
  CLIPScore paper's (Hessel et al. 2021), which rescales to roughly [0, 1] for ViT-B/32.
* :class:`HPSv2Reward` - HPS v2 / v2.1: open_clip ViT-H-14 with the HPS checkpoint;
  score = cos(image, text), as ``hpsv2.score`` (normalised features, ``image @ text.T``,
  diagonal; no logit scale).

Images are quantised to 8 bits and handed to each model's own preprocessing as PIL images,
which is what the official scorers see when they read saved images; the processors then resize,
crop and normalise exactly once. Nothing is downloaded: every path goes through
:func:`opd_bench.weights.resolve_weights`, so missing weights raise ``MissingWeightsError``
with the fetch command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from opd_bench.rewards.base import RewardOutput, check_batch, to_pil
from opd_bench.weights import CorruptWeightsError, MissingWeightsError, resolve_weights

PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_HUB_ID = "xswu/HPSv2"
HPSV2_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# An open_clip-format OpenAI ViT-L/14 (open_clip's own "openai" tag for ViT-L-14 points here).
CLIPSCORE_HUB_ID = "timm/vit_large_patch14_clip_224.openai"
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors|open_clip_pytorch_model.safetensors|open_clip_pytorch_model.bin"
    "|open_clip_pytorch_model.pth|model.safetensors|pytorch_model.bin"
)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    value = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return value


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_loaded(what: str, folder: Path, info: dict, hub_id: str) -> None:
    """Refuse a transformers model whose checkpoint did not fill it exactly (``from_pretrained``'s
    ``output_loading_info``: missing, unexpected and mismatched keys)."""
    def listed(keys: list[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    mismatched = [f"{key} {list(saved)} vs {list(wanted)}" for key, saved, wanted in info.get("mismatched_keys", ())]
    problems = [f"{kind} {listed(keys)}" for kind, keys in (
        ("missing", info.get("missing_keys", ())), ("unexpected", info.get("unexpected_keys", ())),
        ("mismatched (checkpoint vs config)", mismatched)) if keys]
    if problems:
        raise CorruptWeightsError(f"{what} weights in {folder} do not match its config.json ({'; '.join(problems)}); "
                                  f"fetch the complete checkpoint (`hf download {hub_id}`) "
                                  "rather than score with random weights")


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected embedding; 5 returns an output with it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# --------------------------------------------------------------------------------------------
# PickScore (transformers)


class PickScoreReward:
    """PickScore: logit_scale.exp() * cos(text, image) / ``divide_by``.

    ``model_path``: a folder or cached hub id of a transformers ``CLIPModel``
    (``yuvalkirstain/PickScore_v1``); ``processor_path``: its processor (the LAION CLIP-H one;
    only its ``*.json`` / ``*.txt`` files are needed). details: ``logit`` (the raw score),
    ``cosine``.
    """

    def __init__(self, model_path: str | Path | None = PICKSCORE_HUB_ID,
                 processor_path: str | Path | None = PICKSCORE_PROCESSOR_HUB_ID,
                 device: str = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 32, divide_by: float = 1.0):
        from transformers import AutoProcessor, CLIPModel

        model_dir, proc_dir = self.locate_weights(model_path, processor_path)
        self.dtype = _torch_dtype(dtype)
        self.device = device
        self.processor = AutoProcessor.from_pretrained(str(proc_dir))
        # transformers fills weights the checkpoint lacks (or, with ignore_mismatched_sizes, has in
        # another shape) with random values and only logs it; a PickScore with a random projection
        # scores noise, so every such weight is an error, named in one line.
        model, info = CLIPModel.from_pretrained(str(model_dir), dtype=self.dtype, output_loading_info=True,
                                                ignore_mismatched_sizes=True)
        _check_loaded("PickScore", model_dir, info, PICKSCORE_HUB_ID)
        self.model = model.to(device).eval()
        # The model card truncates prompts at 77 tokens, CLIP's text length; read it from the
        # config so smaller test models work the same way.
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = int(batch_size)
        self.divide_by = float(divide_by)

    @staticmethod
    def locate_weights(model_path: str | Path | None = PICKSCORE_HUB_ID,
                       processor_path: str | Path | None = PICKSCORE_PROCESSOR_HUB_ID, **_: Any) -> tuple[Path, Path]:
        model_dir = resolve_weights(model_path, what="PickScore", hub_id=PICKSCORE_HUB_ID, model_type="clip",
                                    expected=["config.json", "model.safetensors|pytorch_model.bin"])
        proc_dir = resolve_weights(processor_path, what="PickScore processor",
                                   hub_id=PICKSCORE_PROCESSOR_HUB_ID, option="processor_path",
                                   expected=["preprocessor_config.json|processor_config.json",
                                             "tokenizer_config.json"])
        return model_dir, proc_dir

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        cosines = []
        for part in _chunks(images.shape[0], self.batch_size):
            pixels = self.processor(images=to_pil(images[part]), return_tensors="pt")["pixel_values"]
            text = self.processor(text=list(prompts[part]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
            img = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            txt = _pooled(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                       attention_mask=text["attention_mask"].to(self.device)))
            cosines.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1).cpu())
        cosine = torch.cat(cosines) if cosines else torch.zeros(0)
        logit = self.model.logit_scale.float().exp().cpu() * cosine
        return RewardOutput(logit / self.divide_by, {"logit": logit.tolist(), "cosine": cosine.tolist()})


# --------------------------------------------------------------------------------------------
# open_clip models (CLIPScore, HPSv2)


_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class _OpenClipScorer:
    """An open_clip model, its inference transform and tokenizer; ``cosine(images, prompts)``."""

    def __init__(self, model_name: str, checkpoint: Path, device: str, dtype: torch.dtype | str,
                 batch_size: int, resize_mode: str | None = None):
        import open_clip

        self.dtype = _torch_dtype(dtype)
        if self.dtype not in _PRECISION:
            raise ValueError(f"open_clip rewards support dtype float32, float16 or bfloat16, got {self.dtype}")
        if checkpoint.is_dir():  # an open_clip hub-style folder: open_clip_config.json + weights
            model_name = f"local-dir:{checkpoint}"
            checkpoint_arg = None
        else:
            checkpoint_arg = str(checkpoint)
        self.model, self.transform = open_clip.create_model_from_pretrained(
            model_name, pretrained=checkpoint_arg, precision=_PRECISION[self.dtype], device=device,
            image_resize_mode=resize_mode)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for part in _chunks(images.shape[0], self.batch_size):
            pixels = torch.stack([self.transform(im) for im in to_pil(images[part])])
            tokens = self.tokenizer(list(prompts[part]))
            img = self.model.encode_image(pixels.to(self.device, self.dtype))
            txt = self.model.encode_text(tokens.to(self.device))
            out.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)


class CLIPScoreReward:
    """CLIPScore = ``weight`` * max(cos(image, text), 0), with an open_clip model.

    ``model_path``: an open_clip checkpoint file (``.safetensors`` / ``.bin`` / ``.pt`` state
    dict) of architecture ``model_name``, or a folder / cached hub id holding
    ``open_clip_config.json`` + weights (then ``model_name`` is ignored). OpenAI's weights need
    ``model_name="ViT-L-14-quickgelu"`` (they were trained with QuickGELU). ``weight=100`` is
    torchmetrics' scale (the Flow-GRPO-style 0-100 number); ``weight=2.5`` is the paper's.
    details: ``cosine``.
    """

    def __init__(self, model_path: str | Path | None = None, model_name: str = "ViT-L-14-quickgelu",
                 device: str = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 32, weight: float = 100.0):
        self.scorer = _OpenClipScorer(model_name, self.locate_weights(model_path), device, dtype, batch_size)
        self.weight = float(weight)

    @staticmethod
    def locate_weights(model_path: str | Path | None = None, **_: Any) -> Path:
        return resolve_weights(model_path, what="CLIPScore", hub_id=CLIPSCORE_HUB_ID,
                               expected=["open_clip_config.json", OPEN_CLIP_WEIGHTS])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        cosine = self.scorer.cosine(images, prompts)
        return RewardOutput(self.weight * cosine.clamp(min=0), {"cosine": cosine.tolist()})


class HPSv2Reward:
    """HPS v2 / v2.1 score = cos(image, text) (about 0.2-0.35 on real images).

    ``model_path``: the checkpoint file (``HPS_v2.1_compressed.pt``; a dict with
    ``"state_dict"`` or a raw state dict), or a folder / cached hub id (``xswu/HPSv2``) holding
    the file of ``version`` ("v2.0" or "v2.1"). ``model_name``: the open_clip architecture
    (ViT-H-14; tests pass a tiny one). Images are resized on their longest side and padded to a
    square, as hpsv2's inference transform does (the same as a plain resize for square images).
    """

    def __init__(self, model_path: str | Path | None = HPSV2_HUB_ID, version: str = "v2.1",
                 model_name: str = "ViT-H-14", device: str = "cpu",
                 dtype: torch.dtype | str = torch.float32, batch_size: int = 32):
        path = self.locate_weights(model_path, version)
        self.scorer = _OpenClipScorer(model_name, path, device, dtype, batch_size, resize_mode="longest")

    @staticmethod
    def locate_weights(model_path: str | Path | None = HPSV2_HUB_ID, version: str = "v2.1", **_: Any) -> Path:
        """The checkpoint file of ``version``."""
        if version not in HPSV2_FILES:
            raise ValueError(f"HPSv2 version must be one of {sorted(HPSV2_FILES)}, got {version!r}")
        filename = HPSV2_FILES[version]
        path = resolve_weights(model_path, what=f"HPS {version}", hub_id=HPSV2_HUB_ID, expected=[filename], hub_files=[filename])
        return path / filename if path.is_dir() else path

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        return RewardOutput(self.scorer.cosine(images, prompts))


__all__ = ["PickScoreReward", "CLIPScoreReward", "HPSv2Reward", "MissingWeightsError", "to_pil"]
