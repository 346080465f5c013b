"""ImageReward from a tiny random checkpoint in the published format (ImageReward.pt + med_config.json).

The reference computation uses independent implementations of the same math: torchvision's
transforms (the package's preprocessing), transformers' BERT tokenizer with BLIP's added tokens,
timm's VisionTransformer (BLIP's ViT is timm's layout), transformers' BlipTextModel (BLIP's
"med" BERT with cross-attention), plain matmuls for the head and the package's constants.
"""

import json

import pytest
import torch

from opd_bench import rewards
from opd_bench.weights import MissingWeightsError

VISION = {"width": 128, "depth": 2, "patch": 16, "grid": 2}  # 32 px images, 2 heads of 64
TEXT = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
        "max_position_embeddings": 40}
MLP = [(0, 32, 16), (2, 16, 8), (4, 8, 4), (6, 4, 2), (7, 2, 1)]  # (Sequential index, in, out), as the package's
WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "mat", "big", "small", "##s", ".", ","]


def _published_state_dict(vocab_size: int) -> dict[str, torch.Tensor]:
    """Random weights under the key names of the package's ImageReward model (written out here,
    not taken from our implementation), plus the unused keys a real checkpoint carries."""
    g = torch.Generator().manual_seed(0)
    w, h, v = VISION["width"], TEXT["hidden_size"], "blip.visual_encoder."
    shapes = {v + "cls_token": (1, 1, w), v + "pos_embed": (1, VISION["grid"] ** 2 + 1, w),
              v + "patch_embed.proj.weight": (w, 3, 16, 16), v + "patch_embed.proj.bias": (w,),
              v + "norm.weight": (w,), v + "norm.bias": (w,)}
    for i in range(VISION["depth"]):
        b = f"{v}blocks.{i}."
        shapes.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                       b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                       b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (4 * w, w),
                       b + "mlp.fc1.bias": (4 * w,), b + "mlp.fc2.weight": (w, 4 * w), b + "mlp.fc2.bias": (w,)})
    t = "blip.text_encoder."
    shapes.update({t + "embeddings.word_embeddings.weight": (vocab_size, h),
                   t + "embeddings.position_embeddings.weight": (TEXT["max_position_embeddings"], h),
                   t + "embeddings.LayerNorm.weight": (h,), t + "embeddings.LayerNorm.bias": (h,)})
    for i in range(TEXT["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, kv in (("attention", h), ("crossattention", w)):
            for name, fan_in in (("query", h), ("key", kv), ("value", kv)):
                shapes[f"{b}{part}.self.{name}.weight"], shapes[f"{b}{part}.self.{name}.bias"] = (h, fan_in), (h,)
            shapes.update({f"{b}{part}.output.dense.weight": (h, h), f"{b}{part}.output.dense.bias": (h,),
                           f"{b}{part}.output.LayerNorm.weight": (h,), f"{b}{part}.output.LayerNorm.bias": (h,)})
        shapes.update({b + "intermediate.dense.weight": (64, h), b + "intermediate.dense.bias": (64,),
                       b + "output.dense.weight": (h, 64), b + "output.dense.bias": (h,),
                       b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,)})
    for index, fan_in, fan_out in MLP:
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = (fan_out, fan_in), (fan_out,)
    shapes.update({"blip.vision_proj.weight": (8, w), "blip.vision_proj.bias": (8,),
                   "blip.text_proj.weight": (8, h), "blip.text_proj.bias": (8,)})
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=g) * (0.3 if key.startswith("mlp.") else 0.1)
        state[key] = value + 1 if "norm" in key.lower() and key.endswith("weight") else value
    state[t + "embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    tokenizer = root / "bert"
    tokenizer.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (tokenizer / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = root / "model"
    model.mkdir()
    med = {**TEXT, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "vocab_size": len(vocab) + 2,  # + [DEC], [ENC]
           "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 768, "model_type": "bert"}
    (model / "med_config.json").write_text(json.dumps(med))
    torch.save(_published_state_dict(med["vocab_size"]), model / "ImageReward.pt")
    return {"model": model, "tokenizer": tokenizer, "med": med}


@pytest.fixture(scope="module")
def reward(files):
    return rewards.get("imagereward", model_path=str(files["model"]), tokenizer_path=str(files["tokenizer"]))


PROMPTS = ["a red cat on the mat", "Blue dogs, big.", "a small zebra"]


def _images(n=3, h=40, w=48, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_scores_shape_dtype_and_finite(reward):
    out = reward(_images(), PROMPTS, [{}] * 3)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    assert len(set(out.scores.tolist())) == 3  # prompts and images matter
    assert len(out.details["raw"]) == 3


def _reference_scores(files, images, prompts):
    """The package's formula, computed with independent modules on the same weights."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    state = torch.load(files["model"] / "ImageReward.pt", weights_only=True)
    size = VISION["grid"] * VISION["patch"]
    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = torch.stack([transform(Image.fromarray(a)) for a in uint8])

    tokenizer = BertTokenizer.from_pretrained(str(files["tokenizer"]))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")

    vision = {k[len("blip.visual_encoder."):]: t for k, t in state.items() if k.startswith("blip.visual_encoder.")}
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=size, patch_size=VISION["patch"], embed_dim=VISION["width"], depth=VISION["depth"],
        num_heads=VISION["width"] // 64, qkv_bias=True, num_classes=0, global_pool="")
    vit.load_state_dict(vision, strict=True)
    med = files["med"]
    config = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                            encoder_hidden_size=VISION["width"], intermediate_size=med["intermediate_size"],
                            num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                            max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=1e-12,
                            bos_token_id=None, sep_token_id=None)
    bert = BlipTextModel(config, add_pooling_layer=False)
    text = {k[len("blip.text_encoder."):]: t for k, t in state.items()
            if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    missing, unexpected = bert.load_state_dict(text, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected

    with torch.no_grad():
        image_embeds = vit.eval().forward_features(pixels)
        hidden = bert.eval()(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             encoder_hidden_states=image_embeds, is_decoder=False).last_hidden_state
        x = hidden[:, 0]
        for index, _, _ in MLP:  # Linear layers only: the package's head has no activations
            x = x @ state[f"mlp.layers.{index}.weight"].T + state[f"mlp.layers.{index}.bias"]
    return (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.mark.parametrize("shape", [(40, 48), (32, 32), (20, 27)])  # down-, no-, up-scaling; crops both ways
def test_matches_reference_formula(files, reward, shape):
    images = _images(h=shape[0], w=shape[1], seed=sum(shape))
    expected = _reference_scores(files, images, PROMPTS)
    got = reward(images, PROMPTS, [{}] * 3).scores
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batch_size_and_truncation(files, reward):
    single = rewards.get("imagereward", model_path=str(files["model"] / "ImageReward.pt"),
                         tokenizer_path=str(files["tokenizer"]), batch_size=1)
    images = _images()
    torch.testing.assert_close(single(images, PROMPTS, [{}] * 3).scores, reward(images, PROMPTS, [{}] * 3).scores)
    # Only the first 35 tokens ([CLS] + 33 words + [SEP]) count: a different tail changes nothing.
    base = " ".join(["cat"] * 40)
    twice = images[:1].repeat(2, 1, 1, 1)
    ids, mask = reward.tokenize([base + " dog dog", base + " mat mat"])
    assert ids.shape == (2, 35) and torch.equal(ids[0], ids[1]) and mask.all()
    long = reward(twice, [base + " dog dog", base + " mat mat"], [{}, {}]).scores
    torch.testing.assert_close(long[0], long[1])  # rows of one batch may differ in the last bits
    short = reward(twice, ["cat dog", "cat mat"], [{}, {}]).scores
    assert abs(short[0] - short[1]) > 1e-3


def test_missing_files_name_what_is_missing(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
        rewards.get("imagereward", model_path=str(empty), tokenizer_path=str(files["tokenizer"]))
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "med_config.json").write_text(json.dumps(files["med"]))
    with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
        rewards.get("imagereward", model_path=str(only_config), tokenizer_path=str(files["tokenizer"]))
    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    (only_weights / "ImageReward.pt").symlink_to(files["model"] / "ImageReward.pt")
    with pytest.raises(MissingWeightsError, match="med_config.json"):
        rewards.get("imagereward", model_path=str(only_weights), tokenizer_path=str(files["tokenizer"]))
    with pytest.raises(MissingWeightsError, match="med_config.json"):
        rewards.get("imagereward", model_path=str(only_weights / "ImageReward.pt"), tokenizer_path=str(files["tokenizer"]))
    with pytest.raises(MissingWeightsError, match="THUDM/ImageReward"):
        rewards.get("imagereward")
    with pytest.raises(MissingWeightsError, match="tokenizer"):
        rewards.get("imagereward", model_path=str(files["model"]), tokenizer_path=str(tmp_path / "no-tokenizer"))


def test_incomplete_checkpoint_is_a_one_line_error(files, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "med_config.json").write_text(json.dumps(files["med"]))
    state = torch.load(files["model"] / "ImageReward.pt", weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, folder / "ImageReward.pt")
    with pytest.raises(ValueError, match="lacks 1 weights") as error:
        rewards.get("imagereward", model_path=str(folder), tokenizer_path=str(files["tokenizer"]))
    assert "\n" not in str(error.value)
    # A med_config.json with fewer layers than the checkpoint must not silently drop the rest.
    (folder / "med_config.json").write_text(json.dumps({**files["med"], "num_hidden_layers": 1}))
    (folder / "ImageReward.pt").unlink()
    (folder / "ImageReward.pt").symlink_to(files["model"] / "ImageReward.pt")
    with pytest.raises(ValueError, match="leave no place"):
        rewards.get("imagereward", model_path=str(folder), tokenizer_path=str(files["tokenizer"]))


def test_bfloat16_is_close_to_float32(files, reward):
    half = rewards.get("imagereward", model_path=str(files["model"]), tokenizer_path=str(files["tokenizer"]),
                       dtype="bfloat16")
    images = _images()
    low, full = half(images, PROMPTS, [{}] * 3).scores, reward(images, PROMPTS, [{}] * 3).scores
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.1 * full.abs().max() + 0.05
