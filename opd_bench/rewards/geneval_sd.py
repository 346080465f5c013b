"""GenEval rewards for real images: a detector backend + CLIP colour + GenEval's rules.

The rules are those of the tiny suite (:mod:`opd_bench.geneval`); only the eyes differ:

* **Detector backends** implement :class:`Detector`: ``detect(images, class_names)`` returns, per
  image, a list of ``{"class", "confidence", "box": (x0, y0, x1, y1) in pixels, "mask"?: bool
  H x W array}``. ``owlv2`` (below) is an open-vocabulary detector run in-process with
  transformers; ``mmdet`` (:mod:`opd_bench.rewards.geneval_mmdet`) is GenEval's own Mask2Former,
  meant to run inside a reward server. A detector object can also be passed directly.
* **Colour**: as GenEval, CLIP zero-shot over its ten colour names on the box crop, with
  everything outside the mask (when the detector gives one) painted grey ``#999``, prompts
  "a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object"
  (embeddings normalised, averaged, renormalised, as clip_benchmark).

OWLv2's scores are not calibrated like Mask2Former's: with GenEval's thresholds (0.3, 0.9 for
counting) its numbers are not comparable with published GenEval scores; only the ``mmdet``
backend reproduces the official evaluator. Weights are never downloaded (``opd_bench.weights``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Protocol, Sequence

import torch

from opd_bench import geneval
from opd_bench.registry import check_options
from opd_bench.rewards.base import RewardOutput, check_batch, to_uint8
from opd_bench.weights import resolve_weights

# GenEval's object_names.txt: the 80 COCO classes in Mask2Former's output order, with GenEval's
# spellings ("computer mouse", "tv remote", "computer keyboard").
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLOUR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
OWLV2_HUB_ID = "google/owlv2-base-patch16-ensemble"
# GenEval's colour model is open_clip ViT-L-14 "openai"; those weights need QuickGELU, hence the name.
CLIP_MODEL_NAME = "ViT-L-14-quickgelu"
CLIP_HUB_ID = "timm/vit_large_patch14_clip_224.openai"


class Detector(Protocol):
    def detect(self, images: torch.Tensor, class_names: Sequence[str]) -> list[list[dict]]:
        """``images`` [B, 3, H, W] in [0, 1] -> per image a list of detections (see module doc)."""
        ...


# name -> "module:class"; the class takes ``model_path``, ``device`` and its own options.
DETECTORS = {
    "owlv2": "opd_bench.rewards.geneval_sd:OwlV2Detector",
    "mmdet": "opd_bench.rewards.geneval_mmdet:MMDetDetector",
}


def detector_factory(name: str, options: dict[str, Any]) -> Callable[..., Detector]:
    """The class of detector ``name``, its ``options`` checked."""
    if name not in DETECTORS:
        raise ValueError(f"unknown GenEval detector {name!r}; known detectors: {', '.join(sorted(DETECTORS))}")
    module, _, attr = DETECTORS[name].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    check_options(f"GenEval detector {name!r} (detector_options)", factory, options)
    return factory


def build_detector(name: str, **options: Any) -> Detector:
    return detector_factory(name, options)(**options)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# OWLv2 (transformers, in-process)


# Cached so that the evaluation and training rewards of one process share one copy of the weights.
@functools.lru_cache(maxsize=4)
def _load_owlv2(path: str, device: str):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model = Owlv2ForObjectDetection.from_pretrained(path).to(device).eval()
    return model, Owlv2Processor.from_pretrained(path)


class OwlV2Detector:
    """Open-vocabulary detection with OWLv2, one text query per class ("a photo of a {class}").

    Every box gets its best-scoring class (transformers' post-processing); boxes scoring at most
    ``min_confidence`` are dropped and class-wise NMS at ``nms_iou`` removes the duplicates that
    neighbouring patches produce (OWLv2 has no NMS of its own; Mask2Former needs none).
    """

    def __init__(
        self,
        model_path: str | None = OWLV2_HUB_ID,
        device: str | None = None,
        query_template: str = "a photo of a {}",
        min_confidence: float = 0.1,
        nms_iou: float = 0.5,
        batch_size: int = 8,
    ):
        self.path = str(self.locate_weights(model_path))
        self.device = device or default_device()
        self.query_template = query_template
        self.min_confidence = float(min_confidence)
        self.nms_iou = float(nms_iou)
        self.batch_size = int(batch_size)

    @staticmethod
    def locate_weights(model_path: str | None = OWLV2_HUB_ID, **_: Any) -> Path:
        return resolve_weights(model_path, what="OWLv2 detector", hub_id=OWLV2_HUB_ID, model_type="owlv2",
                               expected=("config.json", "preprocessor_config.json|processor_config.json"))

    @torch.no_grad()
    def detect(self, images: torch.Tensor, class_names: Sequence[str]) -> list[list[dict]]:
        from torchvision.ops import batched_nms

        model, processor = _load_owlv2(self.path, self.device)
        queries = [self.query_template.format(name) for name in class_names]
        height, width = images.shape[-2:]
        side = max(height, width)  # OWLv2 pads to a square: boxes are relative to that square
        results: list[list[dict]] = []
        arrays = to_uint8(images)
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            inputs = processor(text=[queries] * len(chunk), images=chunk, truncation=True, return_tensors="pt")
            outputs = model(**inputs.to(self.device))
            found = processor.image_processor.post_process_object_detection(
                outputs, threshold=self.min_confidence, target_sizes=[(side, side)] * len(chunk)
            )
            for item in found:
                boxes = item["boxes"].float().cpu()
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
                scores, labels = item["scores"].float().cpu(), item["labels"].cpu()
                # boxes in the padding (non-square images) shrink to nothing when clipped: drop them
                keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
                keep = batched_nms(boxes, scores, labels, self.nms_iou)  # sorted by decreasing score
                results.append([
                    {"class": class_names[int(labels[i])], "confidence": float(scores[i]),
                     "box": tuple(float(v) for v in boxes[i])}
                    for i in keep.tolist()
                ])
        return results


# ---------------------------------------------------------------------------------------------
# Colour: CLIP zero-shot on the masked crop (GenEval's color_classification)


def _clip_checkpoint(model_path: str | None) -> str:
    """A checkpoint file for open_clip: the path itself, or the open_clip weights inside a folder."""
    path = resolve_weights(model_path, what="GenEval colour classifier (open_clip)", hub_id=CLIP_HUB_ID,
                           option="clip_model_path")
    if path.is_file():
        return str(path)
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            return str(path / name)
    found = sorted(p.name for p in path.iterdir())[:8]
    raise FileNotFoundError(f"no open_clip checkpoint (open_clip_model.safetensors or open_clip_pytorch_model.bin) in "
                            f"{str(path)!r} (found: {', '.join(found) or 'nothing'}); pass the checkpoint file as clip_model_path=")


@functools.lru_cache(maxsize=2)
def _load_clip(model_name: str, checkpoint: str, device: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


class ClipColourClassifier:
    """``classify(image, detections, classname) -> colour names`` with open_clip, as GenEval.

    ``image``: a PIL RGB image; each detection's ``box`` is cropped (``crop=False``: whole image)
    after painting everything outside its ``mask`` (if any) with ``bgcolor`` (GenEval: ``#999``).
    """

    def __init__(
        self,
        model_name: str = CLIP_MODEL_NAME,
        model_path: str | None = CLIP_HUB_ID,
        device: str | None = None,
        bgcolor: str = "#999",
        crop: bool = True,
    ):
        self.model_name = model_name
        self.checkpoint = _clip_checkpoint(model_path)
        self.device = device or default_device()
        self.bgcolor, self.crop = bgcolor, bool(crop)
        self._classifiers: dict[str, torch.Tensor] = {}

    def _classifier(self, classname: str) -> torch.Tensor:
        """[D, 10] text embeddings of the colours for one object class (cached per class)."""
        if classname not in self._classifiers:
            model, _, tokenizer = _load_clip(self.model_name, self.checkpoint, self.device)
            columns = []
            for colour in geneval.COLORS:
                texts = [t.format(c=colour, obj=classname) for t in COLOUR_TEMPLATES]
                emb = model.encode_text(tokenizer(texts).to(self.device)).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                columns.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    def _view(self, image, det: dict):
        from PIL import Image
        import numpy as np

        if det.get("mask") is not None:
            mask = Image.fromarray(np.asarray(det["mask"]).astype(bool))
            image = Image.composite(image, Image.new("RGB", image.size, color=self.bgcolor), mask)
        if self.crop:
            image = image.crop(tuple(round(float(v)) for v in det["box"][:4]))
        return image

    @torch.no_grad()
    def __call__(self, image, detections: Sequence[dict], classname: str) -> list[str]:
        if not detections:
            return []
        model, preprocess, _ = _load_clip(self.model_name, self.checkpoint, self.device)
        crops = torch.stack([preprocess(self._view(image, d)) for d in detections]).to(self.device)
        features = torch.nn.functional.normalize(model.encode_image(crops).float(), dim=-1)
        logits = 100.0 * features @ self._classifier(classname)
        return [geneval.COLORS[i] for i in logits.argmax(dim=1).tolist()]


# ---------------------------------------------------------------------------------------------
# Reward

ColourClassifier = Callable[[Any, Sequence[dict], str], Sequence[str]]


def _detector_options(model_path: str | None, device: str | None, detector_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(detector_options or {}, device=device)
    if model_path is not None:
        options["model_path"] = model_path
    return options


class SDGenEvalReward:
    """GenEval on real images: 1.0 / 0.0 by GenEval's rules (``strict=True``) or Flow-GRPO's
    partial credit (``partial="flow-grpo"``, the default, may be negative; ``"clipped"``: in
    [0, 1]; :func:`opd_bench.geneval.score_partial`); NaN for samples whose metadata is not a
    GenEval record.

    ``detector``: a name in ``DETECTORS`` (built with ``model_path``, ``device`` and
    ``detector_options``) or an object with ``detect``. ``colour``: a ``(PIL image, detections,
    classname) -> colours`` function replacing the CLIP classifier (``clip_model_name``,
    ``clip_model_path``). The other options are GenEval's (:class:`opd_bench.geneval.Rules`).
    Weights are located when the reward is built (clear error if missing) and loaded on first use.
    """

    def __init__(
        self,
        strict: bool = True,
        detector: str | Detector = "owlv2",
        model_path: str | None = None,
        device: str | None = None,
        detector_options: dict[str, Any] | None = None,
        clip_model_name: str = CLIP_MODEL_NAME,
        clip_model_path: str | None = CLIP_HUB_ID,
        colour: ColourClassifier | None = None,
        threshold: float = geneval.THRESHOLD,
        counting_threshold: float = geneval.COUNTING_THRESHOLD,
        max_objects: int = geneval.MAX_OBJECTS,
        max_overlap: float = 1.0,
        position_threshold: float = geneval.POSITION_THRESHOLD,
        partial: str = geneval.DEFAULT_PARTIAL_FORM,
    ):
        if partial not in geneval.PARTIAL_FORMS:
            raise ValueError(f"partial must be one of {geneval.PARTIAL_FORMS}, got {partial!r}")
        self.strict = bool(strict)
        self.partial = partial
        self.rules = geneval.Rules(threshold, counting_threshold, max_objects, max_overlap, position_threshold)
        if isinstance(detector, str):
            detector = build_detector(detector, **_detector_options(model_path, device, detector_options))
        self.detector = detector
        self.colour = colour or ClipColourClassifier(clip_model_name, clip_model_path, device)

    @classmethod
    def locate_weights(cls, detector: str | Detector = "owlv2", model_path: str | None = None,
                       detector_options: dict[str, Any] | None = None, clip_model_path: str | None = CLIP_HUB_ID,
                       colour: ColourClassifier | None = None, **_: Any) -> None:
        """The detector's and the colour classifier's weights, found without building them (mmdet's
        detector loads its checkpoint when built)."""
        if isinstance(detector, str):
            options = _detector_options(model_path, None, detector_options)
            locate = getattr(detector_factory(detector, options), "locate_weights", None)
            if locate is not None:
                locate(**options)
        if colour is None:
            _clip_checkpoint(clip_model_path)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        check_batch(images, prompts, metadata)
        n = len(prompts)
        scores, tags, corrects, reasons = [float("nan")] * n, [None] * n, [None] * n, ["not a geneval record"] * n
        todo = [i for i, meta in enumerate(metadata) if isinstance(meta, dict) and "include" in meta]
        if todo:
            detections = self.detector.detect(images[todo], COCO_CLASSES)
            arrays = to_uint8(images[todo])
            for k, i in enumerate(todo):
                colour_fn = self._colour_fn(arrays[k])
                ok, reason = geneval.evaluate_image(metadata[i], detections[k], colour_fn, self.rules)
                partial = None if self.strict else geneval.score_partial(metadata[i], detections[k], colour_fn, self.rules, self.partial)
                scores[i] = float(ok) if self.strict else partial
                tags[i], corrects[i], reasons[i] = metadata[i].get("tag"), bool(ok), reason
        return RewardOutput(torch.tensor(scores, dtype=torch.float32),
                            {"tag": tags, "correct": corrects, "reason": reasons})

    def _colour_fn(self, array) -> geneval.ColourFn:
        """The rules' ``colour_fn`` for one image; each detection is classified at most once
        (the strict and partial rules ask about overlapping sets of detections)."""
        from PIL import Image

        image, seen = Image.fromarray(array), {}

        def colour_fn(dets: Sequence[dict], classname: str) -> list[str]:
            new = [d for d in dets if id(d) not in seen]
            for det, colour in zip(new, self.colour(image, new, classname)):
                seen[id(det)] = colour
            return [seen[id(d)] for d in dets]

        return colour_fn


class SDGenEvalPartialReward(SDGenEvalReward):
    """:class:`SDGenEvalReward` with ``strict=False``: Flow-GRPO's partial credit (a registry target)."""

    def __init__(self, **options: Any):
        super().__init__(strict=False, **options)
