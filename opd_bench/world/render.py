"""Renderer of the tiny world: draws a *correct* 64x64 image for any prompt record.

``render(record, seed)`` dispatches on the record's family (``task`` field, or its keys):

* geneval records (an ``include`` list): every clause's objects with the asked count and colour,
  non-overlapping, clause positions satisfied with a margin;
* ocr records (a ``text`` field): the text in DejaVu Sans Mono Bold (one size, centred) on the named surface;
* pref records (an ``objects`` list): the described objects on the described background.

Same record + same seed -> the same image, byte for byte. Shapes are drawn with 4x
supersampling (anti-aliased edges); backgrounds are neutral greys, plain or lightly textured.
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opd_bench.world import spec

SUPERSAMPLE = 4
Box = tuple[float, float, float]  # (x0, y0, side): the square an object is inscribed in


# --------------------------------------------------------------------------------------------
# shapes


def _star_points(cx: float, cy: float, r_out: float, r_in: float, n: int = 5):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -np.pi / 2 + k * np.pi / n
        pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    return pts


@lru_cache(maxsize=None)
def _unit_outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Outline of ``shape`` fitted into the unit square [0, 1]^2 (centred on the short axis)."""
    if shape == "square":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":
        pts = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "diamond":
        pts = [(0.5, 0), (0.9, 0.5), (0.5, 1), (0.1, 0.5)]
    elif shape == "cross":
        a, b = 0.32, 0.68
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b),
               (0, a), (a, a)]
    elif shape == "star":
        pts = _star_points(0.0, 0.0, 1.0, 0.48)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = list(zip(x.tolist(), y.tolist()))
    elif shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = list(zip((0.5 + 0.5 * np.cos(t)).tolist(), (0.5 + 0.5 * np.sin(t)).tolist()))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(spec.SHAPES)}")
    arr = np.asarray(pts, dtype=np.float64)
    lo, hi = arr.min(0), arr.max(0)
    scale = (hi - lo).max()
    arr = (arr - lo) / scale
    arr += (1.0 - (hi - lo) / scale) / 2.0  # centre the short axis
    return tuple(map(tuple, arr.tolist()))


def shape_alpha(shape: str, box: Box, size: int = spec.IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage [size, size] in [0, 1] of ``shape`` inscribed in ``box``."""
    x0, y0, side = box
    ox, oy = int(np.floor(x0)) - 1, int(np.floor(y0)) - 1
    win = int(np.ceil(side)) + 3
    hi = Image.new("L", (win * SUPERSAMPLE, win * SUPERSAMPLE), 0)
    outline = np.asarray(_unit_outline(shape))
    pts = (outline * side + np.array([x0 - ox, y0 - oy])) * SUPERSAMPLE
    ImageDraw.Draw(hi).polygon([tuple(p) for p in pts.tolist()], fill=255)
    local = np.asarray(hi.resize((win, win), Image.BOX), dtype=np.float32) / 255.0
    alpha = np.zeros((size, size), dtype=np.float32)
    xs0, ys0 = max(ox, 0), max(oy, 0)
    xs1, ys1 = min(ox + win, size), min(oy + win, size)
    if xs1 > xs0 and ys1 > ys0:
        alpha[ys0:ys1, xs0:xs1] = local[ys0 - oy : ys1 - oy, xs0 - ox : xs1 - ox]
    return alpha


# --------------------------------------------------------------------------------------------
# backgrounds


def background(kind: str, rng: np.random.Generator, size: int = spec.IMAGE_SIZE) -> np.ndarray:
    """Neutral grey background [size, size, 3] float (0-255) of the given kind."""
    if kind not in spec.BACKGROUNDS:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(spec.BACKGROUNDS)}")
    tone = rng.uniform(*spec.BACKGROUND_TONE)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    if kind == "textured":
        coarse = rng.normal(0, 1, (size // 8, size // 8)).astype(np.float32)
        up = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32
        )
        field = 4.0 * up / max(float(np.abs(up).max()), 1e-6) + rng.normal(0, 1.5, (size, size))
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        proj = (np.cos(ang) * (xx - size / 2) + np.sin(ang) * (yy - size / 2)) / (size / 2)
        field = 9.0 * proj
    elif kind == "striped":
        period = rng.uniform(5, 9)
        direction = rng.integers(3)
        coord = (xx, yy, (xx + yy) / np.sqrt(2))[direction]
        field = 5.0 * np.sign(np.sin(2 * np.pi * coord / period + rng.uniform(0, 6.3)))
    elif kind == "dotted":
        step = int(rng.integers(6, 9))
        off = int(rng.integers(step))
        dots = ((xx.astype(int) + off) % step < 2) & ((yy.astype(int) + off) % step < 2)
        field = np.where(dots, 8.0, 0.0)
    field = field + rng.normal(0, 1.0, (size, size))
    field = np.clip(field, -spec.BACKGROUND_MAX_DEVIATION + 2, spec.BACKGROUND_MAX_DEVIATION - 2)
    tint = rng.uniform(-1.5, 1.5, 3)
    return np.clip(tone + field[..., None] + tint, 0, 255).astype(np.float32)


def _jitter_colour(name: str, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(spec.COLORS[name], np.float32)
    return np.clip(base + rng.integers(-spec.COLOR_JITTER, spec.COLOR_JITTER + 1, 3), 0, 255)


def draw_objects(
    objects: Sequence[dict], background_kind: str, rng: np.random.Generator
) -> Image.Image:
    """Draw ``objects`` [{"class", "color", "box": (x0, y0, side)}] on a background."""
    img = background(background_kind, rng)
    for obj in objects:
        alpha = shape_alpha(obj["class"], tuple(obj["box"]))[..., None]
        img = img * (1 - alpha) + _jitter_colour(obj["color"], rng) * alpha
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# layout


def _separated(a: Box, b: Box, gap: float = spec.OBJECT_GAP) -> bool:
    ax0, ay0, sa = a
    bx0, by0, sb = b
    return (
        ax0 + sa + gap <= bx0
        or bx0 + sb + gap <= ax0
        or ay0 + sa + gap <= by0
        or by0 + sb + gap <= ay0
    )


#: Objects sit at one of these slot centres (a 3x3 grid), jittered by at most SLOT_JITTER px; a
#: lone object sits at the middle slot. Few layouts make the layout an easy early decision.
SLOTS = (16.0, 32.0, 48.0)
SLOT_JITTER = 2.0


def _random_box(side: float, rng: np.random.Generator, centre_only: bool = False) -> Box:
    hi = spec.IMAGE_SIZE - 1 - side
    cx, cy = (SLOTS[1], SLOTS[1]) if centre_only else (SLOTS[int(rng.integers(3))], SLOTS[int(rng.integers(3))])
    x0 = np.clip(cx - side / 2 + rng.uniform(-SLOT_JITTER, SLOT_JITTER), 1, hi)
    y0 = np.clip(cy - side / 2 + rng.uniform(-SLOT_JITTER, SLOT_JITTER), 1, hi)
    return (float(x0), float(y0), float(side))


def _xyxy(box: Box) -> tuple[float, float, float, float]:
    x0, y0, s = box
    return (x0, y0, x0 + s, y0 + s)


def _relation_holds(a: Box, b: Box, relation: str) -> bool:
    """``relation`` of a to b holds with a margin (GenEval's rule with a doubled revision)."""
    from opd_bench.geneval import relative_position

    return relation in relative_position(_xyxy(a), _xyxy(b), position_threshold=0.2)


def layout(
    sides: Sequence[float],
    rng: np.random.Generator,
    relations: Sequence[tuple[int, str, int]] = (),
    max_tries: int = 4000,
) -> list[Box]:
    """Non-overlapping boxes of the given sides; ``relations`` (i, rel, j): box i rel box j."""
    for _ in range(max_tries):
        boxes: list[Box] = []
        ok = True
        for side in sides:
            for _ in range(50):
                cand = _random_box(side, rng, centre_only=len(sides) == 1)
                if all(_separated(cand, other) for other in boxes):
                    boxes.append(cand)
                    break
            else:
                ok = False
                break
        if ok and all(_relation_holds(boxes[i], boxes[j], rel) for i, rel, j in relations):
            return boxes
    raise RuntimeError(f"could not lay out {len(sides)} objects with relations {relations}")


def _sides_for(n: int, rng: np.random.Generator) -> list[float]:
    hi = {1: 32, 2: 28, 3: 24, 4: 21}.get(n, 19)
    lo = spec.OBJECT_SIZE_MIN + (1 if n <= 2 else 0)
    return [float(rng.integers(lo, hi + 1)) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# record families


def record_family(record: dict) -> str:
    task = record.get("task")
    if task in ("geneval", "ocr", "pref"):
        return task
    if "include" in record:
        return "geneval"
    if "text" in record:
        return "ocr"
    if "objects" in record:
        return "pref"
    raise ValueError(f"cannot tell the family of record {record!r}")


def _record_rng(record: dict, seed: int) -> np.random.Generator:
    key = json.dumps(
        {k: v for k, v in record.items() if k != "id"}, sort_keys=True, ensure_ascii=True
    )
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def geneval_scene(record: dict, rng: np.random.Generator) -> list[dict]:
    """Objects [{"class", "color", "box", "clause"}] satisfying a GenEval record."""
    objects: list[dict] = []
    clause_of: list[int] = []
    for ci, clause in enumerate(record["include"]):
        for _ in range(int(clause["count"])):
            colour = clause.get("color") or spec.COLOR_NAMES[int(rng.integers(10))]
            objects.append({"class": clause["class"], "color": colour, "clause": ci})
            clause_of.append(ci)
    relations = []
    for ci, clause in enumerate(record["include"]):
        if "position" in clause:
            rel, target = clause["position"]
            for i, c_i in enumerate(clause_of):
                for j, c_j in enumerate(clause_of):
                    if c_i == ci and c_j == int(target):
                        relations.append((i, rel, j))
    boxes = layout(_sides_for(len(objects), rng), rng, relations)
    for obj, box in zip(objects, boxes):
        obj["box"] = box
    return objects


def pref_scene(record: dict, rng: np.random.Generator) -> list[dict]:
    objects = []
    sides = []
    for obj in record["objects"]:
        lo, hi = spec.SIZES[obj.get("size", "medium")]
        sides.append(float(rng.integers(lo, hi + 1)))
        objects.append({"class": obj["class"], "color": obj["color"]})
    cap = {1: 32.0, 2: 26.0}.get(len(sides), 22.0)  # keep several large objects placeable
    sides = [min(s, cap) for s in sides]
    for obj, box in zip(objects, layout(sides, rng)):
        obj["box"] = box
    return objects


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(spec.font_path(), size)


def _text_cells(text: str) -> tuple[ImageFont.FreeTypeFont, tuple]:
    """The font and the box of ``text``'s cells: that of as many "W"s, so the layout depends on
    the text's length only (the font is monospaced)."""
    font = _font(spec.TEXT_SIZE)
    return font, font.getbbox("W" * len(text))


_BOARDS = {  # surface -> (board colours, text colours)
    "sign": ([(245, 245, 240), (250, 225, 60), (235, 225, 200)], [(15, 15, 15), (20, 30, 110)]),
    "poster": ([(250, 250, 250), (200, 225, 250), (250, 215, 225)], [(15, 15, 15), (150, 20, 20)]),
    "label": ([(250, 250, 250), (240, 235, 215)], [(15, 15, 15), (20, 60, 20)]),
    "board": ([(30, 70, 45), (25, 25, 30), (30, 45, 100)], [(250, 250, 250), (250, 240, 120)]),
}


def ocr_image(record: dict, rng: np.random.Generator) -> Image.Image:
    """The record's text, large and legible, on its surface with a little decoration.

    Every text is drawn in one monospaced font size and exactly centred, its cells laid out from
    the font rather than from its glyphs (tiny-v3): each character then always looks the same,
    and the i-th character of an n-character text always sits at the same place. With a few
    pixels of random offset and sizes fitted to each text, the base model never learned which
    glyph a character asks for (docs/tiny_base.md, G1-G2 and P10-P12), just as it ignored the
    shape word while objects could sit anywhere."""
    text = record["text"]
    surface = record.get("surface", "sign")
    size = spec.IMAGE_SIZE
    kind = ("plain", "textured", "gradient")[int(rng.integers(3))]
    img = Image.fromarray(np.rint(background(kind, rng)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    font, tb = _text_cells(text)
    tw, th = tb[2] - tb[0], tb[3] - tb[1]
    if surface == "plain":
        colour = ((15, 15, 15), (250, 250, 250), (20, 30, 120))[int(rng.integers(3))]
        x = (size - tw) // 2 - tb[0]
        y = (size - th) // 2 - tb[1]
        draw.text((x, y), text, font=font, fill=colour)
        return img
    boards, inks = _BOARDS[surface]
    board = boards[int(rng.integers(len(boards)))]
    ink = inks[int(rng.integers(len(inks)))]
    pad = 4
    bw, bh = tw + 2 * pad, th + 2 * pad
    bx = (size - bw) // 2
    by = (size - bh) // 2
    if surface == "sign":  # a post under the sign
        px = bx + bw / 2
        draw.rectangle([px - 2, by + bh, px + 2, size], fill=(110, 70, 35))
    radius = 3 if surface == "label" else 1
    edge = tuple(int(c * 0.6) for c in board)
    draw.rounded_rectangle([bx, by, bx + bw, by + bh], radius=radius, fill=board, outline=edge)
    if surface == "poster":  # coloured frame and corner dots
        frame = spec.COLORS[spec.COLOR_NAMES[int(rng.integers(7))]]
        draw.rectangle([bx + 1, by + 1, bx + bw - 1, by + bh - 1], outline=frame)
    # decoration outside the board: a few small dots
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(2, size - 2, 2)
        if bx - 3 < cx < bx + bw + 3 and by - 3 < cy < by + bh + 3:
            continue
        col = spec.COLORS[spec.COLOR_NAMES[int(rng.integers(10))]]
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=col)
    draw.text((bx + pad - tb[0], by + pad - tb[1]), text, font=font, fill=ink)
    return img


# --------------------------------------------------------------------------------------------
# public API


def _text_width(length: int) -> int:
    cells = _text_cells("W" * length)[1]
    return cells[2] - cells[0]


def _check_record(record: dict, family: str) -> None:
    """A ``ValueError`` naming the field of ``record`` the world cannot draw (a bare KeyError, or
    a text cut off at the image's edge, otherwise)."""
    def one_of(field: str, value, allowed) -> None:
        if value not in allowed:
            raise ValueError(f"cannot render {field} {value!r} of record {record.get('id', record)!r}; the world has "
                             f"{', '.join(map(str, allowed))}")

    if family == "ocr":
        one_of("surface", record.get("surface", "sign"), spec.TEXT_SURFACES)
        text = record["text"]
        if _text_width(len(text)) > spec.IMAGE_SIZE:
            fits = max(n for n in range(1, spec.IMAGE_SIZE) if _text_width(n) <= spec.IMAGE_SIZE)
            raise ValueError(f"cannot render text {text!r} of record {record.get('id', record)!r}: at most {fits} characters "
                             f"fit the {spec.IMAGE_SIZE} px image")
        return
    objects = record["include"] if family == "geneval" else record["objects"]
    for obj in objects:
        one_of("class", obj["class"], spec.SHAPES)
        if obj.get("color") is not None or family == "pref":
            one_of("colour", obj.get("color"), spec.COLOR_NAMES)
        if family == "pref":
            one_of("size", obj.get("size", "medium"), spec.SIZES)
    if family == "pref":
        one_of("background", record.get("background", {}).get("kind", "plain"), spec.BACKGROUNDS)


def render_scene(record: dict, seed: int = 0) -> tuple[Image.Image, list[dict]]:
    """Image and the drawn objects (empty for ocr records) of ``record`` under ``seed`` (taken
    modulo 2**32)."""
    rng = _record_rng(record, seed)
    family = record_family(record)
    _check_record(record, family)
    if family == "ocr":
        return ocr_image(record, rng), []
    if family == "geneval":
        objects = geneval_scene(record, rng)
        kind = spec.BACKGROUNDS[int(rng.integers(len(spec.BACKGROUNDS)))]
    else:
        objects = pref_scene(record, rng)
        kind = record.get("background", {}).get("kind", "plain")
    return draw_objects(objects, kind, rng), objects


def render(record: dict, seed: int = 0) -> Image.Image:
    """A correct 64x64 RGB image for ``record`` (deterministic in ``record`` and ``seed``)."""
    return render_scene(record, seed)[0]


def to_tensor(images: Sequence[Image.Image]) -> Any:
    """PIL images -> float tensor [B, 3, H, W] in [0, 1]."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def render_batch(records: Sequence[dict], seeds: Sequence[int] | int = 0) -> Any:
    """Render ``records`` into a float tensor [B, 3, 64, 64] in [0, 1].

    ``seeds`` is one seed per record, or one int: record i then gets ``seeds + i``.
    """
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + i for i in range(len(records))]
    if len(seeds) != len(records):
        raise ValueError(f"got {len(records)} records and {len(seeds)} seeds")
    return to_tensor([render(r, s) for r, s in zip(records, seeds)])
