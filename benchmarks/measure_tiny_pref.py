"""Figures of docs/tiny_pref.md that come from the hidden taste oracle and the shipped model.

* ``calibration``: mean oracle taste of the renderer's clean images of the first 40 pref test
  prompts (``render(record, 0)``) and of the same images degraded (PIL Gaussian blur, Gaussian
  pixel noise with ``default_rng(0)``, contrast halved towards the median colour, ``np.roll`` by
  20 px), and the best of 20 defect-free redraws per prompt;
* ``clear_pairs``: the fixed check of ``tests/test_pref.py`` (the test calls ``clear_pair_agreement``
  here, so the documented figures and the test share one code path): pairs of images of test
  prompts 200-239 (``make_images(..., 5, seed=123)``) whose taste differs by more than 0.25, and
  the share the shipped model orders like the oracle;
* ``overlap``: test prompts whose objects and background equal a training prompt's (differing only
  in the template's wording or the order of the objects).

    python benchmarks/measure_tiny_pref.py [calibration] [clear_pairs] [overlap]

Prints one JSON object per part. About 30 s on one CPU core in all.
"""
from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image, ImageFilter

from opd_bench.world import prompts, render

CLEAR_GAP = 0.25


def pref_records(split: str) -> list[dict]:
    return prompts.read_jsonl(prompts.DEFAULT_DIR / f"pref_{split}.jsonl")


def _degraded(img: Image.Image) -> dict[str, Image.Image]:
    a = np.asarray(img, dtype=np.float32)
    median = np.median(a.reshape(-1, 3), axis=0)

    def noisy(sigma: float) -> Image.Image:
        noise = np.random.default_rng(0).normal(0, sigma, a.shape)
        return Image.fromarray(np.clip(np.rint(a + noise), 0, 255).astype(np.uint8))

    return {
        "blur_r1": img.filter(ImageFilter.GaussianBlur(1)),
        "blur_r2": img.filter(ImageFilter.GaussianBlur(2)),
        "noise_sigma8": noisy(8),
        "noise_sigma20": noisy(20),
        "contrast_halved": Image.fromarray(np.clip(np.rint(median + (a - median) * 0.5), 0, 255).astype(np.uint8)),
        "rolled_20px": Image.fromarray(np.roll(np.asarray(img), 20, axis=1)),
    }


def calibration(num_prompts: int = 40, redraws: int = 20) -> dict:
    from opd_bench.world.pref_data import make_variant
    from opd_bench.world.taste import taste

    tastes: dict[str, list[float]] = {}
    best = []
    for i, rec in enumerate(pref_records("test")[:num_prompts]):
        clean = render.render(rec, 0)
        tastes.setdefault("clean", []).append(taste(clean, rec))
        for kind, img in _degraded(clean).items():
            tastes.setdefault(kind, []).append(taste(img, rec))
        rng = np.random.default_rng([0, i])
        best.append(max(taste(make_variant(rec, rng, clean=True)[0], rec) for _ in range(redraws)))
    out = {kind: round(float(np.mean(v)), 3) for kind, v in tastes.items()}
    out["clean_range"] = [round(min(tastes["clean"]), 3), round(max(tastes["clean"]), 3)]
    out[f"best_of_{redraws}_clean_redraws_mean"] = round(float(np.mean(best)), 3)
    out[f"best_of_{redraws}_clean_redraws_max"] = round(float(np.max(best)), 3)
    return out


def clear_pair_agreement(model=None) -> dict:
    """The shipped model's agreement with the oracle on the fixed test's clear pairs."""
    import torch

    from opd_bench.rewards.pref import TinyPrefModel
    from opd_bench.world.pref_data import make_images

    recs = pref_records("test")[200:240]
    images, pidx, tastes, _ = make_images(recs, 5, seed=123)
    pairs = [(i, j) for p in range(len(recs)) for i in np.nonzero(pidx == p)[0] for j in np.nonzero(pidx == p)[0]
             if i < j and abs(tastes[i] - tastes[j]) > CLEAR_GAP]
    model = model or TinyPrefModel.load()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        s = model.score(x, [recs[p]["prompt"] for p in pidx]).numpy()
    agree = np.array([(s[i] > s[j]) == (tastes[i] > tastes[j]) for i, j in pairs])
    return {"pairs": len(pairs), "agree": float(agree.mean()), "agree_first_50": float(agree[:50].mean())}


def _scene(rec: dict) -> tuple:
    objects = sorted((o["class"], o["color"], o["size"]) for o in rec["objects"])
    return tuple(objects), rec["background"]["kind"]


def overlap(accuracy: bool = True) -> dict:
    """How many test prompts repeat a training scene and, with ``accuracy``, the shipped model's
    held-out accuracy vs the oracle order on their pairs and on the rest (the held-out pairs of
    ``pretrain_pref``: 6 images per test prompt, 2 000 pairs, seed 1000)."""
    train = {_scene(r) for r in pref_records("train")}
    test = pref_records("test")
    shared = np.array([_scene(r) in train for r in test])
    out = {"test_prompts": len(test), "share_a_training_scene": int(shared.sum())}
    if accuracy:
        from opd_bench.rewards.pref import TinyPrefModel
        from opd_bench.world.pref_data import make_pair_data
        from opd_bench.world.pref_train import score_images

        data = make_pair_data(test, 2000, 6, seed=1000)
        s = score_images(TinyPrefModel.load(), data.images, [test[p]["prompt"] for p in data.prompt_index])
        a, b = data.pairs[:, 0], data.pairs[:, 1]
        dt = data.taste[a] - data.taste[b]
        strict = np.abs(dt) > 1e-6  # as pref_train.evaluate's acc_vs_oracle
        right = (s[a] - s[b] > 0) == (dt > 0)
        on_shared = shared[data.prompt_index[a]]
        for name, keep in (("all", strict), ("shared", strict & on_shared), ("rest", strict & ~on_shared)):
            out[f"acc_vs_oracle_{name}"] = round(float(right[keep].mean()), 3)
            out[f"pairs_{name}"] = int(keep.sum())
    return out


PARTS = {"calibration": calibration, "clear_pairs": clear_pair_agreement, "overlap": overlap}

if __name__ == "__main__":
    for part in sys.argv[1:] or list(PARTS):
        if part not in PARTS:
            sys.exit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
        print(json.dumps({part: PARTS[part]()}), flush=True)
