""""Web-like" captions for pretraining the tiny base model.

Real pretraining captions are noisy: they often leave out attributes and are sometimes wrong
about counts, positions or the text in the image. The base model learns from such captions, so
it comes out imperfect in the ways real text-to-image models are, leaving room for RL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from opd_bench.world import spec

_COLOURS = "|".join(spec.COLOR_NAMES)
_COUNT_WORDS = [spec.COUNT_WORDS[n] for n in sorted(spec.COUNT_WORDS) if n >= 2]
# each relation and the one that says the opposite (also the probes' minimal edit of a position prompt)
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_GENERIC = {
    "geneval": ["a photo", "a photo of some shapes", "an image"],
    "ocr": ["a sign", "a photo of a sign with text", "some letters"],
    "pref": ["a picture", "a picture of shapes", "an image of a scene"],
}


@dataclass(frozen=True)
class CaptionNoise:
    generic: float = 0.05  # the whole caption replaced by a generic one
    drop_colour: float = 0.3  # per caption: every colour word dropped
    drop_size: float = 0.4  # per caption: size words dropped
    drop_background: float = 0.4  # per caption: the background phrase dropped
    wrong_count: float = 0.15
    wrong_position: float = 0.15
    wrong_text: float = 0.15  # one character of the quoted text replaced
    drop_text: float = 0.05  # the quoted text left out


def family(record: dict) -> str:
    if "include" in record:
        return "geneval"
    if "text" in record:
        return "ocr"
    return "pref"


def web_caption(record: dict, rng: np.random.Generator, noise: CaptionNoise = CaptionNoise()) -> str:
    """A noisy caption of the image rendered for ``record`` (the prompt is the clean caption)."""
    kind = family(record)
    caption = record["prompt"]
    if rng.random() < noise.generic:
        return str(rng.choice(_GENERIC[kind]))
    if kind == "ocr":
        text = record["text"]
        if rng.random() < noise.drop_text:
            return re.sub(r'\s*(with the word|with the text|that says|reading|that reads|printed with)?\s*"[^"]*"', "", caption).strip()
        if rng.random() < noise.wrong_text:
            i = int(rng.integers(len(text)))
            replacement = str(rng.choice([c for c in spec.TEXT_ALPHABET if c != text[i]]))
            caption = caption.replace(f'"{text}"', f'"{text[:i]}{replacement}{text[i + 1:]}"')
        return caption
    if rng.random() < noise.drop_colour:
        caption = re.sub(rf"\b({_COLOURS}) ", "", caption)
    if rng.random() < noise.drop_size:
        caption = re.sub(r"\b(small|large|medium) ", "", caption)
    if rng.random() < noise.drop_background:
        caption = re.sub(r" (on|in front of) an? [a-z ]*(background|backdrop)$", "", caption)
    if rng.random() < noise.wrong_count:
        words = [w for w in _COUNT_WORDS if re.search(rf"\b{w}\b", caption)]
        if words:
            other = str(rng.choice([w for w in _COUNT_WORDS if w != words[0]]))
            caption = re.sub(rf"\b{words[0]}\b", other, caption, count=1)
    if rng.random() < noise.wrong_position:
        for relation, swapped in OPPOSITE_RELATION.items():
            if f" {relation} " in caption:
                caption = caption.replace(f" {relation} ", f" {swapped} ", 1)
                break
    return re.sub(r"\s+", " ", caption).strip()


def vocabulary(records) -> list[str]:
    """Words of the prompts (quoted texts excluded), for the tokenizer's whole-word tokens."""
    words: dict[str, None] = {}
    for record in records:
        text = re.sub(r'"[^"]*"', " ", record["prompt"].lower())
        for word in re.findall(r"[a-z]+", text):
            words[word] = None
    for generic in _GENERIC.values():
        for caption in generic:
            words.update(dict.fromkeys(re.findall(r"[a-z]+", caption)))
    return sorted(words)
