"""PickScore, CLIPScore and HPSv2 rewards on tiny random-init models built offline.

Each model is saved in the real weights' format and loaded through ``rewards.get``, and its
scores are checked against a direct computation with the underlying model.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from opd_bench import rewards
from opd_bench.weights import MissingWeightsError
from tiny_real_models import build_pickscore

SIZE = 32  # the tiny models' image size; images of this size pass the resize unchanged
PROMPTS = ["a red circle", "two blue squares on the left", "a photo of a green star"]
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TINY_OPEN_CLIP = "opd-test-tiny-clip"


def _images(n=3, h=SIZE, w=SIZE, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _quantised(images):
    """What the rewards feed the preprocessing: 8-bit images, back in [0, 1]."""
    return (images.clamp(0, 1) * 255).round() / 255


# --------------------------------------------------------------------------------------------
# PickScore (transformers CLIPModel + CLIPProcessor)


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    return build_pickscore(tmp_path_factory.mktemp("pickscore"), size=SIZE)


def _pick_by_hand(model_dir, processor_dir, images, prompts):
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(str(processor_dir))
    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    pil = [_pil(im) for im in images]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    # the processor saw 8-bit images, rescaled and normalised them once (no double scaling)
    torch.testing.assert_close(pixels, (_quantised(images) - OPENAI_MEAN) / OPENAI_STD, atol=1e-4, rtol=0)
    text = processor(text=prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal()  # logit_scale.exp() * cos(image_i, text_i)


def _pil(image):
    """An independent 8-bit conversion (the hand computation does not reuse the reward's)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def test_registered():
    assert {"pickscore", "clipscore", "hpsv2"} <= set(rewards.names())


def test_pickscore_matches_the_model(pick_dirs):
    model_dir, processor_dir = pick_dirs
    reward = rewards.get("pickscore", model_path=str(model_dir), processor_path=str(processor_dir), batch_size=2)
    images = _images()
    out = reward(images, PROMPTS, [{}] * 3)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
    assert torch.isfinite(out.scores).all()
    torch.testing.assert_close(out.scores, _pick_by_hand(model_dir, processor_dir, images, PROMPTS),
                               atol=1e-4, rtol=1e-4)

    # pairing matters: swapping two prompts changes their scores, to the swapped pairs' values
    swapped = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    out_swapped = reward(images, swapped, [{}] * 3)
    torch.testing.assert_close(out_swapped.scores, _pick_by_hand(model_dir, processor_dir, images, swapped),
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out_swapped.scores[:2], out.scores[:2], atol=1e-4)

    scaled = rewards.get("pickscore", model_path=str(model_dir), processor_path=str(processor_dir), divide_by=26)
    torch.testing.assert_close(scaled(images, PROMPTS, [{}] * 3).scores, out.scores / 26)


def test_pickscore_scores_a_diverged_image_as_its_png(pick_dirs):
    """Its NaN pixels are black, as in a saved PNG (cast to 8 bits they were an arbitrary byte)."""
    from opd_bench.rewards.base import call_reward

    model_dir, processor_dir = pick_dirs
    reward = rewards.get("pickscore", model_path=str(model_dir), processor_path=str(processor_dir))
    images = _images()
    png = images.clone()
    images[1, 2, 3, 4], png[1, 2, 3, 4] = float("nan"), 0.0
    scores = call_reward(reward, "pickscore", images, PROMPTS, [{}] * 3).scores
    assert torch.isfinite(scores).all() and torch.equal(scores, call_reward(reward, "pickscore", png, PROMPTS, [{}] * 3).scores)
    with pytest.raises(ValueError, match="floats in"):
        reward((images.nan_to_num() * 255).to(torch.uint8), PROMPTS, [{}] * 3)


def _pick_copy(model_dir, tmp_path, edit):
    """A copy of the PickScore stand-in whose state dict went through ``edit``."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    state = load_file(str(copy / "model.safetensors"))
    edit(state)
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_pickscore_refuses_a_checkpoint_that_does_not_fill_the_model(pick_dirs, tmp_path):
    """transformers would fill the gaps with random weights and score noise."""
    from opd_bench.weights import CorruptWeightsError

    model_dir, processor_dir = pick_dirs

    def drop_projections(state):
        del state["text_projection.weight"], state["visual_projection.weight"]
        state["text_model.extra.weight"] = torch.zeros(2)

    copy = _pick_copy(model_dir, tmp_path / "missing", drop_projections)
    with pytest.raises(CorruptWeightsError, match=r"missing text_projection.weight, visual_projection.weight; "
                                                  r"unexpected text_model.extra.weight\)") as info:
        rewards.get("pickscore", model_path=str(copy), processor_path=str(processor_dir))
    assert "\n" not in str(info.value) and str(copy) in str(info.value)

    def shrink_projection(state):
        state["text_projection.weight"] = state["text_projection.weight"][:8]

    copy = _pick_copy(model_dir, tmp_path / "mismatched", shrink_projection)
    with pytest.raises(CorruptWeightsError,
                       match=r"mismatched \(checkpoint vs config\) text_projection.weight \[8, 32\] vs \[16, 32\]"):
        rewards.get("pickscore", model_path=str(copy), processor_path=str(processor_dir))


# --------------------------------------------------------------------------------------------
# open_clip models (CLIPScore, HPSv2)


TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    # open_clip's bundled BPE tokenizer has 49408 tokens; the context is short to stay tiny
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A tiny open_clip CLIP registered as an architecture, random-init, with its state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("open_clip_cfg")
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cosine_by_hand(model, images, prompts):
    import open_clip

    pixels = (_quantised(images) - OPENAI_MEAN) / OPENAI_STD
    tokens = open_clip.tokenize(prompts, context_length=16)
    with torch.no_grad():
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
    return (img * txt).sum(-1)


def test_clipscore_folder_and_file(open_clip_model, tmp_path):
    from safetensors.torch import save_file

    model, state = open_clip_model
    folder = tmp_path / "clip"  # open_clip's hub layout
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG}))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    images = _images(seed=1)
    cosine = _cosine_by_hand(model, images, PROMPTS)

    from_folder = rewards.get("clipscore", model_path=str(folder))
    from_file = rewards.get("clipscore", model_path=str(folder / "open_clip_model.safetensors"),
                            model_name=TINY_OPEN_CLIP, batch_size=2)
    for reward in (from_folder, from_file):
        out = reward(images, PROMPTS, [{}] * 3)
        assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
        assert torch.isfinite(out.scores).all()
        torch.testing.assert_close(torch.tensor(out.details["cosine"]), cosine, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.scores, 100 * cosine.clamp(min=0), atol=1e-3, rtol=1e-4)

    swapped = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    out_swapped = from_folder(images, swapped, [{}] * 3)
    torch.testing.assert_close(torch.tensor(out_swapped.details["cosine"]),
                               _cosine_by_hand(model, images, swapped), atol=1e-5, rtol=1e-4)
    assert abs(out_swapped.details["cosine"][0] - cosine[0].item()) > 1e-4


def test_hpsv2_checkpoint_formats(open_clip_model, tmp_path):
    model, state = open_clip_model
    (tmp_path / "hps").mkdir()
    torch.save({"state_dict": state}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")  # as released
    torch.save(state, tmp_path / "raw.pt")  # a bare state dict
    images = _images(seed=2)
    cosine = _cosine_by_hand(model, images, PROMPTS)

    for path in (tmp_path / "hps", tmp_path / "hps" / "HPS_v2.1_compressed.pt", tmp_path / "raw.pt"):
        reward = rewards.get("hpsv2", model_path=str(path), model_name=TINY_OPEN_CLIP)
        out = reward(images, PROMPTS, [{}] * 3)
        assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
        torch.testing.assert_close(out.scores, cosine, atol=1e-5, rtol=1e-4)

    swapped = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    torch.testing.assert_close(reward(images, swapped, [{}] * 3).scores,
                               _cosine_by_hand(model, images, swapped), atol=1e-5, rtol=1e-4)
    # any image size is resized to the model's (longest side, padded to a square)
    other = reward(_images(2, 40, 56), PROMPTS[:2], [{}, {}]).scores
    assert other.shape == (2,) and torch.isfinite(other).all()

    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt"):
        rewards.get("hpsv2", model_path=str(tmp_path / "hps"), version="v2.0", model_name=TINY_OPEN_CLIP)


# --------------------------------------------------------------------------------------------
# missing weights


def test_missing_weights_say_what_and_how(tmp_path, pick_dirs):
    _, processor_dir = pick_dirs
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingWeightsError, match="does not exist") as info:
        rewards.get("pickscore", model_path=str(missing), processor_path=str(processor_dir))
    assert str(missing) in str(info.value) and "hf download yuvalkirstain/PickScore_v1" in str(info.value)

    with pytest.raises(MissingWeightsError, match="hf download xswu/HPSv2"):
        rewards.get("hpsv2", model_path=str(missing))

    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(MissingWeightsError, match="missing open_clip_config.json"):
        rewards.get("clipscore", model_path=str(tmp_path / "empty"))

    with pytest.raises(MissingWeightsError, match="pass model_path="):
        rewards.get("clipscore")

    uncached = "opd-bench-tests/not-a-cached-model"
    for name in ("pickscore", "hpsv2", "clipscore"):
        with pytest.raises(MissingWeightsError, match="nor a hub id in the hub cache") as info:
            rewards.get(name, model_path=uncached)
        assert f"hf download {uncached}" in str(info.value)
    # a relative folder not made yet reads like a hub id: the message gives the fetch for both readings
    with pytest.raises(MissingWeightsError, match=r"'weights/hpsv2' is neither a folder here .* nor a hub id in the hub cache") as info:
        rewards.get("hpsv2", model_path="weights/hpsv2")
    assert "`hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir weights/hpsv2`" in str(info.value)
