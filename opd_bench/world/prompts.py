"""Seeded generators of the tiny suite's prompt files (geneval, ocr, pref; train and test).

Every record has ``"task"`` and a stable ``"id"`` (``"<task>-<split>-<index:05d>"``).

* geneval: GenEval's own metadata format and phrasing, e.g.
  ``{"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "star",
  "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a star right of a circle"}``;
  counting records carry ``"exclude": [{"class", "count": count + 1}]`` (the only tag with one).
  Per tag the whole prompt space is enumerated and shuffled; the test set takes ``GENEVAL_TEST``
  prompts of each tag, held out from train, except the ``SHARED_TAGS`` (single_object: 7
  prompts, counting: 21), whose whole space is in both splits. The
  train file has ``GENEVAL_TRAIN_PER_TAG`` records per tag: tags with fewer remaining prompts
  cycle through them (the same prompt then has several train records), color_attr is sampled
  without repetition.
* ocr: ``{"prompt": 'a sign that says "AB3"', "text": "AB3", "surface": "sign"}``; texts are
  1-4 characters of A-Z0-9, test and train texts disjoint.
* pref: free-form scenes, e.g. ``"a blue circle and a small yellow star on a textured
  background"`` with ``"objects": [{"class", "color", "size"}]`` and ``"background": {"kind"}``;
  test and train prompts disjoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from opd_bench.world import spec

# Tags whose whole prompt space is tiny (7 and 21 prompts) are not held out: the test set has
# every prompt and train shares them, as any trainer sees the 80 COCO classes of GenEval's
# single-object prompts. Holding out 3 of 7 would make their per-tag accuracy pure noise.
SHARED_TAGS = ("single_object", "counting")
GENEVAL_TEST = {
    "two_object": 14,
    "colors": 24,
    "position": 56,
    "color_attr": 216,
}
GENEVAL_TRAIN_PER_TAG = 500
OCR_TEST, OCR_TRAIN = 400, 3000
PREF_TEST, PREF_TRAIN = 400, 3000
FAMILIES = ("geneval", "ocr", "pref")
_STREAM = {"geneval": 1, "ocr": 2, "pref": 3}


# --------------------------------------------------------------------------------------------
# geneval


def _a(word: str) -> str:
    return f"{spec.article(word)} {word}"


def geneval_record(tag: str, key: tuple) -> dict:
    """One GenEval-format record of ``tag`` for the enumerated ``key``."""
    if tag == "single_object":
        (a,) = key
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of {_a(a)}"}
    if tag == "two_object":
        a, b = key
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {_a(a)} and {_a(b)}",
        }
    if tag == "counting":
        a, n = key
        return {
            "tag": tag,
            "include": [{"class": a, "count": n}],
            "exclude": [{"class": a, "count": n + 1}],
            "prompt": f"a photo of {spec.COUNT_WORDS[n]} {spec.PLURALS[a]}",
        }
    if tag == "colors":
        a, c = key
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {_a(c)} {a}",
        }
    if tag == "position":
        a, rel, b = key  # "a photo of a <a> <rel> a <b>": a is clause 1, b is clause 0
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {_a(a)} {rel} {_a(b)}",
        }
    if tag == "color_attr":
        ca, a, cb, b = key
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}",
        }
    raise ValueError(f"unknown GenEval tag {tag!r}")


def geneval_space(tag: str) -> list[tuple]:
    """Every key of ``tag`` in a fixed order."""
    S, C = spec.SHAPES, spec.COLOR_NAMES
    if tag == "single_object":
        return [(a,) for a in S]
    if tag == "two_object":
        return [(a, b) for a in S for b in S if a != b]
    if tag == "counting":
        return [(a, n) for a in S for n in spec.COUNTS]
    if tag == "colors":
        return [(a, c) for a in S for c in C]
    if tag == "position":
        return [(a, r, b) for a in S for r in spec.RELATIONS for b in S if a != b]
    if tag == "color_attr":
        return [(ca, a, cb, b) for a in S for b in S if a != b for ca in C for cb in C if ca != cb]
    raise ValueError(f"unknown GenEval tag {tag!r}")


def make_geneval(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) GenEval records."""
    rng = np.random.default_rng([seed, _STREAM["geneval"]])
    train: list[dict] = []
    test: list[dict] = []
    for tag in spec.GENEVAL_TAGS:
        space = geneval_space(tag)
        order = [space[i] for i in rng.permutation(len(space))]
        if tag in SHARED_TAGS:
            test_keys, rest = order, order
        else:
            n_test = GENEVAL_TEST[tag]
            test_keys, rest = order[:n_test], order[n_test:]
        test += [geneval_record(tag, k) for k in test_keys]
        if len(rest) >= GENEVAL_TRAIN_PER_TAG:
            train_keys = rest[:GENEVAL_TRAIN_PER_TAG]
        else:
            train_keys = [rest[i % len(rest)] for i in range(GENEVAL_TRAIN_PER_TAG)]
        train += [geneval_record(tag, k) for k in train_keys]
    return _finish("geneval", "train", train), _finish("geneval", "test", test)


# --------------------------------------------------------------------------------------------
# ocr

OCR_TEMPLATES = {
    "sign": ['a sign that says "{t}"', 'a road sign with the word "{t}"', 'a shop sign reading "{t}"'],
    "poster": ['a poster with the text "{t}"', 'a colorful poster that says "{t}"'],
    "label": ['a label that reads "{t}"', 'a small tag printed with "{t}"'],
    "board": ['a chalkboard with "{t}" written on it', 'a dark board that says "{t}"'],
    "plain": ['the text "{t}" in bold letters', 'the word "{t}" written on a grey wall'],
}


def coloured_position(record: dict, rng: np.random.Generator) -> dict:
    """A position record with two distinct colours drawn and named: "a photo of a star left of a heart" ->
    "a photo of a red star left of an orange heart" (the tiny base's pretraining: ``coloured_position``;
    probes J3-J8). Uncoloured, the two ways a relation can read
    differ only in the shapes' outlines; coloured, in where each colour goes, which the x0 error sees."""
    second, first = record["include"]  # the prompt names the object with the relation first
    relation = first["position"][0]
    if record["prompt"] != f"a photo of a {first['class']} {relation} a {second['class']}":
        raise ValueError(f"position prompt {record['prompt']!r} is not 'a photo of a A <relation> a B'")
    a, b = (str(c) for c in rng.choice(spec.COLOR_NAMES, 2, replace=False))

    def named(colour: str, shape: str) -> str:
        return f"{spec.article(colour)} {colour} {shape}"

    return {**record, "include": [{**second, "color": b}, {**first, "color": a}],
            "prompt": f"a photo of {named(a, first['class'])} {relation} {named(b, second['class'])}"}


def _random_text(rng: np.random.Generator) -> str:
    n = int(rng.integers(spec.TEXT_MIN_LEN, spec.TEXT_MAX_LEN + 1))
    return "".join(spec.TEXT_ALPHABET[int(i)] for i in rng.integers(len(spec.TEXT_ALPHABET), size=n))


def make_ocr(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) OCR records; test and train texts are disjoint."""
    rng = np.random.default_rng([seed, _STREAM["ocr"]])
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < OCR_TEST + OCR_TRAIN:
        t = _random_text(rng)
        if t not in seen:
            seen.add(t)
            texts.append(t)
    records = []
    for t in texts:
        surface = spec.TEXT_SURFACES[int(rng.integers(len(spec.TEXT_SURFACES)))]
        options = OCR_TEMPLATES[surface]
        prompt = options[int(rng.integers(len(options)))].format(t=t)
        records.append({"prompt": prompt, "text": t, "surface": surface})
    test, train = records[:OCR_TEST], records[OCR_TEST:]
    return _finish("ocr", "train", train), _finish("ocr", "test", test)


# --------------------------------------------------------------------------------------------
# pref

BACKGROUND_PHRASES = {
    "plain": "plain grey",
    "textured": "textured",
    "gradient": "soft gradient",
    "striped": "striped",
    "dotted": "dotted",
}
PREF_TEMPLATES = (
    "{objects} on a {background} background",
    "a picture of {objects} on a {background} background",
    "{objects} in front of a {background} backdrop",
)
SIZE_WEIGHTS = (0.3, 0.4, 0.3)  # small, medium, large


def _object_phrase(obj: dict) -> str:
    words = [obj["color"], obj["class"]]
    if obj["size"] != "medium":
        words.insert(0, obj["size"])
    return _a(" ".join(words))


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_pref(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) free-form scene records with their structured fields; prompts disjoint."""
    rng = np.random.default_rng([seed, _STREAM["pref"]])
    records: list[dict] = []
    seen: set[str] = set()
    sizes = list(spec.SIZES)
    while len(records) < PREF_TEST + PREF_TRAIN:
        n = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        objects = []
        for _ in range(n):
            objects.append({
                "class": spec.SHAPES[int(rng.integers(len(spec.SHAPES)))],
                "color": spec.COLOR_NAMES[int(rng.integers(len(spec.COLOR_NAMES)))],
                "size": sizes[int(rng.choice(3, p=SIZE_WEIGHTS))],
            })
        kind = spec.BACKGROUNDS[int(rng.integers(len(spec.BACKGROUNDS)))]
        template = PREF_TEMPLATES[int(rng.integers(len(PREF_TEMPLATES)))]
        prompt = template.format(
            objects=_join([_object_phrase(o) for o in objects]),
            background=BACKGROUND_PHRASES[kind],
        )
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "objects": objects, "background": {"kind": kind}})
    test, train = records[:PREF_TEST], records[PREF_TEST:]
    return _finish("pref", "train", train), _finish("pref", "test", test)


# --------------------------------------------------------------------------------------------
# files


def _finish(task: str, split: str, records: list[dict]) -> list[dict]:
    return [{**r, "task": task, "id": f"{task}-{split}-{i:05d}"} for i, r in enumerate(records)]


MAKERS = {"geneval": make_geneval, "ocr": make_ocr, "pref": make_pref}


def make_all(seed: int = 0) -> dict[str, list[dict]]:
    """{"<family>_<split>": records} for the three families and both splits."""
    out: dict[str, list[dict]] = {}
    for family in FAMILIES:
        train, test = MAKERS[family](seed)
        out[f"{family}_train"] = train
        out[f"{family}_test"] = test
    return out


def dumps(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def write_all(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write ``<family>_<split>.jsonl`` files into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in make_all(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_bytes(dumps(records).encode("ascii"))
        paths.append(path)
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


DEFAULT_DIR = Path(__file__).resolve().parent.parent / "suites" / "tiny" / "prompts"
