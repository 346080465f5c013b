"""The ``sd`` suite: configuration, prompt files, GenEval rewards with real (tiny, random) models.

Offline: OWLv2 and open_clip models are built from tiny configs with random weights and saved to
tmp_path; the GenEval rules are checked exactly with a fake detector and a fake colour function.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from opd_bench import rewards, suites
from opd_bench.benchmarks import PromptFileError
from opd_bench.cli import main
from opd_bench.registry import UnknownNameError, UnknownOptionError
from opd_bench.rewards.geneval_sd import COCO_CLASSES, ClipColourClassifier, OwlV2Detector
from opd_bench.suites import sd
from opd_bench.weights import MissingPackageError, MissingWeightsError
from tiny_real_models import build_colour_clip, build_owlv2

# Lines in the official evaluation_metadata.jsonl format (as GenEval's create_prompts.py writes them).
OFFICIAL = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"}',
    '{"tag": "position", "include": [{"class": "tv", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a tv"}',
]
COUNTING, POSITION = json.loads(OFFICIAL[1]), json.loads(OFFICIAL[2])
COLOURS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}


@pytest.fixture(autouse=True)
def no_sd_config(monkeypatch):
    monkeypatch.delenv(sd.CONFIG_ENV, raising=False)
    monkeypatch.setattr(sd, "_CONFIG", None)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# suite configuration and prompt files


def test_sd_suite_uses_the_papers_evaluation_sampler():
    suite = suites.get("sd")
    assert suite.tasks == ("geneval", "ocr", "pref")
    assert (suite.num_steps, suite.guidance_scale, suite.noise_level, suite.resolution) == (40, 4.5, 0.0, 512)
    assert suite.default_model == "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(UnknownNameError, match="geneval, ocr, pref"):
        suite.benchmark("genevl")
    with pytest.raises(ValueError, match="takes no configuration"):
        suites.configure("tiny", {})


def test_official_geneval_metadata_parses_into_the_geneval_benchmark(tmp_path):
    metadata = write(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    suites.configure("sd", geneval={"test": str(metadata), "model_path": "/w/owlv2"}, device="cuda")
    spec = suites.get("sd").benchmark("geneval")
    prompts = spec.prompts()
    assert [p.metadata["tag"] for p in prompts] == ["single_object", "counting", "position"]
    assert prompts[2].metadata["include"][1]["position"] == ["right of", 0] and prompts[2].task == "geneval"
    assert len(spec.prompts(limit=2)) == 2 and len(spec.file_hash()) == 64
    assert (spec.key, spec.metric, spec.images_per_prompt) == ("sd/geneval", "geneval", 4)
    assert (spec.reward, spec.train_reward) == ("sd/geneval", "sd/geneval-partial")
    assert spec.reward_options == {"model_path": "/w/owlv2", "device": "cuda"} == spec.train_reward_options


def test_missing_metadata_gives_a_clear_error(tmp_path):
    with pytest.raises(sd.SuiteConfigError, match=r"geneval\.test .*evaluation_metadata\.jsonl .*djghosh13/geneval"):
        suites.get("sd").benchmark("geneval")
    suites.configure("sd", geneval={"test": str(tmp_path / "missing.jsonl")})
    with pytest.raises(PromptFileError, match="does not exist; get GenEval's prompts/evaluation_metadata.jsonl"):
        suites.get("sd").benchmark("geneval")
    with pytest.raises(sd.SuiteConfigError, match=r"unknown key\(s\) \['genevl'\]. Did you mean 'geneval'\? Expected"):
        suites.configure("sd", genevl={})
    with pytest.raises(sd.SuiteConfigError, match=r"unknown key\(s\) \['resolutoin'\]. Did you mean 'resolution'\?"):
        suites.configure("sd", {"resolutoin": 64})
    prompts = tmp_path / "pref.txt"
    prompts.write_text("a cat\n")
    suites.configure("sd", pref={"test": str(prompts), "pickscroe": {}})
    with pytest.raises(sd.SuiteConfigError, match=r"pref has unknown key\(s\) \['pickscroe'\]. Did you mean 'pickscore'\?"):
        suites.get("sd").benchmark("pref")


def test_config_file_from_the_environment_ocr_and_pref(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "ocr.txt", ['A sign that says "Open"', "", "A mug with \u201cHELLO\u201d printed on it"])
    write(tmp_path / "data" / "pick.txt", ["a cat in a hat", "a red bicycle at dawn"])
    config = {
        "device": "cpu",
        "ocr": {"test": "data/ocr.txt", "engine": "rapidocr"},  # relative to the config file
        "pref": {"test": "data/pick.txt", "pickscore": {"model_path": "/w/pick", "processor_path": "/w/proc"},
                 "hpsv2": {"model_path": str(tmp_path / "no-hps")}},
    }
    (tmp_path / "sd.json").write_text(json.dumps(config))
    monkeypatch.setenv(sd.CONFIG_ENV, str(tmp_path / "sd.json"))
    suite = suites.get("sd")
    ocr = suite.benchmark("ocr")
    assert [p.text for p in ocr.prompts()] == ['A sign that says "Open"', "A mug with \u201cHELLO\u201d printed on it"]
    assert ocr.reward == "ocr" and ocr.reward_options == {"upscale": 1, "pad": 0, "engine": "rapidocr"}
    pref = suite.benchmark("pref")
    assert pref.reward == "pickscore" and len(pref.prompts()) == 2
    assert pref.reward_options == {"model_path": "/w/pick", "processor_path": "/w/proc", "device": "cpu"}
    assert pref.extra_rewards == {"hpsv2": "sd/hpsv2"}
    with pytest.raises(MissingWeightsError, match="no-hps"):  # sd/hpsv2 = hpsv2 with the configured options
        rewards.get("sd/hpsv2")
    # an OCR prompt without quoted text is refused; JSON lines work too
    write(tmp_path / "data" / "ocr.txt", ['A sign that says "Open"', "a blank sign"])
    with pytest.raises(PromptFileError, match="'a blank sign' has no text in double quotes"):
        suite.benchmark("ocr").prompts()
    write(tmp_path / "ocr.jsonl", [json.dumps({"prompt": 'a cup with "tea"'})])
    suites.configure("sd", ocr={"test": str(tmp_path / "ocr.jsonl")}, geneval={"test": str(tmp_path / "sd.json"),
                     "reward": ["remote", {"url": "http://gpu:8701/"}]})
    assert suite.benchmark("ocr").prompts()[0].metadata["prompt"] == 'a cup with "tea"'
    geneval_spec = suite.benchmark("geneval")
    assert (geneval_spec.reward, geneval_spec.reward_options) == ("remote", {"url": "http://gpu:8701/"})
    with pytest.raises(sd.SuiteConfigError, match="pref.pickscore"):
        suites.configure("sd", pref={"test": str(tmp_path / "data" / "pick.txt")})
        suite.benchmark("pref")


def test_config_mistakes_are_one_line_errors_before_anything_loads(tmp_path):
    metadata = write(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    text = write(tmp_path / "ocr.txt", ['A sign that says "Open"'])
    suites.configure("sd", ocr={"test": str(text), "tset": "x"})
    with pytest.raises(sd.SuiteConfigError, match=r"ocr.tset is not an option of the 'ocr' reward. Did you mean 'test'\?"):
        suites.get("sd").benchmark("ocr")
    suites.configure("sd", pref={"test": str(text), "pickscore": {"model_path": "/w", "procesor_path": "/p"}})
    with pytest.raises(sd.SuiteConfigError, match=r"pref.pickscore.procesor_path .* Did you mean 'processor_path'\?"):
        suites.get("sd").benchmark("pref")
    suites.configure("sd", geneval={"test": str(metadata), "model_pth": "/w"})
    with pytest.raises(sd.SuiteConfigError, match=r"geneval.model_pth .* Did you mean 'model_path'\?"):
        suites.get("sd").benchmark("geneval")
    suites.configure("sd", geneval={"test": str(metadata), "train_reward": ["sd/geneval-partial", {"partal": "clipped"}]})
    with pytest.raises(sd.SuiteConfigError, match=r"geneval.train_reward.partal .* Did you mean 'partial'\?"):
        suites.get("sd").benchmark("geneval")
    suites.configure("sd", geneval={"test": str(metadata), "reward": ["remote", {}]})  # a TypeError once the model had loaded
    with pytest.raises(sd.SuiteConfigError, match=r"geneval.reward.url is missing; the 'remote' reward needs it"):
        suites.get("sd").benchmark("geneval")
    # GenEval's rule options by value: a string threshold compared as text or failed mid-scoring
    for options, problem in (({"threshold": "0.3"}, r"geneval.threshold must be a number between 0 and 1, got '0.3'"),
                             ({"max_objects": 2.5}, r"geneval.max_objects must be a whole number of at least 1, got 2.5"),
                             ({"partial": "clip"}, r"geneval.partial must be one of .*, got 'clip'")):
        suites.configure("sd", geneval={"test": str(metadata), **options})
        with pytest.raises(sd.SuiteConfigError, match=problem):
            suites.get("sd").benchmark("geneval")
    with pytest.raises(ValueError, match=r"'owlv2' \(detector_options\) has no option 'min_confidnce'"):
        rewards.get("sd/geneval", detector_options={"min_confidnce": 0.1}, colour=fake_colour([]))
    with pytest.raises(sd.SuiteConfigError, match="device 'gpu' is not a device"):
        suites.configure("sd", {"device": "gpu"})
    for side in (63, "512", 0):
        with pytest.raises(sd.SuiteConfigError, match="resolution must be an image side in pixels, a multiple of 8"):
            suites.configure("sd", {"resolution": side})
    # a record the rules cannot read is named before any image is drawn (it failed while scoring, or scored 0)
    for include, problem in (
        ([{"class": "car", "count": 1, "color": "purplish"}], r"include\[0\] asks for the colour 'purplish'; GenEval's colour classifier knows red, "),
        ([{"class": "car"}], r"include\[0\].count must be an integer >= 1, got None"),
        ([{"class": "car", "count": "two"}], r"include\[0\].count must be an integer >= 1, got 'two'"),
        ("bench", r"'include' must be a non-empty list"),
        ([{"class": "tv", "count": 1}, {"class": "dog", "count": 1, "position": ["beside", 0]}], r"include\[1\].position must be"),
        ([{"class": "tv", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 1]}], r"include\[1\].position must be"),
    ):
        bad = write(tmp_path / "bad.jsonl", [json.dumps({**COLOURS, "include": include})])
        suites.configure("sd", geneval={"test": str(bad)})
        with pytest.raises(PromptFileError, match=problem):
            suites.get("sd").benchmark("geneval").prompts()
    # GenEval's rules need its metadata: a plain prompt list is refused, not scored as NaN
    suites.configure("sd", geneval={"test": str(text)})
    with pytest.raises(PromptFileError, match=r"needs JSON lines with the fields \['prompt', 'tag', 'include'\]"):
        suites.get("sd").benchmark("geneval").prompts()


def test_a_prompt_file_that_is_not_a_path_is_a_config_error():
    for task, key, value in (("ocr", "test", 5), ("geneval", "train", ["a.jsonl"])):  # a TypeError traceback
        with pytest.raises(sd.SuiteConfigError, match=re.escape(f"sd suite config: {task}.{key} must be a prompt file's "
                                                                f"path (a string), got {value!r}")):
            suites.configure("sd", {task: {key: value}})


def test_keys_that_a_replaced_reward_would_drop_are_refused_or_read_by_the_default_left(tmp_path):
    """A section's other keys are options of its default rewards; a reward named in `reward` takes its
    own inside it. Keys no default reward reads any more were dropped without a word."""
    metadata = write(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    text = write(tmp_path / "prompts.txt", ['A sign that says "Open"'])
    remote = ["remote", {"url": "http://gpu:8701/"}]
    suites.configure("sd", ocr={"test": str(text), "reward": "ocr", "engine": "paddleocr"})
    with pytest.raises(sd.SuiteConfigError) as error:
        suites.get("sd").benchmark("ocr")
    assert str(error.value) == ("sd suite config: ocr.engine is an option of the section's default reward, replaced here by "
                                'ocr.reward; give a reward its options inside it, e.g. "reward": ["ocr", {"engine": ...}]')
    suites.configure("sd", ocr={"test": str(text), "reward": ["ocr", {"engine": "paddleocr"}]})
    assert suites.get("sd").benchmark("ocr").reward_options["engine"] == "paddleocr"
    # GenEval's default training reward still reads them: checked against it, and kept for it
    suites.configure("sd", geneval={"test": str(metadata), "reward": remote, "model_pth": "/w"})
    with pytest.raises(sd.SuiteConfigError, match=r"geneval.model_pth is not an option of the 'sd/geneval-partial' reward"):
        suites.get("sd").benchmark("geneval")
    suites.configure("sd", geneval={"test": str(metadata), "reward": remote, "model_path": "/w"})
    assert suites.get("sd").benchmark("geneval").reward_of("train") == ("sd/geneval-partial", {"model_path": "/w"})
    suites.configure("sd", geneval={"test": str(metadata), "reward": remote, "train_reward": remote, "model_path": "/w"})
    with pytest.raises(sd.SuiteConfigError, match="geneval.model_path is an option of the section's default reward, "
                       "replaced here by geneval.reward and geneval.train_reward"):
        suites.get("sd").benchmark("geneval")
    # pref: PickScore's options go with PickScore; the scores beside it are still checked
    suites.configure("sd", pref={"test": str(text), "reward": remote, "pickscore": {"model_path": "/w"}})
    with pytest.raises(sd.SuiteConfigError, match="pref.pickscore is an option of the section's default reward, replaced "
                       r"here by pref.reward; drop it, or name PickScore with its options: \"reward\": \[\"pickscore\""):
        suites.get("sd").benchmark("pref")
    suites.configure("sd", pref={"test": str(text), "reward": remote, "hpsv2": {"model_pth": "/w"}})
    with pytest.raises(sd.SuiteConfigError, match=r"pref.hpsv2.model_pth is not an option of the 'hpsv2' reward"):
        suites.get("sd").benchmark("pref")


def test_the_recorded_settings_leave_out_where_a_reward_runs_and_a_remote_token(tmp_path):
    metadata = write(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    suites.configure("sd", geneval={"test": str(metadata), "device": "cpu",
                                    "reward": ["remote", {"url": "http://gpu:8701/", "token": "sekrit", "device": "cpu"}]})
    recorded = suites.get("sd").settings()["geneval"]
    assert recorded["reward"] == ["remote", {"url": "http://gpu:8701/"}] and "device" not in recorded
    assert "sekrit" not in json.dumps(suites.get("sd").settings())


def test_the_config_can_set_the_evaluation_guidance_for_flux_dev():
    from opd_bench.evaluate import SamplerSettings

    suite = suites.get("sd")
    assert suite.evaluation_guidance() == 4.5 and "guidance_scale" not in suite.settings()
    suites.configure("sd", {"guidance_scale": 3.5})
    assert suite.evaluation_guidance() == 3.5 == SamplerSettings.of_suite(suite).guidance_scale
    assert suite.settings()["guidance_scale"] == 3.5  # a part of the run's identity: other guidance, other scores
    for bad in (0, -1, "3.5", True):
        with pytest.raises(sd.SuiteConfigError, match="guidance_scale must be a positive number"):
            suites.configure("sd", {"guidance_scale": bad})


def test_evaluation_needs_no_train_file_and_weights_sit_next_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "weights" / "pick").mkdir(parents=True)
    write(tmp_path / "data" / "pick.txt", ["a cat in a hat"])
    config = {"pref": {"test": "data/pick.txt", "pickscore": {"model_path": "weights/pick", "processor_path": "org/hub-id"}}}
    (tmp_path / "sd.json").write_text(json.dumps(config))
    suites.configure("sd", tmp_path / "sd.json")
    spec = suites.get("sd").benchmark("pref")
    assert len(spec.prompts()) == 1  # no train file: an evaluation reads none
    with pytest.raises(sd.SuiteConfigError, match=r"no train prompt file, which training needs: set pref.train .*pickscore/train.txt"):
        spec.prompts("train")
    # a relative weight path that exists next to the file is taken from there; another stays as given
    assert spec.reward_options["model_path"] == str(tmp_path / "weights" / "pick")
    assert spec.reward_options["processor_path"] == "org/hub-id"
    config["pref"]["pickscore"]["model_path"] = "weights/missing"  # its folder is there: named where looked for
    (tmp_path / "sd.json").write_text(json.dumps(config))
    suites.configure("sd", tmp_path / "sd.json")
    assert suites.get("sd").benchmark("pref").reward_options["model_path"] == str(tmp_path / "weights" / "missing")


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None, reason="paddleocr is installed")
def test_paddleocr_engine_is_registered_and_says_how_to_install():
    from opd_bench.rewards.ocr import ENGINES, build_engine

    assert "paddleocr" in ENGINES
    with pytest.raises(MissingPackageError, match="pip install paddleocr"):
        build_engine("paddleocr")


# ---------------------------------------------------------------------------------------------
# GenEval rules through the reward, with a fake detector and a fake colour function


class FakeDetector:
    def __init__(self, per_image):
        self.per_image, self.calls = per_image, []

    def detect(self, images, class_names):
        self.calls.append((images.shape[0], tuple(class_names)))
        return [[dict(d) for d in dets] for dets in self.per_image]


def dog(conf, box):
    return {"class": "dog", "confidence": conf, "box": box}


def fake_colour(seen):
    """Red or blue by the mean colour inside the box of the uint8 image the reward passes."""
    def colour(image, dets, classname):
        arr = np.asarray(image).astype(float)
        seen.extend(dets)
        out = []
        for d in dets:
            x0, y0, x1, y1 = (int(v) for v in d["box"])
            mean = arr[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            out.append("red" if mean[0] > mean[2] else "blue")
        return out
    return colour


def geneval_batch():
    images = torch.zeros(7, 3, 64, 64)
    images[4, 0, 10:30, 10:30] = 1.0  # a red car
    images[5, 2, 10:30, 10:30] = 1.0  # a blue car
    tv, right, left, car = (0, 20, 20, 40), (40, 20, 60, 40), (2, 44, 18, 60), (10, 10, 30, 30)
    detections = [
        [dog(0.95, (0, 0, 10, 10)), dog(0.93, (30, 30, 40, 40)), dog(0.5, (50, 0, 60, 10))],  # 2 kept at 0.9
        [dog(0.95, (0, 0, 10, 10)), dog(0.95, (30, 30, 40, 40)), dog(0.95, (50, 0, 60, 10))],  # 3: excluded
        [{"class": "tv", "confidence": 0.8, "box": tv}, dog(0.7, right)],
        [{"class": "tv", "confidence": 0.8, "box": tv}, dog(0.7, left)],
        [{"class": "car", "confidence": 0.6, "box": car}],
        [{"class": "car", "confidence": 0.6, "box": car}],
    ]
    metadata = [COUNTING, COUNTING, POSITION, POSITION, COLOURS, COLOURS, {"prompt": "not geneval"}]
    return images, [m.get("prompt", "") for m in metadata], metadata, detections


def test_strict_and_partial_geneval_rewards_apply_the_rules():
    images, prompts, metadata, detections = geneval_batch()
    detector, seen = FakeDetector(detections), []
    strict = rewards.get("sd/geneval", detector=detector, colour=fake_colour(seen))
    out = strict(images, prompts, metadata)
    assert out.scores[:6].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] and math.isnan(out.scores[6])
    assert detector.calls == [(6, COCO_CLASSES)]  # only GenEval records reach the detector, with all 80 classes
    assert out.details["reason"][1] == "expected dog<3, found 3"
    assert out.details["reason"][5].startswith("expected red car>=1, found 0 red")
    seen.clear()
    partial = rewards.get("sd/geneval-partial", detector=FakeDetector(detections), colour=fake_colour(seen))
    scores = partial(images, prompts, metadata).scores
    # Flow-GRPO's form (the default): a failed position clause appends 0 and 1, [1, 1, 0, 1].
    torch.testing.assert_close(scores[:6], torch.tensor([1.0, 0.5, 1.0, 3 / 4, 1.0, 0.5]))
    assert len(seen) == 2  # each car classified once, though the strict and partial rules both ask
    clipped = rewards.get("sd/geneval-partial", detector=FakeDetector(detections), colour=fake_colour([]), partial="clipped")
    torch.testing.assert_close(clipped(images, prompts, metadata).scores[:6], torch.tensor([1.0, 0.5, 1.0, 2 / 3, 1.0, 0.5]))


def test_geneval_options_are_the_official_evaluators():
    images, prompts, metadata, _ = geneval_batch()
    overlapping = [[dog(0.95, (0, 0, 20, 20)), dog(0.94, (1, 1, 21, 21))]]
    options = dict(detector=FakeDetector(overlapping), colour=fake_colour([]))
    assert rewards.get("sd/geneval", **options)(images[:1], prompts[:1], [COUNTING]).scores.item() == 1.0
    nms = rewards.get("sd/geneval", max_overlap=0.5, **options)  # GenEval's max_overlap NMS keeps one dog
    assert nms(images[:1], prompts[:1], [COUNTING]).scores.item() == 0.0
    strict_count = rewards.get("sd/geneval", counting_threshold=0.99, **options)
    assert strict_count(images[:1], prompts[:1], [COUNTING]).scores.item() == 0.0


# ---------------------------------------------------------------------------------------------
# real backends with tiny random models


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    return build_owlv2(tmp_path_factory.mktemp("owlv2"))


def test_owlv2_backend_detects_with_the_detection_structure(owlv2_dir):
    detector = OwlV2Detector(str(owlv2_dir), device="cpu", min_confidence=0.0, batch_size=2)
    names = ["dog", "tv", "computer keyboard"]
    found = detector.detect(torch.rand(3, 3, 64, 64), names)
    assert len(found) == 3 and all(found)
    for dets in found:
        assert [d["confidence"] for d in dets] == sorted((d["confidence"] for d in dets), reverse=True)
        for d in dets:
            assert set(d) == {"class", "confidence", "box"} and d["class"] in names and 0 <= d["confidence"] <= 1
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    # the registered reward builds the same backend from model_path
    reward = rewards.get("sd/geneval-partial", model_path=str(owlv2_dir), device="cpu", colour=fake_colour([]))
    out = reward(torch.rand(2, 3, 64, 64), ["a photo of a dog", "x"], [POSITION, {}])
    assert 0 <= out.scores[0] <= 1 and math.isnan(out.scores[1])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_colour_clip(tmp_path_factory.mktemp("clip"))


def test_clip_colour_classifier_on_masked_crops(tiny_clip):
    from PIL import Image

    name, folder = tiny_clip
    classifier = ClipColourClassifier(name, str(folder), device="cpu")  # a folder with open_clip weights
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 20:40] = True
    dets = [{"class": "car", "confidence": 0.9, "box": (10, 10, 50, 50), "mask": mask},
            {"class": "car", "confidence": 0.8, "box": (0.4, 0, 30.6, 20)}]
    colours = classifier(image, dets, "car")
    assert len(colours) == 2 and set(colours) <= set(sd_colours())
    weights = classifier._classifier("car")
    assert weights.shape == (16, 10) and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(10))
    assert ClipColourClassifier(name, str(folder / "open_clip_pytorch_model.bin"), device="cpu")(image, dets[1:], "car")[0] in sd_colours()
    assert classifier(image, [], "car") == []


def sd_colours():
    from opd_bench.geneval import COLORS

    return COLORS


def test_missing_weights_give_clear_errors(tmp_path, owlv2_dir):
    with pytest.raises(MissingWeightsError, match="OWLv2 detector weights not found: .*does not exist"):
        OwlV2Detector(str(tmp_path / "owl"))
    with pytest.raises(MissingWeightsError, match=r"PickScore weights in .* are of model type 'owlv2' \(config.json\), not 'clip'"):
        rewards.get("pickscore", model_path=str(owlv2_dir), processor_path=str(owlv2_dir))
    with pytest.raises(MissingWeightsError, match="GenEval colour classifier .*does not exist"):
        ClipColourClassifier(model_path=str(tmp_path / "clip"))
    for name, what in (("pickscore", "PickScore"), ("clipscore", "CLIPScore"), ("hpsv2", "HPS v2.1"), ("imagereward", "ImageReward")):
        with pytest.raises(MissingWeightsError, match=f"{what} weights not found"):  # located without building
            rewards.locate_weights(name, {"model_path": str(tmp_path / name)})
    with pytest.raises(MissingWeightsError, match=r"`hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir "):  # one file, not the repo
        rewards.locate_weights("hpsv2", {"model_path": str(tmp_path / "hps")})
    with pytest.raises(UnknownOptionError, match="model_pth"):
        rewards.locate_weights("hpsv2", {"model_pth": "x"})
    # a device this machine lacks (the suite config's "device" reaches every reward) stops before any image
    with pytest.raises(ValueError, match=r"reward 'pickscore': cuda:99: this machine has .*GPU.*suite config's \"device\""):
        rewards.locate_weights("pickscore", {"model_path": str(owlv2_dir), "device": "cuda:99"})
    with pytest.raises(MissingWeightsError, match="OWLv2 detector weights not found"):
        rewards.locate_weights("sd/geneval-partial", {"model_path": str(tmp_path / "owl")})
    with pytest.raises(MissingWeightsError, match="GenEval colour classifier .*does not exist"):
        rewards.locate_weights("sd/geneval", {"model_path": str(owlv2_dir), "clip_model_path": str(tmp_path / "clip")})
    with pytest.raises(MissingWeightsError, match=r"Mask2Former \(GenEval detector\) checkpoint weights not found"):
        rewards.locate_weights("sd/geneval-mmdet", {"model_path": str(tmp_path / "m2f.pth")})  # located without mmdet
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no open_clip checkpoint"):
        ClipColourClassifier(model_path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="known detectors: mmdet, owlv2"):
        rewards.get("sd/geneval", detector="yolo", colour=fake_colour([]))
    if importlib.util.find_spec("mmdet") is None:
        with pytest.raises(MissingPackageError, match="needs mmdet"):
            rewards.get("sd/geneval-mmdet", model_path=str(tmp_path / "m2f.pth"), colour=fake_colour([]))
        # the server says it in one line (it printed a 44-line traceback)
        served = CliRunner().invoke(main, ["serve-reward", "sd/geneval-mmdet", "--option", f"model_path={tmp_path / 'm2f.pth'}"])
        assert served.exit_code == 1 and "needs mmdet" in served.output and len(served.output.splitlines()) == 1, served.output
