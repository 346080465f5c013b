"""Vocabulary of the embedded "tiny" world: shapes, colours, sizes, backgrounds and the font.

Everything the renderer, the prompt generators and the detector must agree on lives here, so
that a change of vocabulary is one edit (and a new ``PROMPTS_VERSION``).
"""

from __future__ import annotations

import glob
import os
from functools import lru_cache

#: Version of the generated prompt set; bump it whenever the vocabulary or generators change.
PROMPTS_VERSION = "tiny-v3"

#: Images of the tiny world are square RGB images of this side, in pixels.
IMAGE_SIZE = 64

#: Shape classes (the GenEval "class" field). All are drawn upright, axis-aligned.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "heart")

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
    "heart": "hearts",
}

#: GenEval's ten colour names (in GenEval's order) and the RGB used to draw them. The
#: renderer jitters each channel by at most ``COLOR_JITTER``; the detector classifies colours
#: by the nearest of these in CIE Lab.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (35, 155, 60),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (250, 145, 200),
    "brown": (125, 70, 30),
    "black": (20, 20, 20),
    "white": (248, 248, 248),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COLOR_JITTER = 8

#: Object sizes: the side of the (square) box the shape is inscribed in, in pixels.
OBJECT_SIZE_MIN = 18
OBJECT_SIZE_MAX = 32
SIZES: dict[str, tuple[int, int]] = {"small": (18, 21), "medium": (22, 26), "large": (27, 32)}
#: Minimum free pixels between the boxes of two objects (so blur does not merge them).
OBJECT_GAP = 3

#: Backgrounds are neutral greys (R = G = B up to noise) of a mid tone, far from every object
#: colour: with jitter, every object colour is >= 86 away in RGB distance from any background
#: tone (pink 86, purple 90, the others > 115; white 135, black 191).
BACKGROUND_TONE = (138, 162)
BACKGROUNDS: tuple[str, ...] = ("plain", "textured", "gradient", "striped", "dotted")
#: Largest deviation of any background pixel from the image's median background colour.
BACKGROUND_MAX_DEVIATION = 14

#: GenEval counting prompts use counts 2 to 4.
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)

#: OCR texts: 1 to 4 characters of this alphabet.
TEXT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
TEXT_MIN_LEN = 1
TEXT_MAX_LEN = 4
#: Surfaces text is written on (the OCR prompt names one).
TEXT_SURFACES: tuple[str, ...] = ("sign", "poster", "label", "board", "plain")

FONT_NAME = "DejaVuSansMono-Bold.ttf"
#: Every text is drawn at this size (px): 4 characters are 49 px wide.
TEXT_SIZE = 20


@lru_cache(maxsize=1)
def font_path() -> str:
    """Path of DejaVu Sans Mono Bold (the one TrueType font the world uses)."""
    env = os.environ.get("OPD_TINY_FONT")
    if env and os.path.exists(env):
        return env
    candidates = [
        "/usr/share/fonts/truetype/dejavu/" + FONT_NAME,
        "/usr/share/fonts/dejavu/" + FONT_NAME,
        "/usr/share/fonts/TTF/" + FONT_NAME,
        "/Library/Fonts/" + FONT_NAME,
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts")):
        hits = sorted(glob.glob(os.path.join(root, "**", FONT_NAME), recursive=True))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"{FONT_NAME} not found; install fonts-dejavu-core or set OPD_TINY_FONT to its path"
    )


def article(word: str) -> str:
    """English indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
