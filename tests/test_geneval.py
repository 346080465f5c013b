"""GenEval rule engine on hand-made detection lists (no world, no detector)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opd_bench import geneval


def det(cls, conf, box, color=None):
    d = {"class": cls, "confidence": conf, "box": box}
    if color is not None:
        d["color"] = color
    return d


def position_record(rel):
    # "a photo of a star <rel> a circle": the star is clause 1, relative to clause 0
    return {
        "tag": "position",
        "include": [{"class": "circle", "count": 1},
                    {"class": "star", "count": 1, "position": [rel, 0]}],
        "prompt": f"a photo of a star {rel} a circle",
    }


def test_relative_position_basic_and_diagonal():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)
    assert geneval.relative_position(a, b) == {"left of"}
    assert geneval.relative_position(b, a) == {"right of"}
    assert geneval.relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # offset (-10, -10), sizes 10 + 10: revised (-8, -8) / 14.1 = -0.57 on both axes
    assert geneval.relative_position((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}


def test_relative_position_size_revision():
    # centres 6 px apart in x, boxes 20 px wide: revised |dx| = 6 - 0.1 * 40 = 2 -> 2/6 < 0.5
    big_a, big_b = (0, 0, 20, 20), (6, 0, 26, 20)
    assert geneval.relative_position(big_a, big_b) == set()
    # the same centres with small boxes (4 px): revised 6 - 0.8 = 5.2 -> 0.87 -> left of
    assert geneval.relative_position((8, 8, 12, 12), (14, 8, 18, 12)) == {"left of"}
    # both revised components ~0 -> no relation at all
    assert geneval.relative_position((0, 0, 20, 20), (1, 1, 21, 21)) == set()


def test_position_rule_uses_revision():
    rec = position_record("left of")
    ok, _ = geneval.evaluate_image(rec, [det("circle", 0.9, (14, 8, 18, 12)),
                                         det("star", 0.9, (8, 8, 12, 12))])
    assert ok
    ok, reason = geneval.evaluate_image(rec, [det("circle", 0.9, (6, 0, 26, 20)),
                                              det("star", 0.9, (0, 0, 20, 20))])
    assert not ok and reason == "expected star left of target, found  target"
    ok, reason = geneval.evaluate_image(position_record("right of"),
                                        [det("circle", 0.9, (30, 0, 40, 10)),
                                         det("star", 0.9, (0, 0, 10, 10))])
    assert not ok and reason == "expected star right of target, found left of target"


def test_position_against_every_target_object_and_missing_target():
    rec = {"tag": "position",
           "include": [{"class": "circle", "count": 2},
                       {"class": "star", "count": 1, "position": ["left of", 0]}],
           "prompt": "x"}
    star = det("star", 0.9, (0, 0, 10, 10))
    good = [det("circle", 0.9, (30, 0, 40, 10)), det("circle", 0.8, (50, 0, 60, 10)), star]
    assert geneval.evaluate_image(rec, good)[0]
    bad = [det("circle", 0.9, (30, 0, 40, 10)), det("circle", 0.8, (0, 30, 10, 40)), star]
    assert not geneval.evaluate_image(rec, bad)[0]
    ok, reason = geneval.evaluate_image(rec, [det("circle", 0.9, (30, 0, 40, 10)), star])
    assert not ok
    assert reason.splitlines() == ["expected circle>=2, found 1", "no target for star to be left of"]


def test_counting_threshold_is_0_9_and_strict():
    rec = {"tag": "counting", "include": [{"class": "star", "count": 2}],
           "exclude": [{"class": "star", "count": 3}], "prompt": "a photo of two stars"}
    dets = [det("star", 0.95, (0, 0, 10, 10)), det("star", 0.91, (20, 0, 30, 10)),
            det("star", 0.85, (40, 0, 50, 10))]
    assert geneval.evaluate_image(rec, dets) == (True, "")
    # exactly 0.9 is not above the threshold
    ok, reason = geneval.evaluate_image(rec, dets[:1] + [det("star", 0.9, (20, 0, 30, 10))])
    assert not ok and reason == "expected star>=2, found 1"
    # the same three detections under a non-counting tag: 3 kept, the exclude clause fires
    ok, reason = geneval.evaluate_image({**rec, "tag": "two_object"}, dets)
    assert not ok and reason == "expected star<3, found 3"


def test_threshold_0_3_for_other_tags():
    rec = {"tag": "single_object", "include": [{"class": "heart", "count": 1}], "prompt": "x"}
    assert geneval.evaluate_image(rec, [det("heart", 0.31, (0, 0, 10, 10))])[0]
    assert not geneval.evaluate_image(rec, [det("heart", 0.3, (0, 0, 10, 10))])[0]
    assert not geneval.evaluate_image(rec, [det("circle", 0.99, (0, 0, 10, 10))])[0]


def test_exclude_clause_and_max_16_per_class():
    rec = {"tag": "counting", "include": [{"class": "cross", "count": 4}],
           "exclude": [{"class": "cross", "count": 5}], "prompt": "a photo of four crosses"}
    five = [det("cross", 0.99, (i * 10, 0, i * 10 + 8, 8)) for i in range(5)]
    ok, reason = geneval.evaluate_image(rec, five)
    assert not ok and reason == "expected cross<5, found 5"
    many = [det("cross", 0.5 + i / 100, (i, 0, i + 1, 1)) for i in range(20)]
    groups = geneval.group_detections(many, 0.3)
    assert len(groups["cross"]) == 16
    assert [d["confidence"] for d in groups["cross"]] == sorted(
        [d["confidence"] for d in many], reverse=True)[:16]
    rec17 = {"tag": "two_object", "include": [], "exclude": [{"class": "cross", "count": 17}]}
    assert geneval.evaluate_image(rec17, many)[0]  # only 16 are ever kept


def test_colour_checked_on_most_confident_only():
    rec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
           "prompt": "a photo of a red circle"}
    dets = [det("circle", 0.5, (0, 0, 10, 10), "red"), det("circle", 0.9, (20, 0, 30, 10), "blue")]
    ok, reason = geneval.evaluate_image(rec, dets)
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 blue"
    assert geneval.evaluate_image({**rec, "include": [{**rec["include"][0], "color": "blue"}]}, dets)[0]
    # the colour hook replaces the detection's colour field
    assert geneval.evaluate_image(rec, dets, colour_fn=lambda ds, cls: ["red"] * len(ds))[0]


def test_score_partial_values():
    counting = {"tag": "counting", "include": [{"class": "star", "count": 2}],
                "exclude": [{"class": "star", "count": 3}], "prompt": "x"}
    stars = [det("star", 0.99, (i * 12, 0, i * 12 + 10, 10)) for i in range(6)]
    for form in geneval.PARTIAL_FORMS:  # where the two forms agree
        assert geneval.score_partial(counting, stars[:2], form=form) == 1.0
        assert geneval.score_partial(counting, stars[:3], form=form) == 0.5
        assert geneval.score_partial(counting, stars[:1], form=form) == 0.5
        assert geneval.score_partial(counting, [], form=form) == 0.0
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "star", "count": 1, "color": "blue"}],
            "prompt": "x"}
    both = [det("circle", 0.9, (0, 0, 10, 10), "red"), det("star", 0.9, (20, 0, 30, 10), "green")]
    assert geneval.score_partial(attr, both) == pytest.approx(0.75)  # [1, 1, 1, 0]
    assert geneval.score_partial(attr, both[:1]) == pytest.approx(0.5)  # [1, 1, 0, 0]
    pos = position_record("left of")
    right = [det("circle", 0.9, (30, 0, 40, 10)), det("star", 0.9, (0, 0, 10, 10))]
    assert geneval.score_partial(pos, right) == 1.0  # [1, 1, 1]
    assert geneval.score_partial(pos, [det("star", 0.9, (0, 0, 10, 10))]) == pytest.approx(1 / 3)  # no target: [0, 1, 0]
    # Where they differ. Flow-GRPO's count term goes negative past twice the count...
    assert geneval.score_partial(counting, stars) == -1.0  # 1 - 4/2
    assert geneval.score_partial(counting, stars, form="clipped") == 0.0
    # ...and a failed position clause appends 0 and then 1.
    wrong = [det("circle", 0.9, (0, 0, 10, 10)), det("star", 0.9, (30, 0, 40, 10))]
    assert geneval.score_partial(pos, wrong) == pytest.approx(3 / 4)  # [1, 1, 0, 1]
    assert geneval.score_partial(pos, wrong, form="clipped") == pytest.approx(2 / 3)  # [1, 1, 0]
    with pytest.raises(ValueError, match="partial-credit form"):
        geneval.score_partial(pos, wrong, form="flowgrpo")


def test_summarise_means_per_tag_accuracies():
    out = geneval.summarise(["a", "a", "a", "a", "b"], [True, False, False, False, True])
    assert out["per_tag"] == {"a": 0.25, "b": 1.0}
    assert out["overall"] == pytest.approx(0.625)
    with pytest.raises(ValueError):
        geneval.summarise(["a"], [])


def test_reads_official_metadata_format(tmp_path):
    lines = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
         "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "clock", "count": 2}],
         "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
        {"tag": "position", "include": [{"class": "tv remote", "count": 1},
                                        {"class": "cat", "count": 1, "position": ["right of", 0]}],
         "prompt": "a photo of a cat right of a tv remote"},
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = geneval.load_metadata(path)
    assert recs == lines
    dets = [det("tv remote", 0.8, (0, 0, 20, 10)), det("cat", 0.7, (40, 0, 60, 30)),
            det("clock", 0.95, (0, 40, 10, 50)), det("clock", 0.92, (20, 40, 30, 50)),
            det("bench", 0.4, (0, 50, 30, 60))]
    assert [geneval.evaluate_image(r, dets)[0] for r in recs] == [True, True, True]


# The three numeric edge cases where GenEval's evaluate_images.py (float32 mmdet arrays, numpy
# 1.23) decides differently from float64 Python, with the official verdicts (issue 12).


def test_a_score_of_exactly_float32_0_3_is_not_above_the_threshold():
    rec = {"tag": "single_object", "include": [{"class": "sports ball", "count": 1}],
           "prompt": "a photo of a sports ball"}
    at_threshold = 0.30000001192092896  # float32(0.3), above the float64 0.3
    assert at_threshold > 0.3
    assert geneval.evaluate_image(rec, [det("sports ball", at_threshold, (10, 10, 50, 50))])[0] is False
    assert geneval.evaluate_image(rec, [det("sports ball", 0.3000001, (10, 10, 50, 50))])[0] is True  # next float32 up


def test_tied_scores_are_visited_in_reverse_detector_order():
    rec = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "white"}],
           "prompt": "a photo of a white fire hydrant"}
    white = det("fire hydrant", 0.39215785, (10, 10, 50, 80), "white")
    purple = det("fire hydrant", 0.39215785, (60, 10, 100, 80), "purple")
    # argsort()[::-1] puts the purple one (listed second) first: only it is checked for colour.
    assert geneval.evaluate_image(rec, [white, purple])[0] is False
    assert geneval.evaluate_image(rec, [purple, white])[0] is True
    assert geneval.keep_detections([white, purple], rec)["fire hydrant"] == [purple, white]


def test_nms_compares_the_iou_as_the_official_code_does():
    """GenEval's compute_iou adds a Python 1 to float32 differences, which numpy 1.23 (its pinned
    version) makes float64, and compares with a Python float. Two boxes whose IoU lies within a
    float32 step of 0.7 (found by a review against the official code under numpy 1.23): float32
    arithmetic decided both the other way."""
    rec = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
           "prompt": "a photo of two dogs"}
    rules = geneval.Rules(max_overlap=0.7)
    side = 265.67437744140625
    for right, both_kept in ((185.67205810546875, True), (185.6720733642578, False)):  # IoU 0.69999997711, 0.70000003433
        dogs = [det("dog", 0.95, (0, 0, side, side)), det("dog", 0.94, (0, 0, right, side))]
        assert len(geneval.keep_detections(dogs, rec, rules)["dog"]) == (2 if both_kept else 1)
    assert geneval.iou((0, 0, side, side), (0, 0, 185.67205810546875, side)) == pytest.approx(0.69999997711, abs=1e-11)


def test_position_offsets_are_float32_so_dx_can_be_exactly_one_half():
    rec = {"tag": "position", "include": [{"class": "zebra", "count": 1},
                                          {"class": "chair", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a chair left of a zebra"}
    # The boxes as a detector gives them: float32 values (mmdet's arrays), here as Python floats.
    chair = det("chair", 0.9, tuple(float(v) for v in np.float32([53.747654, 330.5196, 166.53467, 407.79544])))
    zebra = det("zebra", 0.9, tuple(float(v) for v in np.float32([213.62193, 139.13342, 260.1361, 235.58328])))
    # float64 arithmetic on these values gives dx just below -0.5 ("left of"); float32 gives -0.5.
    assert geneval.relative_position(chair["box"], zebra["box"]) == {"below"}
    ok, reason = geneval.evaluate_image(rec, [chair, zebra])
    assert ok is False and reason == "expected chair left of target, found below target"
