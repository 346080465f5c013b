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

Numerics, to the last float, as in the official code (mmdet's float32 arrays and numpy):

* confidences and the threshold are compared in float32: a detection scoring exactly
  float32(0.3) = 0.30000001192092896 is *not* above the threshold (float32(0.3));
* the order is ``np.argsort(scores)[::-1]`` on float32 scores: ascending, then reversed, so
  equal scores are visited in *reverse* detector order. The official code sorts all of a class's
  detections, those under the threshold included, and numpy 1.23 (GenEval's pinned version)
  sorts only up to 16 values stably; for a class with more detections its order of equal scores
  is unspecified (it differs between numpy versions), and there this module keeps the stable one;
* box centres, sizes, offsets, the revision and its norm are float32 numpy arithmetic
  (``relative_position``), so ``dx`` can land on exactly 0.5 and fail the strict ``<`` / ``>``;
* the NMS IoU (``max_overlap`` < 1 only) takes the coordinates' differences in float32 and the
  rest in float64: under numpy 1.23 the official ``x1 - x0 + 1`` adds a Python int to a float32
  scalar, which gives a float64, and the threshold is a Python float.

Colour: by default the detection's own ``"color"`` field; ``colour_fn(detections, classname) ->
list of colour names`` replaces it (e.g. the CLIP zero-shot classifier of the real suite).

The official evaluator's ``--options`` (threshold, counting_threshold, max_objects, max_overlap,
position_threshold) are the fields of :class:`Rules`; the defaults are its defaults, so
``rules`` only needs passing to change them. ``max_overlap`` < 1 turns on its per-class greedy NMS
(IoU with GenEval's +1 pixel convention), applied after the top-16 cut, as there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

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

    def __post_init__(self):
        # a config's "0.3" (a string) or true would compare or count wrongly, or fail mid-scoring
        for name, low, high in (("threshold", 0, 1), ("counting_threshold", 0, 1), ("max_overlap", 0, 1),
                                ("position_threshold", 0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
        if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"max_objects must be a whole number of at least 1, got {self.max_objects!r}")

    def confidence_threshold(self, metadata: dict) -> float:
        return self.counting_threshold if metadata.get("tag") == "counting" else self.threshold


DEFAULT_RULES = Rules()


def load_metadata(path: str | Path) -> list[dict]:
    """Records of a GenEval-format JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def confidence_threshold(metadata: dict) -> float:
    return COUNTING_THRESHOLD if metadata.get("tag") == "counting" else THRESHOLD


RELATIONS = ("left of", "right of", "above", "below")


def record_problem(record: dict) -> str | None:
    """What in a metadata record the rules cannot read (None: nothing): a malformed record would
    otherwise fail while scoring, after its images were drawn, or score 0 on every image."""

    def whole(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    include = record.get("include")
    if not isinstance(include, list) or not include:
        return "'include' must be a non-empty list of {\"class\", \"count\"} objects"
    for key in ("include", "exclude"):
        for i, wanted in enumerate(record.get(key) or []):
            where = f"{key}[{i}]"
            if not isinstance(wanted, dict) or not isinstance(wanted.get("class"), str) or not wanted["class"]:
                return f"{where} must be an object with a 'class' name"
            if not whole(wanted.get("count"), 1):
                return f"{where}.count must be an integer >= 1, got {wanted.get('count')!r}"
            if key == "exclude":
                continue
            if wanted.get("color") is not None and wanted["color"] not in COLORS:
                return f"{where} asks for the colour {wanted['color']!r}; GenEval's colour classifier knows {', '.join(COLORS)}"
            position = wanted.get("position")
            if position is not None and not (isinstance(position, list) and len(position) == 2 and position[0] in RELATIONS
                                             and whole(position[1], 0) and position[1] < i):
                return (f"{where}.position must be [relation, index of an earlier include entry] with a relation in "
                        f"{', '.join(RELATIONS)}, got {position!r}")
    return None


def group_detections(
    detections: Iterable[dict], threshold: float, max_objects: int = MAX_OBJECTS
) -> dict[str, list[dict]]:
    """Per class: detections with confidence > threshold, most confident first, at most 16.

    As the official code: scores and threshold compared in float32, ties in reverse detector order.
    """
    limit = np.float32(threshold)
    groups: dict[str, list[tuple[float, dict]]] = {}
    for det in detections:
        # float32 -> float is exact: the key orders and ties exactly as the float32 scores do.
        score = np.float32(det["confidence"])
        if score > limit:
            groups.setdefault(det["class"], []).append((float(score), det))
    kept: dict[str, list[dict]] = {}
    for name, scored in groups.items():
        # argsort()[::-1]: a stable ascending sort, reversed, puts equal scores in reverse order.
        ordered = sorted(scored, key=lambda pair: pair[0])[::-1]
        kept[name] = [det for _, det in ordered[:max_objects]]
    return kept


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union with GenEval's +1 pixel convention (boxes are inclusive), with the
    official numerics: float32 coordinates and differences, the +1 and all after it in float64."""
    a = np.asarray(box_a[:4], dtype=np.float32)
    b = np.asarray(box_b[:4], dtype=np.float32)

    def area(x0, y0, x1, y1):
        return max(float(x1 - x0) + 1, 0) * max(float(y1 - y0) + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return float(inter / union) if union else 0.0


def keep_detections(detections: Iterable[dict], metadata: dict, rules: Rules = DEFAULT_RULES) -> dict[str, list[dict]]:
    """The detections GenEval keeps, per class: threshold, most confident first, top ``max_objects``,
    then greedy NMS when ``max_overlap`` < 1."""
    groups = group_detections(detections, rules.confidence_threshold(metadata), rules.max_objects)
    if rules.max_overlap < 1:
        for name, dets in groups.items():
            kept: list[dict] = []
            for det in dets:  # compared in float64, as the official code does (see the module doc)
                if all(iou(det["box"], k["box"]) < rules.max_overlap for k in kept):
                    kept.append(det)
            groups[name] = kept
    return groups


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box a to box b (subset of left of / right of / above / below).

    float32 numpy arithmetic in the official evaluator's order of operations (its boxes are
    mmdet's float32 rows), so decisions at exactly 0.5 agree with it bit for bit.
    """
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float32).reshape(2, 2, 2)  # [box][corner][x, y]
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    # A Python float times a float32 array stays float32 (a numpy float64 would not).
    revised = np.maximum(np.abs(offset) - float(position_threshold) * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
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


PARTIAL_FORMS = ("flow-grpo", "clipped")
DEFAULT_PARTIAL_FORM = "flow-grpo"


def score_partial(
    metadata: dict,
    detections: Sequence[dict],
    colour_fn: ColourFn | None = None,
    rules: Rules = DEFAULT_RULES,
    form: str = DEFAULT_PARTIAL_FORM,
) -> float:
    """Flow-GRPO's partial-credit GenEval reward (its reward server's ``evaluate_reward``).

    Same detection filtering as :func:`evaluate_image` (0.3 / 0.9 threshold, top 16 per class).
    For each include clause {class, count}, with ``found`` = all kept detections of the class:

    * a count term ``1 - |count - found| / count``, negative when more than twice the count is
      found;
    * if ``found != count`` (exact count, unlike the strict rule's ``>=``) and the clause asks
      for a colour or a position: one extra term 0 and the clause is unmatched;
    * otherwise a colour term (if asked) = fraction of the found objects with the asked colour
      (the clause is unmatched unless all have it), then, if asked and the clause is still
      matched, position terms: 1 when every found object stands in the relation to every object
      of the target clause; when one does not, 0 *and* 1 (Flow-GRPO appends 0 at the failure,
      then 1 after its loop, so a failed position clause weighs 1/2); 0 alone when the target
      clause is unmatched.

    The reward is the mean of all terms (0 when there are none). Exclude clauses are not used:
    the count term already penalises extra objects.

    ``form="flow-grpo"`` (default) is exactly that, so training rewards equal those of the
    published runs. ``form="clipped"`` keeps the reward in [0, 1]: the count term is
    ``max(0, .)`` and a failed position clause is the single term 0.
    """
    if form not in PARTIAL_FORMS:
        raise ValueError(f"unknown partial-credit form {form!r}; choose one of {PARTIAL_FORMS}")
    clipped = form == "clipped"
    objects = keep_detections(detections, metadata, rules)
    terms: list[float] = []
    matched: list[list[dict] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])
        count_term = 1.0 - abs(count - len(found)) / count
        terms.append(max(0.0, count_term) if clipped else count_term)
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
                    if ok:
                        terms.append(1.0)
                    else:
                        terms.extend([0.0] if clipped else [0.0, 1.0])
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
