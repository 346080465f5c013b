"""The ``paddleocr`` OCR engine (Flow-GRPO's): PaddleOCR, optional, used as ``OCRReward(engine="paddleocr")``.

**Not verified**: paddleocr is not installed where opd-bench is developed, so this adapter has not
been run. It follows Flow-GRPO's scorer (``PaddleOCR(use_angle_cls=False, lang="en")``,
``ocr(image, cls=False)``, the image passed as the RGB array, as there) on paddleocr 2.x and uses
``predict`` on 3.x. opd-bench never downloads: give the detection and recognition model folders
(PaddleOCR's inference models) as ``engine_options={"det_model_dir": ..., "rec_model_dir": ...}``.
"""

from __future__ import annotations

from typing import Any, Sequence

from opd_bench.weights import MissingPackageError, resolve_weights


def build(det_model_dir: str | None = None, rec_model_dir: str | None = None, lang: str = "en",
          use_gpu: bool = False, **options: Any):
    try:
        import paddleocr
        from paddleocr import PaddleOCR
    except ImportError:
        raise MissingPackageError("the paddleocr OCR engine needs `pip install paddleocr paddlepaddle` "
                           "(or paddlepaddle-gpu); or use engine='rapidocr'") from None
    det = str(resolve_weights(det_model_dir, what="PaddleOCR text detection model", option="engine_options['det_model_dir']"))
    rec = str(resolve_weights(rec_model_dir, what="PaddleOCR text recognition model", option="engine_options['rec_model_dir']"))
    if int(paddleocr.__version__.split(".")[0]) < 3:
        engine = PaddleOCR(use_angle_cls=False, lang=lang, use_gpu=use_gpu, show_log=False,
                           det_model_dir=det, rec_model_dir=rec, **options)

        def read(image) -> list[str]:
            lines = engine.ocr(image, cls=False)[0] or []
            return [text for _, (text, _score) in lines]
    else:  # 3.x: new pipeline API, document preprocessing off as in 2.x
        engine = PaddleOCR(lang=lang, use_doc_orientation_classify=False, use_doc_unwarping=False,
                           use_textline_orientation=False, text_detection_model_dir=det,
                           text_recognition_model_dir=rec, **options)

        def read(image) -> list[str]:
            return list(engine.predict(image)[0]["rec_texts"])

    def predict(images: Sequence[Any]) -> list[str]:
        return [" ".join(read(image)) for image in images]

    return predict
