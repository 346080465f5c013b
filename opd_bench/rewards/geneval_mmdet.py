"""GenEval's own detector, Mask2Former (Swin-S, COCO) via mmdet: the ``mmdet`` detector backend.

**Not verified.** opd-bench's own environment has no mmdet, so this module has never been run; it
follows GenEval's ``evaluation/evaluate_images.py`` (mmdet 2.x, mmcv-full 1.x, the environment its
README sets up) and also reads mmdet 3.x results. Check it on a few images against the official
evaluator before trusting its numbers.

It is meant to run inside that separate environment, behind the reward server::

    opd-bench serve-reward sd/geneval-mmdet ...   # options: model_path=<.pth>, clip_model_path=...

and to be used from the training / evaluation environment with the ``remote`` reward (in the sd
suite config: ``"reward": ["remote", {"url": ..., "reward": "sd/geneval-mmdet"}]`` in the geneval
section; see ``docs/sd_suite.md``). mmdet is
imported only when the detector is built.

``model_path``: the checkpoint GenEval's ``download_models.sh`` fetches
(``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``); ``config``: the mmdet config, by default
``configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py`` next to the mmdet package.
Detections carry masks, so colours are classified on the masked crop, as GenEval does.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from opd_bench.rewards.base import to_uint8
from opd_bench.rewards.geneval_sd import COCO_CLASSES, SDGenEvalReward, default_device
from opd_bench.weights import MissingPackageError, resolve_weights

CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"


class MMDetDetector:
    """``detect(images, class_names)`` with an mmdet detector whose labels are the 80 COCO classes."""

    def __init__(self, model_path: str | None = None, device: str | None = None, config: str | None = None):
        try:
            import mmdet
            from mmdet.apis import init_detector
        except ImportError:
            raise MissingPackageError("the mmdet GenEval detector needs mmdet (GenEval's environment: mmdet 2.x, mmcv-full 1.x); "
                               "run it in that environment with `opd-bench serve-reward sd/geneval-mmdet` "
                               "and use the `remote` reward here") from None
        checkpoint = self.locate_weights(model_path)
        config = config or os.path.join(os.path.dirname(mmdet.__file__), "..", CONFIG)
        if not os.path.isfile(config):
            raise FileNotFoundError(f"mmdet config {config!r} does not exist; pass config= (GenEval uses {CONFIG} of mmdet)")
        self.model = init_detector(config, str(checkpoint), device=device or default_device())

    @staticmethod
    def locate_weights(model_path: str | None = None, **_: Any):
        return resolve_weights(model_path, what="Mask2Former (GenEval detector) checkpoint", option="model_path")

    @torch.no_grad()
    def detect(self, images: torch.Tensor, class_names: Sequence[str] = COCO_CLASSES) -> list[list[dict]]:
        from mmdet.apis import inference_detector

        wanted = set(class_names)
        out = []
        for array in to_uint8(images):
            # mmdet reads files with cv2 (BGR); GenEval passes file paths, so give it BGR too
            result = inference_detector(self.model, array[:, :, ::-1].copy())
            out.append([d for d in _detections(result) if d["class"] in wanted])
        return out


def _detections(result: Any) -> list[dict]:
    """mmdet 2.x (per-class arrays [N, 5] and masks) or 3.x (``pred_instances``) -> detections."""
    dets = []
    if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
        inst = result.pred_instances
        masks = inst.masks.cpu().numpy() if "masks" in inst else None
        for j, (box, score, label) in enumerate(zip(inst.bboxes.cpu().tolist(), inst.scores.cpu().tolist(), inst.labels.cpu().tolist())):
            dets.append({"class": COCO_CLASSES[label], "confidence": score, "box": tuple(box),
                         "mask": None if masks is None else masks[j]})
        return dets
    bbox, segm = (result[0], result[1] if len(result) > 1 else None) if isinstance(result, tuple) else (result, None)
    for index, name in enumerate(COCO_CLASSES):
        for j, row in enumerate(bbox[index]):
            dets.append({"class": name, "confidence": float(row[4]), "box": tuple(float(v) for v in row[:4]),
                         "mask": None if segm is None else segm[index][j]})
    return dets


class MMDetGenEvalReward(SDGenEvalReward):
    """``sd/geneval`` with the mmdet Mask2Former detector (``strict=False``: partial credit)."""

    def __init__(self, strict: bool = True, **options: Any):
        super().__init__(strict=strict, detector=options.pop("detector", "mmdet"), **options)

    @classmethod
    def locate_weights(cls, detector: Any = "mmdet", **options: Any) -> None:
        super().locate_weights(detector=detector, **options)
