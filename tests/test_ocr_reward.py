"""OCR reward: the metric, target parsing, and the RapidOCR engine on rendered text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opd_bench.rewards.ocr import (
    OCRReward,
    build_engine,
    levenshtein,
    ocr_score,
    target_text,
)

# ------------------------------------------------------------------ metric (no dependencies)


def test_levenshtein_hand_cases():
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("ab3", "ab3") == 0
    assert levenshtein("ab", "ba") == 2


def test_ocr_score_exact_substring_and_edits():
    assert ocr_score("ab3", "ab3") == 1.0
    assert ocr_score("xxab3yy", "ab3") == 1.0  # target inside the prediction: distance 0
    assert ocr_score("ab", "ab3") == pytest.approx(2 / 3)  # one deletion
    assert ocr_score("ax3", "ab3") == pytest.approx(2 / 3)  # one substitution
    assert ocr_score("k7", "k") == 1.0
    assert ocr_score("", "ab3") == 0.0  # nothing read
    assert ocr_score("zzzzzzzz", "ab") == 0.0  # distance capped at len(target)
    assert ocr_score("2O24", "2024") == pytest.approx(0.75)


def test_ocr_score_normalises_case_and_spaces():
    assert ocr_score("A B 3", "ab3") == 1.0
    assert ocr_score("ab3", "A B3") == 1.0
    assert ocr_score("Hello\nWorld", "hello world") == 1.0
    with pytest.raises(ValueError):
        ocr_score("abc", "  ")


def test_target_text_parsing():
    assert target_text('a sign that says "AB3"') == "ab3"
    assert target_text("a sign that says \u201cK 7\u201d") == "k7"
    assert target_text('"Open" and "Now" on a door') == "opennow"
    assert target_text('mixed \u201cab" quotes') == "ab"
    assert target_text("no quotes here") is None
    assert target_text('empty "" quotes') is None
    assert target_text('one unmatched " quote') is None
    assert target_text("") is None


def test_unknown_engine_lists_known_ones():
    with pytest.raises(ValueError, match="known engines: .*rapidocr"):
        OCRReward(engine="tesseract-9000")
    with pytest.raises(ValueError, match="known engines"):
        build_engine("nope")


def test_no_target_gives_nan_without_running_an_engine():
    reward = OCRReward()
    out = reward(torch.ones(2, 3, 64, 64), ["a red apple", 'a sign "  "'], [{}, {}])
    assert torch.isnan(out.scores).all()
    assert out.details["prediction"] == [None, None]
    assert reward._predict is None  # the engine was never built


# ------------------------------------------------------------------ engine on rendered text

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
WORDS = ["AB3", "K7", "Q", "2024", "X9", "HELP", "M", "Z5R"]


def render(text: str, background=(235, 235, 225), foreground=(20, 20, 20), size=64):
    """``text`` in large DejaVu Sans Bold, centred, as a [3, size, size] tensor in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    points = {1: 48, 2: 34, 3: 24}.get(len(text), 18) * size // 64
    font = ImageFont.truetype(str(FONT), points)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.text(xy, text, font=font, fill=foreground)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("rapidocr", reason="OCR engine tests need the rapidocr package")
    pytest.importorskip("onnxruntime", reason="OCR engine tests need onnxruntime")
    if not FONT.is_file():
        pytest.skip(f"rendering test text needs the font {FONT}")
    return OCRReward(engine="rapidocr", engine_options={"num_threads": 1})


@pytest.fixture(scope="module")
def batch():
    if not FONT.is_file():
        pytest.skip(f"rendering test text needs the font {FONT}")
    images = torch.stack([render(w) for w in WORDS])
    prompts = [f'a sign that says "{w}"' for w in WORDS]
    return images, prompts


def test_reward_reads_rendered_text(reward, batch):
    images, prompts = batch
    out = reward(images, prompts, [{}] * len(WORDS))
    assert out.scores.shape == (len(WORDS),) and out.scores.dtype == torch.float32
    assert out.scores.mean().item() >= 0.85, list(zip(WORDS, out.details["prediction"]))
    assert sum(s >= 0.9 for s in out.scores.tolist()) >= len(WORDS) - 1
    hits = [w.lower() in "".join(p.split()).lower() for w, p in zip(WORDS, out.details["prediction"])]
    assert sum(hits) >= len(WORDS) - 1, list(zip(WORDS, out.details["prediction"]))
    assert out.details["target"] == [w.lower() for w in WORDS]


def test_reward_on_a_coloured_sign_with_light_text(reward):
    image = render("K7", background=(30, 60, 160), foreground=(250, 250, 250))[None]
    out = reward(image, ['"K7"'], [{}])
    assert out.scores.item() == 1.0, out.details


def test_metadata_text_overrides_prompt(reward, batch):
    images, _ = batch
    out = reward(images[:2], ["no quotes", 'says "ZZZZ"'], [{"text": "AB3"}, {"text": "K7"}])
    assert out.details["target"] == ["ab3", "k7"]
    assert out.scores.tolist() == [1.0, 1.0], out.details


def test_blank_image_scores_zero(reward):
    blank = torch.full((2, 3, 64, 64), 0.9)
    blank[1] = 0.0
    out = reward(blank, ['"AB3"', '"Q"'], [{}, {}])
    assert out.scores.tolist() == [0.0, 0.0]
    assert out.details["prediction"] == ["", ""]


def test_mixed_batch_nan_only_where_no_target(reward, batch):
    images, prompts = batch
    out = reward(images[:3], [prompts[0], "a cat", prompts[2]], [{}, {}, {}])
    assert math.isnan(out.scores[1].item()) and out.details["prediction"][1] is None
    assert not math.isnan(out.scores[0].item()) and not math.isnan(out.scores[2].item())


def test_batched_equals_one_by_one_and_is_deterministic(reward, batch):
    images, prompts = batch
    together = reward(images, prompts, [{}] * len(WORDS))
    again = reward(images, prompts, [{}] * len(WORDS))
    alone = [reward(images[i : i + 1], prompts[i : i + 1], [{}]) for i in range(len(WORDS))]
    assert torch.equal(together.scores, again.scores)
    assert together.details["prediction"] == again.details["prediction"]
    assert torch.equal(together.scores, torch.cat([o.scores for o in alone]))
    assert together.details["prediction"] == [o.details["prediction"][0] for o in alone]


def test_a_diverged_image_is_read_as_its_png(reward, batch):
    """Its NaN pixels are black, as in a saved PNG; it is scored, not left out as 'does not apply'
    (which would leave it out of an evaluation's mean)."""
    from opd_bench.rewards.base import call_reward

    images, prompts = batch
    images = images[:2].clone()
    png = images.clone()
    images[0, :, 10:20, 10:20], png[0, :, 10:20, 10:20] = float("nan"), 0.0
    out = call_reward(reward, "ocr", images, prompts[:2], [{}, {}])
    assert torch.equal(out.scores, call_reward(reward, "ocr", png, prompts[:2], [{}, {}]).scores), out


def test_preprocessing_rounds_after_upscaling():
    """Pins the versioned scoring (docs/ocr.md): the float image is upscaled, then rounded, so it
    can differ from its saved PNG's preprocessing. Changing this changes committed OCR scores."""
    from opd_bench.rewards.ocr import prepare_images

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    png = (image * 255).round() / 255
    from_float, from_png = prepare_images(image)[0], prepare_images(png)[0]
    assert from_float.shape == (16 * 3 + 48, 16 * 3 + 48, 3)
    differ = (from_float != from_png).mean()
    assert 0 < differ < 0.5 and abs(from_float.astype(int) - from_png.astype(int)).max() <= 1
