import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opd_bench.policy import Policy
from opd_bench.rollout import rollout
from opd_bench.tiny.pretrain import PretrainConfig, _random_crops, pretrain_base


def test_random_crops_come_from_the_images():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    crops = _random_crops(images, 5, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 4, 4)
    for crop in crops:  # every crop is a window of one of the images
        assert any(
            torch.equal(crop, image[:, y : y + 4, x : x + 4]) for image in images for y in range(5) for x in range(5)
        )


def test_pretrain_base_writes_a_loadable_pipeline(tmp_path):
    config = PretrainConfig(num_images=8, vae_steps=2, vae_batch=4, steps=3, batch=4, warmup=1, reconstruction_limit=1, num_layers=2, num_heads=2)
    summary = pretrain_base(tmp_path, config)
    assert summary["denoiser_steps"] == 3
    assert set(summary["vae_reconstruction_scores"]) == {"geneval", "ocr"}
    info = json.loads((tmp_path / "pretrain_info.json").read_text())
    assert info["config"]["vae_crop"] == 32 and info["architecture"]["vae_mid_attention"] is False
    assert (info["architecture"]["num_layers"], info["architecture"]["num_heads"]) == (2, 2)
    losses = [json.loads(line) for line in (tmp_path / "pretrain_log.jsonl").read_text().splitlines()]
    assert not (tmp_path / "pretrain_log.jsonl.partial").exists()  # moved over the log when the pipeline is saved
    assert any(r.get("phase") == "denoiser" and "loss" in r for r in losses)
    policy = Policy.from_pretrained(str(tmp_path))
    vae = policy.pipeline.vae.config
    assert vae.scaling_factor == info["latent_scale"] and vae.shift_factor == info["latent_shift"]
    images = rollout(policy, ["a photo of a red circle"], num_steps=2, noise_level=0.0, seed=0).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_a_rebuild_killed_while_saving_leaves_the_old_pipeline_whole(tmp_path, monkeypatch):
    from dataclasses import replace

    from opd_bench.tiny import build

    config = PretrainConfig(num_images=8, vae_steps=1, vae_batch=4, steps=1, batch=4, reconstruction_limit=0, num_layers=1, num_heads=1)
    pretrain_base(tmp_path, config)
    old = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")  # a user's own files beside the pipeline stay
    save = build.save_pipeline

    def killed(pipeline, folder):
        save(pipeline, folder)
        (Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_pipeline", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain_base(tmp_path, replace(config, seed=1))
    assert old == {p: (tmp_path / p).read_bytes() for p in old}
    monkeypatch.setattr(build, "save_pipeline", save)
    info = pretrain_base(tmp_path, replace(config, seed=1))  # the rebuild --force runs next time
    assert json.loads((tmp_path / "pretrain_info.json").read_text())["config"]["seed"] == info["config"]["seed"] == 1
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / weights).read_bytes() != old[weights] and (tmp_path / "eval" / "results.json").exists()
    assert not list(tmp_path.glob(".pretrain*")) and not list(tmp_path.glob("*.partial"))
    Policy.from_pretrained(str(tmp_path))


def test_pretrain_settings_and_folders_that_cannot_make_a_base_are_refused_before_work(tmp_path):
    from opd_bench.cli import main

    for change, problem in (({"steps": 0}, r"steps=0 \(needs >= 1\)"), ({"num_layers": 0}, r"num_layers=0 \(needs >= 1\)"),
                            ({"batch": -4}, r"batch=-4 \(needs >= 1\)"), ({"max_minutes": 0.0}, r"max_minutes=0.0 \(needs > 0"),
                            ({"seed": -1}, r"seed=-1 \(needs >= 0\)"), ({"mixture": {"geneval": 0.5, "foo": 0.5}}, "mixture names 'foo'"),
                            ({"device": "bogus"}, "device 'bogus' is not a device"),
                            ({"sigma_shift": 0.0}, r"sigma_shift=0.0 \(needs > 0"),
                            # each of these failed only after the VAE phase, or trained a broken base
                            ({"warmup": -1}, r"warmup=-1 \(needs >= 0"), ({"ema": 1.5}, r"ema=1.5 \(needs in \[0, 1\)"),
                            ({"cfg_dropout": 2.0}, r"cfg_dropout=2.0 \(needs in \[0, 1\]"),
                            ({"vae_crop": 30}, r"vae_crop=30 \(needs a multiple of 4 .* up to 64"), ({"vae_crop": 100}, "vae_crop=100"),
                            ({"mixture": {"geneval": 1.5, "ocr": -0.5}}, "mixture weights must be numbers >= 0")):
        with pytest.raises(ValueError, match=problem):
            PretrainConfig(**change)
    assert PretrainConfig(warmup=0).warmup == 0  # no warmup: the first step takes the full rate
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    for force in ([], ["--force"]):  # a run folder (or any folder of other files) never gets a pipeline mixed in
        refused = CliRunner().invoke(main, ["pretrain", "base", "--out", str(run), *force])
        assert refused.exit_code == 1 and "holds files but no pipeline" in refused.output, refused.output
        refused = CliRunner().invoke(main, ["pretrain", "pref", "--out", str(run), *force])
        assert refused.exit_code == 1 and "holds files but no preference model" in refused.output, refused.output
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


def test_tag_weights_and_coloured_position_change_only_the_geneval_scenes():
    from opd_bench.tiny.pretrain import training_records

    plain, words = training_records(PretrainConfig(num_images=3000))
    assert training_records(PretrainConfig(num_images=3000, tag_weights={}))[0] == plain  # empty: drawn as before
    weighted, weighted_words = training_records(PretrainConfig(num_images=3000, tag_weights={"position": 10}, coloured_position=True))
    share = {name: sum(r.get("tag") == "position" for r in records) / 3000 for name, records in (("plain", plain), ("weighted", weighted))}
    assert 0.04 < share["plain"] < 0.09 and 0.22 < share["weighted"] < 0.31  # 0.4 / 6 and 0.4 x 10 / 15
    assert [r for r in weighted if "include" not in r] == [r for r in plain if "include" not in r]  # ocr and pref as drawn
    coloured = [r for r in weighted if r.get("tag") == "position"]
    assert all(len({c["color"] for c in r["include"]}) == 2 and r["include"][0]["color"] in r["prompt"] for r in coloured)
    assert weighted_words == words  # colour words are already in the vocabulary
    for change, problem in (({"tag_weights": {"positon": 2}}, "tag_weights names 'positon'"),
                            ({"tag_weights": {"position": -1}}, "numbers >= 0"),
                            ({"tag_weights": dict.fromkeys(["single_object", "two_object", "counting", "colors", "position", "color_attr"], 0)},
                             "not all 0")):
        with pytest.raises(ValueError, match=problem):
            PretrainConfig(**change)


def test_a_kill_among_the_renames_leaves_no_pipeline_rather_than_a_mix_of_two(tmp_path, monkeypatch):
    import os

    from opd_bench.tiny import pretrain

    target, source = tmp_path / "base", tmp_path / "base" / ".pretrain.partial"
    for folder, tag in ((target, "old"), (source, "new")):
        for part in ("transformer", "vae"):
            (folder / part).mkdir(parents=True)
            (folder / part / "weights").write_text(tag)
        (folder / "model_index.json").write_text(tag)
    renames, replace = [], os.replace

    def killed_at_the_third(a, b):
        renames.append(b)
        if len(renames) == 3:
            raise KeyboardInterrupt
        replace(a, b)

    monkeypatch.setattr(pretrain.os, "replace", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        pretrain._move_entries(source, target, last="model_index.json")
    # the old model_index.json went aside first: diffusers loads no pipeline here, so no new transformer with an old VAE
    assert not (target / "model_index.json").exists()
