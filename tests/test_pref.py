"""Preference task of the tiny suite: taste oracle, pair data, shipped model, rewards, training."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from opd_bench.world import prompts, render
from opd_bench.world.taste import taste, taste_batch, taste_terms


@pytest.fixture(scope="module")
def pref_test_records():
    return prompts.read_jsonl(prompts.DEFAULT_DIR / "pref_test.jsonl")


def _degrade(img: Image.Image, kind: str) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    rng = np.random.default_rng(0)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(2.0))
    if kind == "noise":
        return Image.fromarray(np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8))
    if kind == "low_contrast":
        bg = np.median(a.reshape(-1, 3), axis=0)
        return Image.fromarray(np.clip(bg + (a - bg) * 0.4, 0, 255).astype(np.uint8))
    if kind == "empty":  # every object painted over with the background tone
        bg = np.median(a.reshape(-1, 3), axis=0)
        dist = np.sqrt(((a - bg) ** 2).sum(-1))
        a = a.copy()
        a[dist > 20] = bg
        return Image.fromarray(a.astype(np.uint8))
    raise ValueError(kind)


def test_taste_in_range_and_prefers_clean(pref_test_records):
    for rec in pref_test_records[:10]:
        clean = render.render(rec, 0)
        t_clean = taste(clean, rec)
        assert 0.0 <= t_clean <= 1.0
        assert t_clean > 0.6
        for kind in ("blur", "noise", "low_contrast", "empty"):
            t_bad = taste(_degrade(clean, kind), rec)
            assert 0.0 <= t_bad <= 1.0
            assert t_bad < t_clean - 0.02, (rec["prompt"], kind, t_bad, t_clean)


def test_taste_deterministic_nan_and_batch(pref_test_records):
    rec = pref_test_records[0]
    img = render.render(rec, 3)
    assert taste(img, rec) == taste(img, rec)
    tensor = render.to_tensor([img])[0]
    assert abs(taste(tensor, rec) - taste(img, rec)) < 1e-6
    assert math.isnan(taste(img, {"prompt": "a photo of a cat", "include": []}))
    batch = render.render_batch([rec, rec], [0, 1])
    out = taste_batch(batch, [rec, {"text": "AB"}])
    assert out.shape == (2,) and 0 <= out[0] <= 1 and math.isnan(out[1])
    terms = taste_terms(img, rec)
    for k in ("fidelity", "composition", "contrast", "cleanliness", "aesthetic"):
        assert 0.0 <= terms[k] <= 1.0


def test_pair_data_seeded_and_noisy(pref_test_records):
    from opd_bench.world.pref_data import make_pair_data

    recs = pref_test_records[:6]
    a = make_pair_data(recs, num_pairs=30, images_per_prompt=4, seed=5)
    b = make_pair_data(recs, num_pairs=30, images_per_prompt=4, seed=5)
    assert a.images.shape == (24, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.pairs, b.pairs)
    assert np.array_equal(a.labels, b.labels)
    assert (a.prompt_index[a.pairs[:, 0]] == a.prompt_index[a.pairs[:, 1]]).all()
    assert set(np.unique(a.labels).tolist()) <= {0.0, 1.0}
    assert ((a.taste >= 0) & (a.taste <= 1)).all()
    assert a.taste.max() - a.taste.min() > 0.3  # a real spread


def test_shipped_model_ranks_clear_pairs(benchmark_script):
    from opd_bench.rewards.pref import TinyPrefModel

    model = TinyPrefModel.load()
    assert model.num_parameters() < 2_000_000
    # The figures of docs/tiny_pref.md come from this same function (benchmarks/measure_tiny_pref.py).
    # Measured 2026-12-08: 0.768 of 142 clear pairs. All of them, not the first 50 (0.80, which
    # passed the old bound of 0.8 with no pair to spare); 0.72 leaves 6 pairs (5 points) for
    # numerical differences between machines, while a model that ordered at random would get ~0.5.
    result = benchmark_script("measure_tiny_pref").clear_pair_agreement(model)
    assert result["pairs"] >= 100, result  # enough pairs for a share to mean something
    assert result["agree"] >= 0.72, result


def test_rewards_shapes_and_nan(pref_test_records):
    from opd_bench.rewards.pref import TinyPrefOracleReward, TinyPrefReward

    rec = pref_test_records[1]
    geneval = {"tag": "single_object", "include": [{"class": "star", "count": 1}],
               "prompt": "a photo of a star"}
    ocr = {"prompt": 'a sign that says "AB"', "text": "AB", "surface": "sign"}
    metas = [rec, geneval, ocr]
    images = render.render_batch(metas, 0)
    prompts_ = [m["prompt"] for m in metas]
    learned = TinyPrefReward()(images, prompts_, metas)
    assert learned.scores.shape == (3,) and learned.scores.dtype == torch.float32
    assert torch.isfinite(learned.scores).all()
    assert len(learned.details["logit"]) == 3
    oracle = TinyPrefOracleReward()(images, prompts_, metas)
    assert oracle.scores.shape == (3,)
    assert 0 <= float(oracle.scores[0]) <= 1
    assert torch.isnan(oracle.scores[1:]).all()
    # any image size is accepted by the learned model; bad batches fail loudly
    big = torch.nn.functional.interpolate(images, size=(96, 96), mode="bilinear")
    assert TinyPrefReward()(big, prompts_, metas).scores.shape == (3,)
    with pytest.raises(ValueError):
        TinyPrefReward()(images, prompts_[:2], metas)


def test_tiny_training_lowers_loss(tmp_path):
    from opd_bench.rewards.pref import TinyPrefModel
    from opd_bench.world.pref_train import pretrain_pref

    threads = torch.get_num_threads()
    try:  # one thread: tiny batches on shared cores are much faster without thread syncs
        m = pretrain_pref(tmp_path, seed=0, num_pairs=48, images_per_prompt=4,
                          num_train_prompts=16, num_test_pairs=12, test_images_per_prompt=4,
                          num_test_prompts=3, epochs=2, batch_prompts=2, lr=2e-3,  # 1 epoch of 24 tiny batches is noise
                          clip_loss_weight=0.0, threads=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert m["train_bt_loss_after"] < m["train_bt_loss_before"]
    assert 0.0 <= m["heldout"]["acc_vs_labels"] <= 1.0
    model = TinyPrefModel.load(tmp_path)
    assert model.config["training"]["num_pairs"] == 48


def test_images_must_be_floats_and_a_diverged_image_scores_as_its_png(pref_test_records):
    from opd_bench import rewards
    from opd_bench.rewards.base import call_reward
    from opd_bench.rewards.pref import TinyPrefOracleReward, TinyPrefReward

    metas = pref_test_records[:3]
    images = render.render_batch(metas, 0)
    prompts_ = [m["prompt"] for m in metas]
    eight_bit = (images * 255).round().to(torch.uint8)
    for reward in (TinyPrefReward(), rewards.get("toy/brightness")):
        with pytest.raises(ValueError, match=r"floats in \[0, 1\], got torch.uint8; .*images.float\(\) / 255"):
            reward(eight_bit, prompts_, metas)

    # NaN and inf pixels: tiny/pref scored NaN ("does not apply": left out of an evaluation's mean,
    # so diverging raised a model's score) and toy/brightness inf. Through call_reward every reward
    # scores the image a PNG of it would hold: NaN and -inf black, +inf white.
    diverged, png = images.clone(), images.clone()
    diverged[0, 1, 5, 5], png[0, 1, 5, 5] = float("nan"), 0.0
    diverged[1, 0, 0, 0], png[1, 0, 0, 0] = float("inf"), 1.0
    diverged[1, 0, 0, 1], png[1, 0, 0, 1] = float("-inf"), 0.0
    for name, reward in (("tiny/pref", TinyPrefReward()), ("tiny/pref-oracle", TinyPrefOracleReward()),
                         ("toy/brightness", rewards.get("toy/brightness"))):
        scores = call_reward(reward, name, diverged, prompts_, metas).scores
        assert torch.isfinite(scores).all() and torch.equal(scores, call_reward(reward, name, png, prompts_, metas).scores), name


class _Keyed:
    """A reward whose details use the keys ``index`` (per sample) and ``batch`` (a scalar)."""

    def __call__(self, images, prompts, metadata):
        from opd_bench.rewards import RewardOutput

        return RewardOutput(torch.zeros(len(prompts)), {"index": ["own"] * len(prompts), "batch": 7})


def test_per_task_details_are_batch_long_and_keep_the_rewards_keys(pref_test_records):
    from opd_bench import rewards

    rec = pref_test_records[1]
    geneval = {"tag": "single_object", "include": [{"class": "star", "count": 1}],
               "prompt": "a photo of a star", "task": "geneval"}
    metas = [geneval, dict(rec), dict(geneval, task="other"), dict(rec, task="keyed")]
    images = render.render_batch(metas, 0)
    reward = rewards.get("per-task", rewards={"pref": "tiny/pref-oracle", "geneval": ("tiny/pref", {}),
                                              "keyed": _Keyed()})
    out = reward(images, [m["prompt"] for m in metas], metas)
    assert torch.isnan(out.scores[2]) and torch.isfinite(out.scores[[0, 1, 3]]).all()
    assert out.details["task"] == ["geneval", "pref", None, "keyed"]
    # entry i of every per-sample list is sample i's, whatever the task
    assert out.details["pref/fidelity"][0] is None and out.details["pref/fidelity"][1] is not None
    assert len(out.details["pref/fidelity"]) == 4 and out.details["pref/fidelity"][2:] == [None, None]
    assert len(out.details["geneval/logit"]) == 4 and out.details["geneval/logit"][1:] == [None] * 3
    # a reward's own "index" is its own, not overwritten by the router's bookkeeping
    assert out.details["keyed/index"] == [None, None, None, "own"] and out.details["keyed/batch"] == 7

    # a class is refused when the reward is built, not when it is first called
    with pytest.raises(TypeError, match=r"class _Keyed as a reward; pass an instance \(_Keyed\(...\)\) or a registered"):
        rewards.get("per-task", rewards={"keyed": _Keyed})
    with pytest.raises(TypeError, match="pass an instance"):
        rewards.get("weighted-sum", rewards={"keyed": _Keyed})

    # weighted sum: a sample that no reward applies to scores 0 (documented), not NaN
    weighted = rewards.get("weighted-sum", rewards={"oracle": "tiny/pref-oracle"})
    total = weighted(images[:2], [m["prompt"] for m in metas[:2]], metas[:2])
    assert total.scores[0].item() == 0.0 and total.scores[1].item() > 0
