"""ImageReward (Xu et al., 2023) loaded from its published checkpoint, without the ``image-reward`` package.

The package pins old transformers internals (``transformers.file_utils``, helpers in
``modeling_utils``) and does not import beside transformers 5, so the network is written here
in plain torch, with module names equal to the checkpoint's keys so ``ImageReward.pt`` loads
as-is. The score, as the package's ``ImageReward.score`` computes it::

    pixels  = image -> uint8 -> PIL bicubic resize (short side 224) -> center crop 224
              -> [0, 1] -> (x - CLIP mean) / CLIP std
    tokens  = bert-base-uncased tokenizer (+ "[DEC]", "[ENC]" added as BLIP does),
              padding="max_length", truncation, max_length=35; the first token stays [CLS]
              (ImageReward.score does not swap in BLIP's [ENC] token)
    feats   = BLIP ViT(pixels)                                  # [B, 1 + patches, 1024]
    hidden  = med BERT(tokens, cross-attention to feats, every layer)
    raw     = MLP(hidden[:, 0])    # Linear 768-1024-128-64-16-1, no activations
    score   = (raw - 0.16717362830052426) / 1.0333394966054072

See ``docs/image_reward.md`` (equality against the package, usage).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from opd_bench.rewards.base import RewardOutput, check_batch, to_uint8
from opd_bench.weights import MissingWeightsError, resolve_weights

HUB_ID = "THUDM/ImageReward"
TOKENIZER_HUB_ID = "google-bert/bert-base-uncased"  # the hub's current id of "bert-base-uncased"
CHECKPOINT_NAME = "ImageReward.pt"
CONFIG_NAME = "med_config.json"
MAX_LENGTH = 35
# The package's constants: the raw reward's mean and std on its training data.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_HEAD_DIM = 64  # not stored in the state dict; BLIP's ViT-B (12 heads) and ViT-L (16) both use 64
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


# --------------------------------------------------------------------------------------------
# BLIP's vision transformer (timm layout: pre-norm blocks, fused qkv, LayerNorm eps 1e-6)


class _VitBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, hidden)
        self.mlp.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Explicit softmax attention in the reference's operation order, so scores match it bit for bit.
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, patch: int, image_size: int, hidden: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(_VitBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# BLIP's "med" text encoder: BERT (post-norm, no token-type embeddings) with cross-attention to
# the image tokens in every layer


def _dense_norm(width_in: int, width: int, eps: float) -> nn.Module:
    out = nn.Module()
    out.dense = nn.Linear(width_in, width)
    out.LayerNorm = nn.LayerNorm(width, eps=eps)
    return out


class _BertAttention(nn.Module):
    def __init__(self, width: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(width, width)
        self.self.key = nn.Linear(kv_width, width)
        self.self.value = nn.Linear(kv_width, width)
        self.output = _dense_norm(width, width, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
        return self.output.LayerNorm(self.output.dense(out) + x)


class _BertLayer(nn.Module):
    def __init__(self, cfg: dict, kv_width: int):
        super().__init__()
        width, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.attention = _BertAttention(width, width, heads, eps)
        self.crossattention = _BertAttention(width, kv_width, heads, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, cfg["intermediate_size"])
        self.output = _dense_norm(cfg["intermediate_size"], width, eps)
        self.act = _ACTIVATIONS[cfg["hidden_act"]]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended to: no mask
        return self.output.LayerNorm(self.output.dense(self.act(self.intermediate.dense(x))) + x)


class TextEncoder(nn.Module):
    def __init__(self, cfg: dict, kv_width: int):
        super().__init__()
        width, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg["vocab_size"], width)
        self.embeddings.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], width)
        self.embeddings.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(cfg, kv_width) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions))
        # BERT's additive padding mask, with the reference's constant (-10000, not -inf).
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


# --------------------------------------------------------------------------------------------
# the whole model; attribute names mirror the checkpoint keys (blip.visual_encoder.*, ...)


class ImageRewardModel(nn.Module):
    def __init__(self, vision: dict, text: dict, mlp_shapes: dict[int, tuple[int, int]]):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(**vision)
        self.blip.text_encoder = TextEncoder(text, kv_width=vision["width"])
        # The package's MLP is a Sequential with Dropout at the odd slots; Identity keeps the indices.
        layers = [nn.Identity() for _ in range(max(mlp_shapes) + 1)]
        for index, (fan_in, fan_out) in mlp_shapes.items():
            layers[index] = nn.Linear(fan_in, fan_out)
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(*layers)

    def raw_reward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MLP output before normalisation, float32 ``[B]``."""
        image = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(ids, attention_mask, image)
        # The package casts the [CLS] feature to float32 before the head; the head stays float32.
        return self.mlp.layers(hidden[:, 0].float()).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], med_config: dict) -> "ImageRewardModel":
        vision = _vision_config(state)
        text = _text_config(med_config)
        mlp = {int(m.group(1)): tuple(state[key].shape[::-1])
               for key in state if (m := re.fullmatch(r"mlp\.layers\.(\d+)\.weight", key))}
        if not mlp:
            raise ValueError("ImageReward checkpoint has no mlp.layers.*.weight keys (not an ImageReward.pt state dict?)")
        with torch.device("meta"):  # no random init of ~450M parameters that are overwritten anyway
            model = cls(vision, text, mlp)
        wanted = model.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"ImageReward checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        # Weights of the scoring networks that the model has no place for (e.g. more text layers
        # than med_config.json says) would be silently dropped: refuse them.
        ours = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
        extra = [k for k in state if k.startswith(ours) and k not in wanted and not k.endswith("position_ids")]
        if extra:
            raise ValueError(f"ImageReward checkpoint has {len(extra)} weights that {CONFIG_NAME} and the "
                             f"state dict's shapes leave no place for, e.g. {extra[:3]}")
        try:  # extra keys (blip.vision_proj, blip.text_proj, position_ids) are unused by the score
            model.load_state_dict({k: state[k] for k in wanted}, strict=True, assign=True)
        except RuntimeError as error:
            first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
            raise ValueError(f"ImageReward checkpoint does not match {CONFIG_NAME}: {first.strip()}") from None
        return model.eval()


def _vision_config(state: dict[str, torch.Tensor]) -> dict:
    prefix = "blip.visual_encoder."
    try:
        width = state[prefix + "cls_token"].shape[-1]
        patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
        positions = state[prefix + "pos_embed"].shape[1]
        hidden = state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"ImageReward checkpoint lacks {error.args[0]} (not an ImageReward.pt state dict?)") from None
    depth = len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))})
    grid = math.isqrt(positions - 1)
    return {"width": width, "depth": depth, "heads": max(1, width // VIT_HEAD_DIM), "patch": patch,
            "image_size": grid * patch, "hidden": hidden}


def _text_config(med: dict) -> dict:
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
            "max_position_embeddings")
    missing = [k for k in keys if k not in med]
    if missing:
        raise ValueError(f"{CONFIG_NAME} lacks {', '.join(missing)}")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{CONFIG_NAME}: only position_embedding_type 'absolute' is supported")
    act = med.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{CONFIG_NAME}: hidden_act {act!r} is not supported (known: {', '.join(_ACTIVATIONS)})")
    return {**{k: int(med[k]) for k in keys}, "layer_norm_eps": float(med.get("layer_norm_eps", 1e-12)),
            "hidden_act": act}


# --------------------------------------------------------------------------------------------
# preprocessing and tokenizer, as the package's


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, size, size]`` float32.

    The package scores PIL images: torchvision ``Resize(size, BICUBIC)`` (short side to
    ``size``, long side ``int(size * long / short)``; PIL's bicubic), ``CenterCrop(size)``,
    ``ToTensor``, CLIP ``Normalize``. Images are quantised to uint8 first, as a generated image
    becomes a PNG/PIL image, so scores equal the package's on the saved images."""
    out = []
    for array in to_uint8(images):
        image = Image.fromarray(array)
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_w, new_h = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        if (new_w, new_h) != (w, h):  # torchvision returns the image untouched when the size matches
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
    pixels = torch.stack(out).float() / 255
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (pixels - mean) / std


def load_tokenizer(path: str | Path) -> Any:
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path))
    # BLIP's init_tokenizer adds these two; a prompt that spells "[ENC]" must tokenise as the package's.
    tokenizer.add_tokens(["[DEC]"], special_tokens=True)
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


def _resolve_tokenizer(tokenizer_path: str | Path | None) -> Path:
    if tokenizer_path is not None:
        return resolve_weights(tokenizer_path, what="ImageReward's BERT tokenizer", expected=["vocab.txt|tokenizer.json"],
                               hub_id=TOKENIZER_HUB_ID, option="tokenizer_path")
    try:
        return resolve_weights(TOKENIZER_HUB_ID, what="ImageReward's BERT tokenizer",
                               expected=["vocab.txt|tokenizer.json"], option="tokenizer_path")
    except MissingWeightsError as error:
        try:  # an older download, cached under the legacy id "bert-base-uncased"
            from huggingface_hub import snapshot_download

            return Path(snapshot_download("bert-base-uncased", local_files_only=True))
        except Exception:
            raise error from None


def _resolve_model(model_path: str | Path | None) -> tuple[Path, Path]:
    path = resolve_weights(model_path, what="ImageReward", expected=[CHECKPOINT_NAME, CONFIG_NAME], hub_id=HUB_ID)
    if path.is_dir():
        return path / CHECKPOINT_NAME, path / CONFIG_NAME
    config = path.parent / CONFIG_NAME
    if not config.exists():
        raise MissingWeightsError(f"ImageReward: {CONFIG_NAME} not found beside {str(path)!r} "
                                  f"(fetch it with `hf download {HUB_ID} {CONFIG_NAME}`)")
    return path, config


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:  # mmap: the 1.7 GB checkpoint is not copied into memory twice
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a state dict (got {type(state).__name__})")
    return state


# --------------------------------------------------------------------------------------------
# the reward


class ImageReward:
    """ImageReward score of each (image, prompt); the package's ``ImageReward.score``.

    ``model_path``: a folder with ``ImageReward.pt`` and ``med_config.json`` (``hf download
    THUDM/ImageReward``), the ``.pt`` file with ``med_config.json`` beside it, or a cached hub
    id. ``tokenizer_path``: a bert-base-uncased tokenizer folder (default: the cached hub id).
    ``dtype``: the networks' dtype (the head always runs in float32, as in the package).
    """

    def __init__(self, model_path: str | Path | None = None, tokenizer_path: str | Path | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 16):
        (checkpoint, config), tokenizer = self.locate_weights(model_path, tokenizer_path)
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = ImageRewardModel.from_state_dict(_load_state(checkpoint), json.loads(config.read_text()))
        if len(self.tokenizer) > self.model.blip.text_encoder.embeddings.word_embeddings.num_embeddings:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but {CONFIG_NAME} vocab_size is smaller")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.model.blip.to(self.device, self.dtype)
        self.model.mlp.to(self.device, torch.float32)
        self.batch_size = int(batch_size)
        self.image_size = self.model.blip.visual_encoder.image_size

    @staticmethod
    def locate_weights(model_path: str | Path | None = None, tokenizer_path: str | Path | None = None,
                       **_: Any) -> tuple[tuple[Path, Path], Path]:
        """(checkpoint file, med_config.json) and the tokenizer folder."""
        return _resolve_model(model_path), _resolve_tokenizer(tokenizer_path)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        check_batch(images, prompts, metadata)
        raw = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = slice(start, start + self.batch_size)
            pixels = preprocess(images[chunk], self.image_size).to(self.device, self.dtype)
            ids, mask = self.tokenize(prompts[chunk])
            raw.append(self.model.raw_reward(pixels, ids.to(self.device), mask.to(self.device)).cpu())
        raw = torch.cat(raw) if raw else torch.zeros(0)
        return RewardOutput((raw - REWARD_MEAN) / REWARD_STD, {"raw": raw.tolist()})
