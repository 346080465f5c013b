"""GenEval's rules on a list of detections, independent of any detector or world.

Reads the official GenEval metadata format unchanged (one JSON object per line)::

    {"tag": "position",
     "include": [{"class": "tv", "count": 1},
                 {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a tv"}

A detection is a dict ``{"class", "confidence", "box": (x0, y0, x1, y1), "color"?, "mask"?}``
with the box in pixels (image coordinates, y down).

Rules (those of the official evaluator; PAPER.md section 3):

* per class, keep detections with confidence strictly above 0.3 (0.9 when the tag is
  ``counting``), sorted by decreasing confidence, at most 16;
* include clause {class, count, color?, position?}: at least ``count`` kept detections; colour and
  position are checked on the ``count`` most confident only; colour needs at least ``count`` of
  them with the asked colour; position [relation, i] needs the relation between each of them and
  every object matched by include clause i (a clause that failed matches nothing, and then the
  position clause fails with "no target");
* relation of a to b: offset = centre_a - centre_b; per axis revised = max(|offset| - 0.1 *
  (size_a + size_b), 0) * sign(offset), size = box width / height; no relation at all when both
  revised components are below 1e-3; else (dx, dy) = revised / |offset| and "left of" dx < -0.5,
  "right of" dx > 0.5, "above" dy < -0.5, "below" dy > 0.5 (several can hold);
* exclude clause {class, count}: fails when ``count`` or more detections of the class are kept;
* the image is correct when every clause holds; overall score = mean of per-tag accuracies.

Colour: by default the detection's own ``"color"`` field; ``colour_fn(detections, classname) ->
list of colour names`` replaces it (e.g. the CLIP zero-shot classifier of the real suite).

The official evaluator's ``--options`` (threshold, counting_threshold, max_objects, max_overlap,
position_threshold) are the fields of :class:`Rules`; the defaults are its defaults, so
``rules`` only needs passing to change them. ``max_overlap`` < 1 turns on its per-class greedy NMS
(IoU with GenEval's +1 pixel convention), applied after the top-16 cut, as there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

ColourFn = Callable[[Sequence[dict], str], Sequence[str]]


@dataclass(frozen=True)
class Rules:
    """The official evaluator's options, with its defaults."""

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    max_overlap: float = 1.0  # per-class NMS IoU; 1.0 = no NMS (the official default)
    position_threshold: float = POSITION_THRESHOLD

    def confidence_threshold(self, metadata: dict) -> float:
        return self.counting_threshold if metadata.get("tag") == "counting" else self.threshold


DEFAULT_RULES = Rules()


def load_metadata(path: str | Path) -> list[dict]:
    """Records of a GenEval-format JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def confidence_threshold(metadata: dict) -> float:
    return COUNTING_THRESHOLD if metadata.get("tag") == "counting" else THRESHOLD


def group_detections(
    detections: Iterable[dict], threshold: float, max_objects: int = MAX_OBJECTS
) -> dict[str, list[dict]]:
    """Per class: detections with confidence > threshold, most confident first, at most 16."""
    groups: dict[str, list[dict]] = {}
    for det in detections:
        if float(det["confidence"]) > threshold:
            groups.setdefault(det["class"], []).append(det)
    for name, dets in groups.items():
        # stable sort: ties keep the detector's order
        groups[name] = sorted(dets, key=lambda d: -float(d["confidence"]))[:max_objects]
    return groups


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union with GenEval's +1 pixel convention (boxes are inclusive)."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0.0


def keep_detections(detections: Iterable[dict], metadata: dict, rules: Rules = DEFAULT_RULES) -> dict[str, list[dict]]:
    """The detections GenEval keeps, per class: threshold, most confident first, top ``max_objects``,
    then greedy NMS when ``max_overlap`` < 1."""
    groups = group_detections(detections, rules.confidence_threshold(metadata), rules.max_objects)
    if rules.max_overlap < 1:
        for name, dets in groups.items():
            kept: list[dict] = []
            for det in dets:
                if all(iou(det["box"], k["box"]) < rules.max_overlap for k in kept):
                    kept.append(det)
            groups[name] = kept
    return groups


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box a to box b (subset of left of / right of / above / below)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    off_x = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    off_y = (ay0 + ay1) / 2 - (by0 + by1) / 2
    size_x = abs(ax1 - ax0) + abs(bx1 - bx0)
    size_y = abs(ay1 - ay0) + abs(by1 - by0)
    rev_x = max(abs(off_x) - position_threshold * size_x, 0.0) * _sign(off_x)
    rev_y = max(abs(off_y) - position_threshold * size_y, 0.0) * _sign(off_y)
    if abs(rev_x) < 1e-3 and abs(rev_y) < 1e-3:
        return set()
    norm = math.hypot(off_x, off_y)
    dx, dy = rev_x / norm, rev_y / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _sign(v: float) -> float:
    return (v > 0) - (v < 0)


def _colours(dets: Sequence[dict], classname: str, colour_fn: ColourFn | None) -> list:
    if colour_fn is not None:
        return list(colour_fn(dets, classname))
    return [d.get("color") for d in dets]


def _position_ok(
    found: Sequence[dict], targets: Sequence[dict], relation: str, position_threshold: float = POSITION_THRESHOLD
) -> tuple[bool, str]:
    for obj in found:
        for target in targets:
            rels = relative_position(obj["box"], target["box"], position_threshold)
            if relation not in rels:
                return False, " and ".join(sorted(rels))
    return True, ""


def evaluate_image(
    metadata: dict, detections: Sequence[dict], colour_fn: ColourFn | None = None, rules: Rules = DEFAULT_RULES
) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, reason); reason is "" when correct."""
    objects = keep_detections(detections, metadata, rules)
    correct = True
    reasons: list[str] = []
    matched: list[list[dict] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = _colours(found, name, colour_fn)
                n_ok = colours.count(req["color"])
                if n_ok < count:
                    ok = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
                    reasons.append(
                        f"expected {req['color']} {name}>={count}, found {n_ok} {req['color']}"
                        + (f"; and {seen}" if seen else "")
                    )
            if "position" in req and ok:
                relation, target = req["position"][0], int(req["position"][1])
                targets = matched[target] if 0 <= target < len(matched) else None
                if targets is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    pos_ok, seen = _position_ok(found, targets, relation, rules.position_threshold)
                    if not pos_ok:
                        ok = False
                        reasons.append(f"expected {name} {relation} target, found {seen} target")
        correct = correct and ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def score_partial(
    metadata: dict, detections: Sequence[dict], colour_fn: ColourFn | None = None, rules: Rules = DEFAULT_RULES
) -> float:
    """Flow-GRPO's partial-credit GenEval reward, in [0, 1].

    Same detection filtering as :func:`evaluate_image` (0.3 / 0.9 threshold, top 16 per class).
    For each include clause {class, count}, with ``found`` = all kept detections of the class:

    * a count term ``max(0, 1 - |count - found| / count)`` (Flow-GRPO has no ``max(0, .)``; we
      clip so that the reward stays in [0, 1] when more than twice the count is found);
    * if ``found != count`` (exact count, unlike the strict rule's ``>=``) and the clause asks
      for a colour or a position: one extra term 0 and the clause is unmatched;
    * otherwise a colour term (if asked) = fraction of the found objects with the asked colour
      (the clause is unmatched unless all have it), then a position term (if asked and the
      clause is still matched) = 1 if every found object stands in the relation to every
      object of the target clause, else 0 (also 0 when the target clause is unmatched).

    The reward is the mean of all terms (0 when there are none). Exclude clauses are not used:
    the count term already penalises extra objects.
    """
    objects = keep_detections(detections, metadata, rules)
    terms: list[float] = []
    matched: list[list[dict] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])
        terms.append(max(0.0, 1.0 - abs(count - len(found)) / count))
        ok = len(found) == count
        if not ok:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                colours = _colours(found, name, colour_fn)
                n_ok = colours.count(req["color"])
                terms.append(n_ok / count)
                ok = n_ok >= count
            if "position" in req and ok:
                relation, target = req["position"][0], int(req["position"][1])
                targets = matched[target] if 0 <= target < len(matched) else None
                if targets is None:
                    ok = False
                    terms.append(0.0)
                else:
                    ok = _position_ok(found, targets, relation, rules.position_threshold)[0]
                    terms.append(1.0 if ok else 0.0)
        matched.append(found if ok else None)
    return float(sum(terms) / len(terms)) if terms else 0.0


def summarise(tags: Sequence[str], corrects: Sequence[bool]) -> dict:
    """{"overall": mean of per-tag accuracies, "per_tag": {tag: accuracy}, "counts": {tag: n}}."""
    if len(tags) != len(corrects):
        raise ValueError(f"got {len(tags)} tags and {len(corrects)} verdicts")
    totals: dict[str, list[int]] = {}
    for tag, ok in zip(tags, corrects):
        t = totals.setdefault(tag, [0, 0])
        t[0] += bool(ok)
        t[1] += 1
    per_tag = {tag: hits / n for tag, (hits, n) in totals.items()}
    overall = sum(per_tag.values()) / len(per_tag) if per_tag else float("nan")
    return {"overall": overall, "per_tag": per_tag, "counts": {t: n for t, (_, n) in totals.items()}}
