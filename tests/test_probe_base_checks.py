"""The base checks behind probes D1, D2 and U1-U4 (issue 11): the minimal prompt edits are the ones
each GenEval tag turns on, the word-use ratio is exactly 1 where the edit changes nothing, the object
count and kept share are the detector's, and a continued pretraining changes the denoiser only."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from opd_bench.policy import Policy
from opd_bench.tiny.pretrain import PretrainConfig
from opd_bench.world.render import render


def record(tag, prompt, include):
    return {"tag": tag, "prompt": prompt, "include": include}


@pytest.fixture()
def text_use(benchmark_script):
    return benchmark_script("probe_text_use")


def test_each_edit_changes_the_one_word_its_tag_turns_on(text_use):
    rng = np.random.default_rng(0)
    edit = lambda r: text_use.edited_prompt(r, rng)  # noqa: E731
    assert edit(record("position", "a photo of a star left of a heart",
                       [{"class": "heart", "count": 1}, {"class": "star", "count": 1, "position": ["left of", 0]}])) \
        == "a photo of a star right of a heart"
    assert edit(record("position", "a photo of a cross below a heart", [])) == "a photo of a cross above a heart"
    colours = [{"class": "diamond", "count": 1, "color": "red"}, {"class": "cross", "count": 1, "color": "orange"}]
    assert edit(record("color_attr", "a photo of a red diamond and an orange cross", colours)) \
        == "a photo of an orange diamond and a red cross"  # articles follow the swapped colours
    same = [{"class": "diamond", "count": 1, "color": "red"}, {"class": "cross", "count": 1, "color": "red"}]
    assert edit(record("color_attr", "a photo of a red diamond and a red cross", same)) is None
    for _ in range(10):
        counted = edit(record("counting", "a photo of three triangles", [{"class": "triangle", "count": 3}]))
        assert counted in ("a photo of two triangles", "a photo of four triangles")
        two = edit(record("two_object", "a photo of a circle and a heart", [{"class": "circle", "count": 1}, {"class": "heart", "count": 1}]))
        first, _, second = two.removeprefix("a photo of a ").partition(" and a ")
        assert first == "circle" and second not in ("circle", "heart")
        single = edit(record("single_object", "a photo of a square", [{"class": "square", "count": 1}]))
        assert single.startswith("a photo of a") and single != "a photo of a square"


def test_every_test_prompt_edit_changes_only_the_words_of_its_tag(text_use):
    from opd_bench import suites

    for k, prompt in enumerate(suites.get("tiny").benchmark("geneval").prompts("test")):
        meta = prompt.metadata
        edited = text_use.edited_prompt(meta, np.random.default_rng(k))
        changed = {(a, b) for a, b in zip(prompt.text.split(), edited.split(), strict=True) if a != b}
        words = {w for pair in changed for w in pair} - {"a", "an"}
        if meta["tag"] == "color_attr":  # the two colours trade places (and an article may follow)
            assert words == {c["color"] for c in meta["include"]}, (prompt.text, edited)
        elif meta["tag"] == "position":
            assert words in ({"left", "right"}, {"above", "below"}), (prompt.text, edited)
        else:
            assert len(words) == 2 and len(changed - {("a", "an"), ("an", "a")}) == 1, (prompt.text, edited)
        assert "a orange" not in edited and not any(f"an {c}" in edited for c in ("red", "blue", "green", "pink", "purple", "black", "white", "yellow", "brown"))


def test_the_word_use_ratio_is_one_when_the_edit_changes_nothing_and_high_when_the_shape_changes(text_use, monkeypatch):
    from opd_bench import suites

    base = Policy.from_pretrained(suites.resolve_model("tiny"))  # the shipped base reads a lone shape (D1: up to 2.45x)
    records = [record("single_object", f"a photo of a {shape}", [{"class": shape, "count": 1}]) for shape in ("star", "heart", "square")]
    assert text_use.edit_ratios(base, records, noise_seeds=1)[0.8] > 1.5  # images paired with the wrong prompts would fall below 1
    monkeypatch.setattr(text_use, "edited_prompt", lambda r, rng: r["prompt"])
    assert text_use.edit_ratios(base, records, noise_seeds=1) == {s: 1.0 for s in text_use.EDIT_SIGMAS}
    assert text_use.context_change(base, records) == 0.0


def test_object_stats_count_the_detectors_objects_and_the_share_it_keeps(benchmark_script):
    quality = benchmark_script("probe_object_quality")
    two = record("two_object", "a photo of a circle and a heart", [{"class": "circle", "count": 1}, {"class": "heart", "count": 1}])
    renders = quality.object_stats([render(two, 0), render(two, 1)], [two, two])
    assert renders == {"objects_per_image": 2.0, "kept": 1.0, "median_confidence": pytest.approx(1.0, abs=0.05)}
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert quality.object_stats([blank], [two]) == {"objects_per_image": 0.0, "kept": 0.0, "median_confidence": 0.0}


def test_object_stats_keep_what_geneval_keeps_strictly_above_each_tags_threshold(benchmark_script, monkeypatch):
    quality = benchmark_script("probe_object_quality")
    shapes = [{"class": "circle", "confidence": c, "box": (0, 0, 10, 10), "color": "red"} for c in (0.3, 0.5, 0.95)]
    monkeypatch.setattr(quality, "detect", lambda image: shapes)
    single = record("single_object", "a photo of a circle", [{"class": "circle", "count": 1}])
    counting = record("counting", "a photo of three circles", [{"class": "circle", "count": 3}])
    assert quality.object_stats([None], [single]) == {"objects_per_image": 3.0, "kept": pytest.approx(2 / 3), "median_confidence": 0.5}
    assert quality.object_stats([None], [counting])["kept"] == pytest.approx(1 / 3)  # counting keeps only > 0.9


def test_self_sft_sigma_shift_moves_sigmas_towards_one_and_keeps_the_ends(benchmark_script):
    shifted = benchmark_script("probe_self_sft").shifted  # opd_bench.tiny.pretrain's, which pretraining uses too
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shifted(sigma, 1.0), sigma)
    assert torch.allclose(shifted(sigma, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_continued_pretraining_trains_the_denoiser_and_keeps_the_vae(benchmark_script, tiny_dir, tmp_path, monkeypatch, capsys):
    script = benchmark_script("probe_continue_pretrain")
    out = tmp_path / "continued"
    argv = ["probe_continue_pretrain.py", "--model", str(tiny_dir), "--out", str(out), "--steps", "2",
            "--set", "batch=4", "--set", "num_images=8", "--set", "warmup=1"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["denoiser_steps"] == 2 and info["continued_from"] == str(tiny_dir)
    assert info["overrides"] == ["batch=4", "num_images=8", "warmup=1"]
    vae_before, vae_after = (load_file(str(next((d / "vae").glob("*.safetensors")))) for d in (tiny_dir, out))
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    before, after = (load_file(str(next((d / "transformer").glob("*.safetensors")))) for d in (tiny_dir, out))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    Policy.from_pretrained(str(out))  # loads as any pipeline folder
    for args, problem in ((argv, "is not empty"),  # a finished folder is refused, not overwritten
                          (argv[:7] + ["--out", str(tmp_path / "new"), "--set", "num_layers=2"], "--set num_layers cannot change")):
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit):
            script.main()
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_continued_pretraining_on_one_tag_with_the_text_encoders_frozen(benchmark_script, tiny_dir, tmp_path, monkeypatch, capsys):
    script = benchmark_script("probe_continue_pretrain")
    out = tmp_path / "position"
    argv = ["probe_continue_pretrain.py", "--model", str(tiny_dir), "--out", str(out), "--steps", "2", "--only-tag", "position",
            "--freeze-text", "--set", 'mixture={"geneval": 1.0}', "--set", "batch=2", "--set", "num_images=30", "--set", "warmup=1", "--coloured-position"]
    monkeypatch.setattr(sys, "argv", argv)
    rendered = []
    render = script.render_dataset
    monkeypatch.setattr(script, "render_dataset", lambda records, seed: rendered.extend(records) or render(records, seed))
    script.main()
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["only_tag"] == "position" and info["text_encoders_trained"] is False and info["coloured_position"] is True
    assert rendered and all(r["tag"] == "position" and all("color" in c for c in r["include"]) for r in rendered)
    config = script.base_config(tiny_dir, 2)
    config = script.set_fields(config, argv[11::2])  # the same --set values
    records, _ = script.training_records(config)
    assert info["scenes"] == sum(r["tag"] == "position" for r in records) >= 2
    for part, changed in (("text_encoder", False), ("text_encoder_2", False), ("transformer", True)):
        before, after = (load_file(str(next((d / part).glob("*.safetensors")))) for d in (tiny_dir, out))
        assert any(not torch.equal(before[k], after[k]) for k in before) is changed, part
    monkeypatch.setattr(sys, "argv", argv[:3] + ["--out", str(tmp_path / "none")] + argv[5:8] + ["colour"] + argv[9:])
    with pytest.raises(SystemExit):
        script.main()
    assert "--only-tag 'colour' leaves 0 scenes" in capsys.readouterr().err


def test_sigma_shift_reaches_the_training_and_one_is_the_unshifted_training(benchmark_script, tiny_dir, tmp_path, monkeypatch):
    script = benchmark_script("probe_continue_pretrain")
    weights = {}
    for name, extra in (("default", []), ("one", ["--set", "sigma_shift=1"]), ("three", ["--set", "sigma_shift=3"])):
        monkeypatch.setattr(sys, "argv", ["probe_continue_pretrain.py", "--model", str(tiny_dir), "--out", str(tmp_path / name),
                                          "--steps", "1", "--set", "batch=2", "--set", "num_images=4", *extra])
        script.main()
        weights[name] = load_file(str(next((tmp_path / name / "transformer").glob("*.safetensors"))))
    assert all(torch.equal(weights["default"][k], weights["one"][k]) for k in weights["default"])
    assert any(not torch.equal(weights["default"][k], weights["three"][k]) for k in weights["default"])


def test_added_layers_start_as_no_ops_and_save_as_a_deeper_pipeline(benchmark_script, policy, tmp_path):
    deepen = benchmark_script("probe_continue_pretrain").deepen
    transformer = policy.pipeline.transformer
    layers = transformer.config.num_layers
    latents = torch.randn(2, *policy.latent_shape(1)[1:])
    embeds = policy.encode(["a photo of a red circle", "a photo of a star left of a heart"])
    original = list(transformer.transformer_blocks)
    with torch.no_grad():
        before = policy.velocity(latents, 0.7, embeds)
        torch.manual_seed(0)
        deepen(transformer, 2)
        after = policy.velocity(latents, 0.7, embeds)
    blocks = list(transformer.transformer_blocks)
    assert len(blocks) == layers + 2 and transformer.config.num_layers == layers + 2
    assert blocks[: layers - 1] == original[:-1] and blocks[-1] is original[-1]  # the new ones go before the last
    assert transformer.transformer_blocks[-1].context_pre_only and not transformer.transformer_blocks[-2].context_pre_only
    assert torch.allclose(before, after, atol=1e-6)
    policy.pipeline.save_pretrained(tmp_path)
    reloaded = Policy.from_pretrained(str(tmp_path))
    assert reloaded.pipeline.transformer.config.num_layers == layers + 2
    with torch.no_grad():
        assert torch.allclose(reloaded.velocity(latents, 0.7, embeds), after, atol=1e-6)


def test_a_continued_pretraining_starts_from_the_config_its_base_was_pretrained_with(benchmark_script, tmp_path):
    base_config = benchmark_script("probe_continue_pretrain").base_config
    assert base_config(tmp_path, 7) == PretrainConfig(steps=7)  # no pretrain_info.json: the defaults
    (tmp_path / "pretrain_info.json").write_text(json.dumps({"config": {
        "lr": 5e-4, "vae_channels": [8, 16], "mixture": {"geneval": 1.0}, "steps": 99, "max_minutes": 3.0, "device": "cuda"}}))
    config = base_config(tmp_path, 7)
    assert (config.lr, config.vae_channels, config.mixture) == (5e-4, (8, 16), {"geneval": 1.0})
    assert (config.steps, config.max_minutes, config.device) == (7, None, "cpu")


def test_coloured_position_records_name_and_draw_their_colours_and_keep_the_relation(benchmark_script):
    from opd_bench import geneval
    from opd_bench.world import detect, render

    from opd_bench.world.prompts import coloured_position

    record = {"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1, "position": ["right of", 0]}],
              "prompt": "a photo of a star right of a circle"}
    out = coloured_position(record, np.random.default_rng(11))  # draws orange and white
    star, circle = out["include"][1]["color"], out["include"][0]["color"]
    assert (star, circle) == ("orange", "white")
    assert out["prompt"] == "a photo of an orange star right of a white circle"
    assert out["include"][1]["position"] == ["right of", 0] and "color" not in record["include"][0]  # the input is left as it was
    assert geneval.evaluate_image(out, detect.detect(render.render(out, 0))) == (True, "")  # drawn as named, relation kept
    with pytest.raises(ValueError, match="is not 'a photo of a A <relation> a B'"):
        coloured_position({**record, "prompt": "a star right of a circle"}, np.random.default_rng(3))


def test_reinitialise_gives_fresh_weights_of_the_same_shapes(benchmark_script, tiny_dir):
    reinitialise = benchmark_script("probe_continue_pretrain").reinitialise
    policy = Policy.from_pretrained(str(tiny_dir))
    parts = ("transformer", "text_encoder", "text_encoder_2")
    before = {name: {k: v.clone() for k, v in getattr(policy.pipeline, name).state_dict().items()} for name in parts}
    reinitialise(policy.pipeline, seed=0)
    for name in parts:
        after = getattr(policy.pipeline, name).state_dict()
        assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before[name].items()}
        assert any(not torch.equal(after[k], before[name][k]) for k in after), name
    again = Policy.from_pretrained(str(tiny_dir))
    reinitialise(again.pipeline, seed=0)  # seeded: the same fresh weights
    for name in parts:
        assert all(torch.equal(a, b) for a, b in zip(getattr(again.pipeline, name).state_dict().values(),
                                                     getattr(policy.pipeline, name).state_dict().values())), name


def test_position_scores_count_the_relation_apart_from_the_objects(benchmark_script):
    from opd_bench import suites
    from opd_bench.evaluate import renderer_source

    position_scores = benchmark_script("probe_object_quality").position_scores
    prompts = [p for p in suites.get("tiny").benchmark("geneval").prompts("test") if p.metadata["tag"] == "position"][:8]
    renders = renderer_source()
    sideways = sum(" left of " in p.text or " right of " in p.text for p in prompts)
    assert 0 < sideways < len(prompts)
    right = position_scores(renders, prompts, seeds=1)
    assert all(row == {"images": 8, "score": 1.0, "both_kept": 1.0, "right_when_both_kept": 1.0} for row in right.values())
    mirrored = position_scores(lambda chosen, seed, offset: renders(chosen, seed, offset).flip(-1), prompts, seeds=1)
    for row in mirrored.values():  # mirrored left to right: the same objects, every left/right relation wrong
        assert row["both_kept"] == 1.0 and row["score"] == pytest.approx(1 - sideways / 8)
    blank = position_scores(lambda chosen, seed, offset: torch.zeros(len(chosen), 3, 64, 64), prompts, seeds=1)
    for row in blank.values():  # no objects: not counted as kept, so no relation is judged
        assert row["score"] == row["both_kept"] == 0.0 and np.isnan(row["right_when_both_kept"])
