"""The tiny world: prompt files, renderer, detector and the GenEval reward on rendered scenes."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from opd_bench import geneval
from opd_bench.world import detect, prompts, render, spec

PROMPT_DIR = prompts.DEFAULT_DIR
FILES = [f"{fam}_{split}" for fam in prompts.FAMILIES for split in ("train", "test")]


@pytest.fixture(scope="module")
def files():
    return {name: prompts.read_jsonl(PROMPT_DIR / f"{name}.jsonl") for name in FILES}


def test_regenerating_gives_identical_bytes(tmp_path):
    prompts.write_all(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (PROMPT_DIR / f"{name}.jsonl").read_bytes(), name


def test_sizes_ids_and_disjointness(files):
    for fam in prompts.FAMILIES:
        train, test = files[f"{fam}_train"], files[f"{fam}_test"]
        assert len(test) >= 300 and len(train) >= 2000
        for split, recs in (("train", train), ("test", test)):
            ids = [r["id"] for r in recs]
            assert ids == [f"{fam}-{split}-{i:05d}" for i in range(len(recs))]
            assert all(r["task"] == fam for r in recs)
        held_out = lambda recs: {r["prompt"] for r in recs if r.get("tag") not in prompts.SHARED_TAGS}
        assert not held_out(train) & held_out(test)
        assert len({r["prompt"] for r in test}) == len(test)
    assert not {r["text"] for r in files["ocr_train"]} & {r["text"] for r in files["ocr_test"]}


def _check_geneval(r):
    tag, inc = r["tag"], r["include"]
    assert set(r) <= {"tag", "include", "exclude", "prompt", "task", "id"}
    for c in inc:
        assert c["class"] in spec.SHAPES and isinstance(c["count"], int)
        assert set(c) <= {"class", "count", "color", "position"}
        if "color" in c:
            assert c["color"] in geneval.COLORS
    n_colour = sum("color" in c for c in inc)
    if tag == "counting":
        (c,) = inc
        assert 2 <= c["count"] <= 4
        assert r["exclude"] == [{"class": c["class"], "count": c["count"] + 1}]
        assert r["prompt"] == f"a photo of {spec.COUNT_WORDS[c['count']]} {spec.PLURALS[c['class']]}"
    else:
        assert "exclude" not in r and all(c["count"] == 1 for c in inc)
    if tag == "counting":
        assert n_colour == 0
    elif tag == "single_object":
        assert len(inc) == 1 and n_colour == 0
    elif tag == "two_object":
        assert len(inc) == 2 and n_colour == 0 and inc[0]["class"] != inc[1]["class"]
        assert r["prompt"] == f"a photo of a {inc[0]['class']} and a {inc[1]['class']}"
    elif tag == "colors":
        assert len(inc) == 1 and n_colour == 1
        assert r["prompt"] == f"a photo of {spec.article(inc[0]['color'])} {inc[0]['color']} {inc[0]['class']}"
    elif tag == "position":
        assert len(inc) == 2 and "position" not in inc[0]
        rel, target = inc[1]["position"]
        assert rel in spec.RELATIONS and target == 0
        assert r["prompt"] == f"a photo of a {inc[1]['class']} {rel} a {inc[0]['class']}"
    elif tag == "color_attr":
        assert len(inc) == 2 and n_colour == 2 and inc[0]["color"] != inc[1]["color"]
        assert re.fullmatch(r"a photo of an? \w+ \w+ and an? \w+ \w+", r["prompt"])
    else:
        raise AssertionError(f"unknown tag {tag}")


def test_records_validate(files):
    for split in ("train", "test"):
        recs = files[f"geneval_{split}"]
        for r in recs:
            _check_geneval(r)
        assert {r["tag"] for r in recs} == set(geneval.TAGS)
        for r in files[f"ocr_{split}"]:
            t = r["text"]
            assert 1 <= len(t) <= 4 and set(t) <= set(spec.TEXT_ALPHABET)
            assert f'"{t}"' in r["prompt"] and r["prompt"].count('"') == 2
            assert r["surface"] in spec.TEXT_SURFACES
        for r in files[f"pref_{split}"]:
            assert 1 <= len(r["objects"]) <= 3
            assert r["background"]["kind"] in spec.BACKGROUNDS
            for o in r["objects"]:
                assert o["class"] in spec.SHAPES and o["color"] in spec.COLORS
                assert o["size"] in spec.SIZES and f"{o['color']} {o['class']}" in r["prompt"]


def test_render_is_deterministic_and_batched(files):
    recs = [files["geneval_test"][0], files["ocr_test"][0], files["pref_test"][0]]
    for r in recs:
        a, b = render.render(r, 3), render.render(r, 3)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != render.render(r, 4).tobytes()
    batch = render.render_batch(recs, seeds=[3, 3, 3])
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    assert np.array_equal(np.rint(batch[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                          np.asarray(render.render(recs[0], 3)))


def _sample_per_tag(files, n=20):
    pool = files["geneval_test"] + files["geneval_train"]
    out = []
    for tag in geneval.TAGS:
        seen, recs = set(), []
        for r in pool:
            if r["tag"] == tag and r["prompt"] not in seen:
                seen.add(r["prompt"])
                recs.append(r)
        step = max(1, len(recs) // n)
        out += [recs[(i * step) % len(recs)] for i in range(n)]  # small tags: repeats, new seeds
    return out


def test_rendered_scenes_pass_geneval(files):
    recs = _sample_per_tag(files)
    tags, oks = [], []
    for i, r in enumerate(recs):
        ok, reason = geneval.evaluate_image(r, detect.detect(render.render(r, i)))
        assert ok, (r["prompt"], reason)
        tags.append(r["tag"])
        oks.append(ok)
    assert geneval.summarise(tags, oks)["overall"] == 1.0
    assert len(recs) == 20 * len(geneval.TAGS)


def test_pref_scenes_detected_and_text_ignored(files):
    for i, r in enumerate(files["pref_test"][:15]):
        dets = [d for d in detect.detect(render.render(r, i)) if d["confidence"] > 0.3]
        got = sorted((d["class"], d["color"]) for d in dets)
        assert got == sorted((o["class"], o["color"]) for o in r["objects"]), r["prompt"]
    for i, r in enumerate(files["ocr_test"][:15]):
        assert not [d for d in detect.detect(render.render(r, i)) if d["confidence"] > 0.3]
        img = np.asarray(render.render(r, i)).astype(float)
        assert img.std() > 10  # the text / sign is there (a bare background: std <= 6)


@pytest.mark.parametrize("surface", spec.TEXT_SURFACES)
def test_texts_of_one_length_share_one_centred_layout(surface):
    """tiny-v3: the i-th character of an n-character text always sits in the same cell, so two
    texts of one length drawn from the same random stream differ only inside the centred cells."""
    def draw(text):
        return np.asarray(render.ocr_image({"text": text, "surface": surface}, np.random.default_rng(0)))

    rows, cols = np.nonzero((draw("AB") != draw("XY")).any(-1))
    assert len(rows) > 40  # the glyphs differ
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 2 and abs((rows.min() + rows.max()) / 2 - 31.5) <= 3
    assert cols.max() - cols.min() < 2 * 13 and rows.max() - rows.min() < 17  # two cells, one line
    # the second character's cell: "AB" and "AY" differ only right of the middle
    _, cols = np.nonzero((draw("AB") != draw("AY")).any(-1))
    assert cols.min() >= 31


def test_detector_colours_and_masks():
    rng = np.random.default_rng(0)
    objs = [{"class": s, "color": c, "box": (2 + 20 * (i % 3), 2 + 20 * (i // 3), 16.0)}
            for i, (s, c) in enumerate(zip(spec.SHAPES[:6], spec.COLOR_NAMES[:6]))]
    img = render.draw_objects(objs, "plain", rng)
    dets = detect.detect(render.to_tensor([img])[0], masks=True)
    assert sorted((d["class"], d["color"]) for d in dets) == sorted((o["class"], o["color"]) for o in objs)
    for d in dets:
        assert 0.9 < d["confidence"] <= 1.0 and d["mask"].shape == (64, 64) and d["mask"].any()
    for name in spec.COLOR_NAMES:
        assert detect.colour_name(spec.COLORS[name]) == name
    assert detect.detect(render.draw_objects([], "textured", rng)) == []


def test_the_detector_reads_every_image_form_or_refuses_it():
    img = render.draw_objects([{"class": "square", "color": "red", "box": (20, 20, 24.0)}], "plain", np.random.default_rng(0))
    floats = render.to_tensor([img])[0]
    expected = [(d["class"], d["color"]) for d in detect.detect(img)]
    assert expected == [("square", "red")]
    for form in (floats, floats.numpy().transpose(1, 2, 0), floats.to(torch.bfloat16), (floats * 255).round().to(torch.uint8),
                 np.asarray(img)):  # a uint8 tensor used to be read as floats and clipped to white: no detections
        assert [(d["class"], d["color"]) for d in detect.detect(form)] == expected
    for bad, problem in (((floats * 255).numpy(), r"float images must be in \[0, 1\], got values up to 210.0"),
                         (np.zeros((64, 64, 4), np.uint8), r"an RGB image.*got shape \(64, 64, 4\)"),
                         (np.zeros((64, 64, 3), np.int64), "uint8 .* or floats in")):
        with pytest.raises(ValueError, match=problem):
            detect.detect(bad)


def test_records_the_world_cannot_draw_are_named():
    assert render.render({"text": "ABCDE"}).size == (64, 64)
    for record, problem in (({"text": "ABCDEF"}, "text 'ABCDEF' .* at most 5 characters fit the 64 px image"),
                            ({"text": "AB", "surface": "wall"}, "surface 'wall'"),
                            ({"include": [{"class": "square", "count": 1, "color": "magenta"}]}, "colour 'magenta'.*the world has red"),
                            ({"include": [{"class": "blob", "count": 1}]}, "class 'blob'"),
                            ({"objects": [{"class": "square", "color": "red", "size": "huge"}]}, "size 'huge'")):
        with pytest.raises(ValueError, match=problem):
            render.render(record)


# --------------------------------------------------------------------------------------------
# wrong scenes


def _scene(objs, seed=0):
    return render.draw_objects(objs, "plain", np.random.default_rng(seed))


def _counting(n, shape="star"):
    return {"tag": "counting", "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}],
            "prompt": f"a photo of {spec.COUNT_WORDS[n]} {spec.PLURALS[shape]}"}


def test_wrong_count_fails():
    rec = _counting(3)
    stars = [{"class": "star", "color": "red", "box": (2 + 21 * i, 20, 17.0)} for i in range(3)]
    four = stars + [{"class": "star", "color": "red", "box": (20, 44, 17.0)}]
    assert geneval.evaluate_image(rec, detect.detect(_scene(stars))) == (True, "")
    assert geneval.evaluate_image(rec, detect.detect(_scene(stars[:2]))) == (
        False, "expected star>=3, found 2")
    assert geneval.evaluate_image(rec, detect.detect(_scene(four))) == (
        False, "expected star<4, found 4")


def test_wrong_colour_fails():
    rec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
           "prompt": "a photo of a red circle"}
    ok, reason = geneval.evaluate_image(
        rec, detect.detect(_scene([{"class": "circle", "color": "green", "box": (20, 20, 20.0)}])))
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 green"


def test_swapped_position_fails():
    rec = {"tag": "position",
           "include": [{"class": "circle", "count": 1},
                       {"class": "triangle", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a triangle left of a circle"}
    left = {"class": "triangle", "color": "blue", "box": (4, 22, 18.0)}
    right = {"class": "circle", "color": "yellow", "box": (40, 22, 18.0)}
    assert geneval.evaluate_image(rec, detect.detect(_scene([left, right])))[0]
    swapped = [{**left, "box": right["box"]}, {**right, "box": left["box"]}]
    ok, reason = geneval.evaluate_image(rec, detect.detect(_scene(swapped)))
    assert not ok and reason == "expected triangle left of target, found right of target"


# --------------------------------------------------------------------------------------------
# rewards


def test_tiny_geneval_reward(files):
    from opd_bench.rewards.geneval import TinyGenEvalReward

    correct = _counting(3)
    stars = [{"class": "star", "color": "red", "box": (2 + 21 * i, 20, 17.0)} for i in range(3)]
    images = render.to_tensor([
        _scene(stars), _scene(stars[:2]), _scene(stars[:1]),
        render.render(files["ocr_test"][0], 0),
    ])
    metas = [correct, correct, correct, files["ocr_test"][0]]
    prompts_ = [m["prompt"] for m in metas]
    partial = TinyGenEvalReward()(images, prompts_, metas)
    s = partial.scores
    assert s.shape == (4,) and s.dtype == torch.float32
    assert s[0] == 1.0 and 0.0 <= s[2] < s[1] < 1.0 and math.isnan(s[3])
    assert s[1] == pytest.approx(1 - 1 / 3)
    assert partial.details["correct"] == [True, False, False, None]
    assert partial.details["tag"] == ["counting"] * 3 + [None]
    strict = TinyGenEvalReward(strict=True)(images, prompts_, metas).scores
    assert strict[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(strict[3])
    # on rendered test scenes the partial reward is 1 and always within [0, 1]
    recs = [r for r in files["geneval_test"]][::40]
    out = TinyGenEvalReward()(render.render_batch(recs, 0), [r["prompt"] for r in recs], recs)
    assert torch.all(out.scores == 1.0)
    with pytest.raises(ValueError):
        TinyGenEvalReward()(images[:2], prompts_, metas)
