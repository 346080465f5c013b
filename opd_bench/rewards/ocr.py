"""OCR reward (PAPER.md section 3): does the image show the text quoted in the prompt?

Metric (Flow-GRPO's OCR reward)::

    target     = quoted text of the prompt, spaces removed, lower-cased
    prediction = OCR output, spaces removed, lower-cased
    distance   = 0 if target occurs inside prediction else Levenshtein(prediction, target)
    reward     = 1 - min(distance, len(target)) / len(target)

``target_text`` and ``ocr_score`` are pure functions (no dependencies). ``OCRReward`` runs a
real OCR engine (detection + recognition) on each image. Engines live behind a tiny interface:
a builder in ``ENGINES`` takes keyword options and returns a function mapping a list of uint8
``H x W x 3`` RGB arrays to a list of predicted strings (one per image, ``""`` when nothing is
read). Engine packages are imported only when the engine is first built, so importing this
module is cheap.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from opd_bench.rewards.base import RewardOutput, check_batch, to_uint8

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Metric


# A double-quoted span: straight (") or curly (U+201C / U+201D) quotes, in any pairing, so a
# prompt mixing styles still parses. Quotes are matched left to right in pairs.
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]*)[\"\u201c\u201d]")


def normalize_text(text: str) -> str:
    """Remove all whitespace and lower-case (the metric's normalisation)."""
    return "".join(text.split()).lower()


def target_text(prompt: str) -> str | None:
    """Text inside double quotes in ``prompt``, normalised; ``None`` when there is none.

    Several quoted spans are joined in order. Empty quotes (``""``) count as no target.
    """
    spans = _QUOTED.findall(prompt or "")
    target = normalize_text("".join(spans))
    return target or None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1); O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            current[j] = min(
                previous[j] + 1,  # delete ca
                current[j - 1] + 1,  # insert cb
                previous[j - 1] + (ca != cb),  # substitute (or match)
            )
        previous = current
    return previous[-1]


def ocr_score(prediction: str, target: str) -> float:
    """Reward in [0, 1] for reading ``prediction`` where ``target`` was asked for.

    Both are normalised (whitespace removed, lower-cased). Raises ``ValueError`` on an empty
    target, for which the metric is undefined (``OCRReward`` gives NaN instead).
    """
    prediction, target = normalize_text(prediction or ""), normalize_text(target or "")
    if not target:
        raise ValueError("ocr_score needs a non-empty target text")
    distance = 0 if target in prediction else levenshtein(prediction, target)
    return 1.0 - min(distance, len(target)) / len(target)


# ---------------------------------------------------------------------------------------------
# Engines: name -> builder(**options) -> predict(list of uint8 HxWx3 RGB arrays) -> list[str]

Predictor = Callable[[Sequence[Any]], list[str]]


def _rapidocr(
    num_threads: int | None = None,
    text_score: float = 0.5,
    det_limit_side_len: int = 256,
    det_limit_type: str = "min",
    det_thresh: float = 0.3,
    det_box_thresh: float = 0.5,
    det_unclip_ratio: float = 1.6,
    use_cls: bool = False,
) -> Predictor:
    """RapidOCR 3.x on onnxruntime with the PP-OCRv6 det/rec models shipped in its wheel.

    Model paths are given explicitly so the engine never tries to download anything. The
    angle classifier is off (text is upright; Flow-GRPO also calls PaddleOCR with cls=False).
    Lines scoring below ``text_score`` are dropped (PaddleOCR's drop_score, 0.5, as in
    Flow-GRPO). ``det_limit_*``: the detector upsamples images whose short side is below
    ``det_limit_side_len`` (RapidOCR's default 736 is ~3x slower on small images for no gain).
    ``num_threads``: onnxruntime's threads; default: as many as torch uses.
    """
    from pathlib import Path

    import numpy as np
    import rapidocr
    from rapidocr import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.CRITICAL)
    models = Path(rapidocr.__file__).resolve().parent / "models"
    paths = {
        "Det": models / "PP-OCRv6_det_small.onnx",
        "Rec": models / "PP-OCRv6_rec_small.onnx",
        "Cls": models / "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    }
    missing = [str(p) for k, p in paths.items() if not p.is_file() and (k != "Cls" or use_cls)]
    if missing:
        raise RuntimeError(
            f"rapidocr {getattr(rapidocr, '__version__', '?')} lacks its bundled models "
            f"{missing}; opd-bench expects rapidocr 3.x whose wheel ships PP-OCRv6 det/rec"
        )
    params: dict[str, Any] = {
        "Global.log_level": "critical",
        "Global.use_cls": use_cls,
        "Global.text_score": text_score,
        "Det.model_path": str(paths["Det"]),
        "Det.limit_side_len": det_limit_side_len,
        "Det.limit_type": det_limit_type,
        "Det.thresh": det_thresh,
        "Det.box_thresh": det_box_thresh,
        "Det.unclip_ratio": det_unclip_ratio,
        "Rec.model_path": str(paths["Rec"]),
        "Cls.model_path": str(paths["Cls"]),
        # as many threads as torch: a worker of a parallel run (--jobs) has its share of the cores
        "EngineConfig.onnxruntime.intra_op_num_threads": torch.get_num_threads() if num_threads is None else num_threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }
    engine = RapidOCR(params=params)
    logging.getLogger("RapidOCR").setLevel(logging.CRITICAL)  # RapidOCR() resets the level

    def predict(images: Sequence[Any]) -> list[str]:
        out = []
        for image in images:
            bgr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[:, :, ::-1])
            try:
                result = engine(bgr)
                txts = getattr(result, "txts", None) or ()
                out.append(" ".join(t for t in txts if t))
            except Exception as error:  # one bad image must not sink the batch
                log.warning("rapidocr failed on one image (%s: %s); prediction ''",
                            type(error).__name__, error)
                out.append("")
        return out

    return predict


def _paddleocr(**options: Any) -> Predictor:
    """PaddleOCR, Flow-GRPO's engine (optional package; see ``opd_bench.rewards.ocr_paddle``)."""
    from opd_bench.rewards.ocr_paddle import build

    return build(**options)


ENGINES: dict[str, Callable[..., Predictor]] = {"rapidocr": _rapidocr, "paddleocr": _paddleocr}


def register_engine(name: str, builder: Callable[..., Predictor]) -> None:
    """Add an OCR engine: ``builder(**options)`` returns ``predict(list of RGB uint8) -> list[str]``."""
    ENGINES[name] = builder


def _check_engine(name: str) -> None:
    if name not in ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")


def build_engine(name: str, **options: Any) -> Predictor:
    """Build the engine registered as ``name`` (imports its package now)."""
    _check_engine(name)
    return ENGINES[name](**options)


# ---------------------------------------------------------------------------------------------
# Reward


def prepare_images(images: torch.Tensor, upscale: int = 3, pad: int = 24) -> list[Any]:
    """``[B, 3, H, W]`` floats in [0, 1] -> list of uint8 ``H' x W' x 3`` RGB numpy arrays.

    Upscales by ``upscale`` (bicubic) and pads ``pad`` pixels on every side by replicating the
    border, which helps the detector find glyphs that touch the edge of small images.

    The float image is upscaled and only then rounded to 8 bits, so the engine may see pixels one
    level off those it sees for the image's saved PNG and, rarely, read it differently (see
    ``base.to_uint8``). Rounding first would change scores of a versioned benchmark whose
    committed results are verified by rescoring, so it stays as it is.
    """
    x = images.detach().float().cpu().clamp(0, 1)
    if upscale and upscale != 1:
        x = F.interpolate(x, scale_factor=upscale, mode="bicubic", align_corners=False)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return list(to_uint8(x))


class OCRReward:
    """Partial-credit OCR reward: ``ocr_score(OCR(image), quoted text)`` per sample.

    The target is ``metadata[i]["text"]`` when present, else the quoted text of the prompt;
    samples without a target score NaN. ``details["prediction"]`` holds what the engine read
    (``None`` where no target) and ``details["target"]`` the normalised target.

    Options: ``engine`` (see ``ENGINES``), ``upscale`` (integer factor, bicubic), ``pad``
    (border in pixels after upscaling), ``engine_options`` (passed to the engine builder, e.g.
    ``num_threads``). The engine is built on first use.
    """

    def __init__(
        self,
        engine: str = "rapidocr",
        upscale: int = 3,
        pad: int = 24,
        engine_options: dict[str, Any] | None = None,
    ):
        _check_engine(engine)
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f"OCRReward upscale must be a positive integer, got {upscale!r}")
        if int(pad) != pad or pad < 0:
            raise ValueError(f"OCRReward pad must be a non-negative integer, got {pad!r}")
        self.engine = engine
        self.upscale = int(upscale)
        self.pad = int(pad)
        self.engine_options = dict(engine_options or {})
        self._predict: Predictor | None = None

    def predict(self, images: torch.Tensor) -> list[str]:
        """Raw engine predictions for a ``[B, 3, H, W]`` batch."""
        if self._predict is None:
            self._predict = build_engine(self.engine, **self.engine_options)
        if images.shape[0] == 0:
            return []
        return self._predict(prepare_images(images, self.upscale, self.pad))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        targets = []
        for prompt, meta in zip(prompts, metadata):
            text = (meta or {}).get("text")
            if text is None:
                targets.append(target_text(prompt))
            else:
                targets.append(normalize_text(str(text)) or None)
        todo = [i for i, t in enumerate(targets) if t is not None]
        predictions: list[str | None] = [None] * len(targets)
        scores = [math.nan] * len(targets)
        if todo:
            for i, p in zip(todo, self.predict(images[todo])):
                predictions[i] = p
                scores[i] = ocr_score(p, targets[i])
        return RewardOutput(
            torch.tensor(scores, dtype=torch.float32),
            {"prediction": predictions, "target": targets},
        )


__all__ = [
    "ENGINES",
    "OCRReward",
    "build_engine",
    "levenshtein",
    "normalize_text",
    "ocr_score",
    "prepare_images",
    "register_engine",
    "target_text",
]
