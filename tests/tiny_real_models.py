"""Tiny random-init stand-ins for the sd suite's reward weights, saved in the real weights' formats.

Shared by ``test_sd_suite.py``, ``test_real_rewards.py`` and ``test_sd_end_to_end.py``; built
offline in a second or two each:

- ``build_owlv2``: an OWLv2 detector + processor folder (64 px images), as
  ``google/owlv2-base-patch16-ensemble``;
- ``build_colour_clip``: an open_clip checkpoint for GenEval's colour classifier, usable by a
  registered architecture name or, in any process, as ``local-dir:<folder>``;
- ``build_pickscore``: a transformers ``CLIPModel`` folder and a ``CLIPProcessor`` folder, as
  ``yuvalkirstain/PickScore_v1`` and the LAION CLIP-H processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COLOUR_CLIP_NAME = "opd-test-tiny-colour-clip"
COLOUR_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_owlv2(folder: Path, image_size: int = 64) -> Path:
    """An OWLv2 detector and its processor in ``folder/model``; returns that folder.

    The box head's last layer is zero, so boxes are OWLv2's grid prior (one box per patch)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from opd_bench.rewards.geneval_sd import COCO_CLASSES
    from opd_bench.tiny.tokenizer import DEFAULT_WORDS, write_tokenizer

    folder = Path(folder)
    words = list(DEFAULT_WORDS) + [w for name in COCO_CLASSES for w in name.split()]
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder / "tok", words, max_length=16)))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, **ids, **small),
        vision_config=dict(image_size=image_size, patch_size=16, **small), projection_dim=32,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    torch.nn.init.zeros_(model.box_head.dense2.weight)  # boxes = OWLv2's grid prior: 16 px boxes on the patches
    torch.nn.init.zeros_(model.box_head.dense2.bias)
    model.save_pretrained(folder / "model")
    size = {"height": image_size, "width": image_size}
    Owlv2Processor(Owlv2ImageProcessor(size=size), tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def build_colour_clip(folder: Path) -> tuple[str, Path]:
    """A tiny open_clip CLIP in ``folder``: ``open_clip_pytorch_model.bin`` plus, for
    ``local-dir:<folder>``, ``open_clip_config.json``. Registers the architecture as
    ``COLOUR_CLIP_NAME`` in this process; returns (that name, folder)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{COLOUR_CLIP_NAME}.json").write_text(json.dumps(COLOUR_CLIP_CFG))
    open_clip.add_model_config(folder / f"{COLOUR_CLIP_NAME}.json")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": COLOUR_CLIP_CFG}))
    torch.manual_seed(0)
    torch.save(open_clip.create_model(COLOUR_CLIP_NAME).state_dict(), folder / "open_clip_pytorch_model.bin")
    return COLOUR_CLIP_NAME, folder


def build_pickscore(root: Path, size: int = 32) -> tuple[Path, Path]:
    """A PickScore-format ``CLIPModel`` (``root/model``) and ``CLIPProcessor`` (``root/processor``)
    for ``size`` px images; returns (model folder, processor folder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from opd_bench.tiny.tokenizer import build_tokenizer

    root = Path(root)
    tokenizer = build_tokenizer(root / "tok", max_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "processor")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, **ids),
        vision_config=dict(image_size=size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(root / "model")
    return root / "model", root / "processor"
