"""The base checks behind probes D1, D2 and U1-U2 (issue 11): the minimal prompt edits are the ones
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


def test_the_word_use_ratio_is_one_when_the_edit_changes_nothing_and_moves_when_it_does(policy, text_use, monkeypatch):
    records = [record("single_object", f"a photo of a {shape}", [{"class": shape, "count": 1}]) for shape in ("star", "heart")]
    changed = text_use.edit_ratios(policy, records, noise_seeds=1)
    assert set(changed) == set(text_use.EDIT_SIGMAS) and all(r != 1.0 for r in changed.values())
    monkeypatch.setattr(text_use, "edited_prompt", lambda r, rng: r["prompt"])
    assert text_use.edit_ratios(policy, records, noise_seeds=1) == {s: 1.0 for s in text_use.EDIT_SIGMAS}
    assert text_use.context_change(policy, records) == 0.0


def test_object_stats_count_the_detectors_objects_and_the_share_it_keeps(benchmark_script):
    quality = benchmark_script("probe_object_quality")
    two = record("two_object", "a photo of a circle and a heart", [{"class": "circle", "count": 1}, {"class": "heart", "count": 1}])
    renders = quality.object_stats([render(two, 0), render(two, 1)], [two, two])
    assert renders == {"objects_per_image": 2.0, "kept": 1.0, "median_confidence": pytest.approx(1.0, abs=0.05)}
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert quality.object_stats([blank], [two]) == {"objects_per_image": 0.0, "kept": 0.0, "median_confidence": 0.0}


def test_self_sft_sigma_shift_moves_sigmas_towards_one_and_keeps_the_ends(benchmark_script):
    shifted = benchmark_script("probe_self_sft").shifted
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
                          (argv[:7] + ["--out", str(tmp_path / "new"), "--set", "num_layers=2"], "--set num_layers changes")):
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit):
            script.main()
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_added_layers_start_as_no_ops_and_save_as_a_deeper_pipeline(benchmark_script, policy, tmp_path):
    deepen = benchmark_script("probe_continue_pretrain").deepen
    transformer = policy.pipeline.transformer
    layers = transformer.config.num_layers
    latents = torch.randn(2, *policy.latent_shape(1)[1:])
    embeds = policy.encode(["a photo of a red circle", "a photo of a star left of a heart"])
    with torch.no_grad():
        before = policy.velocity(latents, 0.7, embeds)
        torch.manual_seed(0)
        deepen(transformer, 2)
        after = policy.velocity(latents, 0.7, embeds)
    assert len(transformer.transformer_blocks) == layers + 2 and transformer.config.num_layers == layers + 2
    assert transformer.transformer_blocks[-1].context_pre_only and not transformer.transformer_blocks[-2].context_pre_only
    assert torch.allclose(before, after, atol=1e-6)
    policy.pipeline.save_pretrained(tmp_path)
    reloaded = Policy.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(reloaded.velocity(latents, 0.7, embeds), after, atol=1e-6)
