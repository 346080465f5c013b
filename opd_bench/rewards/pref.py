"""Preference rewards of the tiny world: a learned PickScore-style model and the hidden oracle.

* :class:`TinyPrefReward` - a small CLIP-style two-tower model (open_clip ``CLIP`` with a tiny
  ViT image tower and a tiny text transformer over a word-level vocabulary of the world),
  trained on noisy pairwise preferences (Bradley-Terry) by :mod:`opd_bench.world.pref_train`.
  score = logit_scale.exp() * cos(text embedding, image embedding), as PickScore. It scores any
  prompt (unknown words map to ``<unk>``). Shipped weights: ``suites/tiny/weights/pref/``.
* :class:`TinyPrefOracleReward` - the hidden taste (:func:`opd_bench.world.taste.taste`) in
  [0, 1]; for evaluation only (to make reward hacking of the learned model visible); NaN for
  records without ``"objects"`` (not pref records).

See ``docs/tiny_pref.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from opd_bench.rewards.base import RewardOutput, check_batch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "suites" / "tiny" / "weights" / "pref"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")
PAD_ID, UNK_ID, SOT_ID, EOT_ID = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# vocabulary and tokenizer (word level)


def default_vocab() -> list[str]:
    """Special tokens + every word of the tiny world's prompts (pref, geneval, ocr) and of
    typical captions (the handmade tokenizer's word list), sorted."""
    from opd_bench.tiny.tokenizer import DEFAULT_WORDS
    from opd_bench.world import spec
    from opd_bench.world.prompts import BACKGROUND_PHRASES, PREF_TEMPLATES

    words = set(DEFAULT_WORDS)
    words.update(spec.SHAPES, spec.PLURALS.values(), spec.COLOR_NAMES, spec.SIZES,
                 spec.BACKGROUNDS, spec.COUNT_WORDS.values(), spec.TEXT_SURFACES)
    for phrase in list(BACKGROUND_PHRASES.values()) + list(PREF_TEMPLATES) + list(spec.RELATIONS):
        words.update(re.findall(r"[a-z]+", phrase.lower()))
    words.update(["medium", "says", "written", "backdrop", "soft", "gradient", "front", "of",
                  "label", "poster", "board", "quoted"])
    return list(SPECIALS) + sorted(w for w in words if w not in SPECIALS)


class WordTokenizer:
    """Lower-cased words (``[a-z0-9]+``) -> ids; ``<sot>`` words ``<eot>`` then ``<pad>``."""

    def __init__(self, vocab: Sequence[str], context_length: int = 32):
        if list(vocab[:4]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, UNK_ID) for w in re.findall(r"[a-z0-9]+", str(text).lower())]
        ids = ids[: self.context_length - 2]
        return [SOT_ID] + ids + [EOT_ID]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# --------------------------------------------------------------------------------------------
# model


def default_config(vocab: Sequence[str] | None = None) -> dict:
    """Architecture of the tiny preference model (stored in ``config.json``)."""
    vocab = list(vocab) if vocab is not None else default_vocab()
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 3,
                       "head_width": 48, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": len(vocab), "width": 64, "heads": 2,
                     "layers": 2, "mlp_ratio": 2.0, "pad_id": PAD_ID, "eos_id": EOT_ID,
                     "pool_type": "eos"},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
        "vocab": vocab,
    }


class TinyPrefModel(torch.nn.Module):
    """open_clip ``CLIP`` two-tower model + tokenizer; ``score(images, prompts)`` -> [B]."""

    def __init__(self, config: dict):
        super().__init__()
        import open_clip

        self.config = dict(config)
        self.clip = open_clip.CLIP(
            embed_dim=config["embed_dim"],
            vision_cfg=dict(config["vision_cfg"]),
            text_cfg=dict(config["text_cfg"]),
        )
        self.tokenizer = WordTokenizer(config["vocab"], config["text_cfg"]["context_length"])
        self.image_size = int(config["vision_cfg"]["image_size"])
        self.register_buffer("mean", torch.tensor(config["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["image_std"]).view(1, 3, 1, 1), persistent=False)

    # -- encoders
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, D] of images in [0, 1]."""
        return F.normalize(self.clip.encode_image(self.preprocess(images)), dim=-1)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def score_embeddings(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        return self.scale() * (img_emb * txt_emb).sum(-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """PickScore-style score logit_scale.exp() * cos(text, image), shape [B]."""
        return self.score_embeddings(self.encode_images(images), self.encode_texts(prompts))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- files
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Each file written whole or not at all: a killed `pretrain pref --force` leaves the old model readable."""
        from safetensors.torch import save

        from opd_bench.io import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        cfg = dict(self.config)
        if extra:
            cfg["training"] = extra
        atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(cfg, indent=1) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path | None = None, device: str | torch.device = "cpu") -> "TinyPrefModel":
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else WEIGHTS_DIR
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.exists() or not w_path.exists():
            raise FileNotFoundError(
                f"no tiny preference model in {folder} (expected {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "train one with `opd-bench pretrain pref --out DIR`"
            )
        from opd_bench.weights import check_safetensors

        config = json.loads(cfg_path.read_text())
        model = cls(config)
        check_safetensors(w_path)  # a truncated file is named as such, not a bare safetensors error
        model.clip.load_state_dict(load_file(str(w_path)))
        return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# rewards


class TinyPrefReward:
    """Learned preference score (PickScore-like) of the tiny world; applies to every prompt.

    ``scores`` = logit_scale.exp() * cos(text, image) / ``divide_by`` (Flow-GRPO divides
    PickScore by 26; the default 1 keeps the raw score). details: ``logit`` (raw score),
    ``cosine``.
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 256, divide_by: float = 1.0):
        self.model = TinyPrefModel.load(model_path, device=device)
        self.device = device
        self.batch_size = int(batch_size)
        self.divide_by = float(divide_by)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        logits, cosines = [], []
        for i in range(0, images.shape[0], self.batch_size):
            img = images[i : i + self.batch_size].detach().to(self.device)
            ie = self.model.encode_images(img)
            te = self.model.encode_texts(list(prompts[i : i + self.batch_size]))
            cos = (ie * te).sum(-1)
            cosines.append(cos.cpu())
            logits.append((self.model.scale() * cos).cpu())
        logit = torch.cat(logits) if logits else torch.zeros(0)
        cosine = torch.cat(cosines) if cosines else torch.zeros(0)
        return RewardOutput(logit / self.divide_by,
                            {"logit": logit.tolist(), "cosine": cosine.tolist()})


class TinyPrefOracleReward:
    """The hidden taste oracle in [0, 1] (evaluation only); NaN off pref records.

    details: the oracle's terms (``fidelity``, ``composition``, ``contrast``, ``cleanliness``,
    ``aesthetic``; None off pref records)."""

    TERMS = ("fidelity", "composition", "contrast", "cleanliness", "aesthetic")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                 ) -> RewardOutput:
        check_batch(images, prompts, metadata)
        from opd_bench.world.taste import taste_terms

        imgs = images.detach().float().cpu().clamp(0, 1)
        scores: list[float] = []
        details: dict[str, list[Any]] = {k: [] for k in self.TERMS}
        for img, meta in zip(imgs, metadata):
            if not isinstance(meta, dict) or not meta.get("objects"):
                scores.append(float("nan"))
                for k in self.TERMS:
                    details[k].append(None)
                continue
            terms = taste_terms(img, meta)
            scores.append(terms["taste"])
            for k in self.TERMS:
                details[k].append(terms[k])
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), details)
