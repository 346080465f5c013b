"""Seeded pair data of the tiny preference task (the tiny world's Pick-a-Pic).

For every pref prompt record, ``images_per_prompt`` images are made the way a (bad or good)
generator might draw them: image 0 is the renderer's own clean image, the others are scenes
redrawn with controlled variations and defects, each image with its own "sloppiness" g ~ U(0, 1)
that scales how likely every defect is:

* layout: the renderer's random layout, a centred one (best of 8 random layouts by balance), an
  off-centre one (worst of 8) or one object pushed partly out of the frame (clipped);
* sizes: within the asked range, at its large end, or drifted (x 0.65-1.35);
* colours: palette + jitter, desaturated, or one object in a wrong colour;
* content: a missing object, an extra object, a wrong shape;
* drawing / post-processing: faint (low-contrast) objects, an occluding background-coloured
  patch, stray specks, Gaussian blur (sigma 0.5-2), Gaussian noise (sigma 3-25), JPEG
  artefacts (quality 8-40).

Every image is scored by the hidden taste oracle (:func:`opd_bench.world.taste.taste`). Pairs are
two images of the same prompt; the label is sampled Bradley-Terry style,
P(first preferred) = sigmoid((taste_a - taste_b) / temperature), and then flipped with
probability ``flip`` (careless raters). Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from opd_bench.world import render, spec

DEFECT_P = {  # base probability of each variation at sloppiness g = 0.5 (scaled by 2 g)
    "wrong_color": 0.12, "wrong_class": 0.08, "missing": 0.10, "extra": 0.10,
    "faint": 0.10, "desaturate": 0.15, "occlude": 0.10, "specks": 0.12,
    "blur": 0.18, "noise": 0.18, "jpeg": 0.08, "size_drift": 0.20,
}


@dataclass
class PairData:
    """Images (uint8 [N, 64, 64, 3]), their prompt index and taste, and labelled pairs."""

    images: np.ndarray
    prompt_index: np.ndarray  # [N] index into records
    taste: np.ndarray  # [N] oracle taste
    records: list[dict]
    pairs: np.ndarray  # [P, 2] image indices (same prompt)
    labels: np.ndarray  # [P] 1.0 if the first image is preferred (noisy), else 0.0
    info: list[dict] = field(default_factory=list)  # per image: variations applied

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    def subset_pairs(self, n: int) -> "PairData":
        """The first ``n`` pairs and only the images they use (for quick evaluations)."""
        pairs = self.pairs[:n]
        keep = np.unique(pairs.ravel())
        remap = np.full(len(self.images), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        return PairData(self.images[keep], self.prompt_index[keep], self.taste[keep],
                        self.records, remap[pairs], self.labels[:n],
                        [self.info[i] for i in keep] if self.info else [])


def _colour(name: str, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(spec.COLORS[name], np.float32)
    return np.clip(base + rng.integers(-spec.COLOR_JITTER, spec.COLOR_JITTER + 1, 3), 0, 255)


def _balance_of(boxes: Sequence[tuple]) -> float:
    c = np.array([[x + s / 2, y + s / 2] for x, y, s in boxes])
    a = np.array([s * s for _, _, s in boxes])
    centroid = (c * a[:, None]).sum(0) / a.sum()
    return float(np.linalg.norm(centroid - spec.IMAGE_SIZE / 2))


def _layout(sides: list[float], rng: np.random.Generator, mode: str) -> list[tuple]:
    tries = 1 if mode == "random" else 8
    cands = []
    for _ in range(tries):
        try:
            cands.append(render.layout(sides, rng, max_tries=200))
        except RuntimeError:
            pass
    if not cands:  # too large to separate: shrink and retry
        return _layout([max(12.0, s * 0.85) for s in sides], rng, mode)
    if mode == "centred":
        return min(cands, key=_balance_of)
    if mode == "off":
        return max(cands, key=_balance_of)
    return cands[0]


def make_variant(record: dict, rng: np.random.Generator, clean: bool = False
                 ) -> tuple[np.ndarray, dict]:
    """One image (uint8 [64, 64, 3]) for a pref ``record`` and the variations applied."""
    size = spec.IMAGE_SIZE
    g = 0.0 if clean else float(rng.uniform(0.0, 1.0))
    on = {k: (not clean) and rng.uniform() < min(1.0, p * 2.0 * g) for k, p in DEFECT_P.items()}
    info: dict = {"sloppiness": g}

    objs = [dict(o) for o in record["objects"]]
    for o in objs:
        o.setdefault("size", "medium")
    if on["wrong_color"]:
        o = objs[int(rng.integers(len(objs)))]
        o["color"] = spec.COLOR_NAMES[(spec.COLOR_NAMES.index(o["color"]) + int(rng.integers(1, 10))) % 10]
    if on["wrong_class"]:
        o = objs[int(rng.integers(len(objs)))]
        o["class"] = spec.SHAPES[(spec.SHAPES.index(o["class"]) + int(rng.integers(1, 7))) % 7]
    if on["missing"]:
        objs.pop(int(rng.integers(len(objs))))
    if on["extra"] and len(objs) < 4:
        objs.append({"class": spec.SHAPES[int(rng.integers(7))],
                     "color": spec.COLOR_NAMES[int(rng.integers(10))],
                     "size": ("small", "medium", "large")[int(rng.integers(3))]})

    size_mode = "large_end" if rng.uniform() < 0.3 else "uniform"
    sides = []
    for o in objs:
        lo, hi = spec.SIZES[o["size"]]
        s = float(rng.integers(hi, hi + 2)) if size_mode == "large_end" else float(rng.integers(lo, hi + 1))
        if on["size_drift"]:
            s = float(np.clip(round(s * rng.uniform(0.65, 1.35)), 12, 38))
        sides.append(s)
    cap = {1: 38.0, 2: 26.0}.get(len(sides), 22.0)
    sides = [min(s, cap) for s in sides]
    u = rng.uniform()
    mode = "random" if u < 0.45 else "centred" if u < 0.8 else "off" if u < 0.93 else "cut"
    if clean:
        mode = "random"
    info.update({k: v for k, v in on.items() if v})
    info.update({"layout": mode, "sizes": size_mode})

    kind = record.get("background", {}).get("kind", "plain")
    img = render.background(kind, rng)
    boxes = _layout(sides, rng, "random" if mode == "cut" else mode) if objs else []
    if mode == "cut" and boxes:
        k = int(rng.integers(len(boxes)))
        x0, y0, s = boxes[k]
        frac = rng.uniform(0.2, 0.5)
        side_pick = int(rng.integers(4))
        if side_pick == 0:
            x0 = -frac * s
        elif side_pick == 1:
            x0 = size - (1 - frac) * s
        elif side_pick == 2:
            y0 = -frac * s
        else:
            y0 = size - (1 - frac) * s
        boxes[k] = (x0, y0, s)
    for o, box in zip(objs, boxes):
        alpha = render.shape_alpha(o["class"], tuple(box))[..., None]
        if on["faint"]:
            alpha = alpha * rng.uniform(0.35, 0.7)
        rgb = _colour(o["color"], rng)
        if on["desaturate"]:
            lum = float(rgb @ np.array([0.299, 0.587, 0.114]))
            t = rng.uniform(0.25, 0.8)
            rgb = rgb * (1 - t) + lum * t
        img = img * (1 - alpha) + rgb * alpha
    if on["occlude"] and boxes:
        x0, y0, s = boxes[int(rng.integers(len(boxes)))]
        tone = np.median(img.reshape(-1, 3), axis=0)
        fw, fh = rng.uniform(0.3, 0.6) * s, rng.uniform(0.5, 1.0) * s
        ox, oy = x0 + rng.uniform(-0.1, 0.8) * s, y0 + rng.uniform(-0.1, 0.5) * s
        xa, ya = int(max(ox, 0)), int(max(oy, 0))
        xb, yb = int(min(ox + fw, size)), int(min(oy + fh, size))
        if xb > xa and yb > ya:
            img[ya:yb, xa:xb] = tone + rng.normal(0, 1.0, (yb - ya, xb - xa, 3))
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    if on["specks"]:
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(1, 7))):
            cx, cy = rng.uniform(2, size - 2, 2)
            r = rng.uniform(1.0, 2.8)
            col = tuple(int(c) for c in spec.COLORS[spec.COLOR_NAMES[int(rng.integers(10))]])
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    if on["blur"]:
        sigma = float(rng.uniform(0.5, 2.0))
        pil = pil.filter(ImageFilter.GaussianBlur(sigma))
        info["blur"] = round(sigma, 2)
    arr = np.asarray(pil, dtype=np.float32)
    if on["noise"]:
        sigma = float(rng.uniform(3, 25))
        arr = arr + rng.normal(0, sigma, arr.shape)
        info["noise"] = round(sigma, 1)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if on["jpeg"]:
        buf = io.BytesIO()
        q = int(rng.integers(8, 41))
        Image.fromarray(out).save(buf, format="JPEG", quality=q)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
        info["jpeg"] = q
    return out, info


def make_images(records: Sequence[dict], images_per_prompt: int, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """(images uint8 [N, 64, 64, 3], prompt index [N], taste [N], info) for ``records``; image 0
    of each prompt is the renderer's clean image (``render(record, seed)``)."""
    from opd_bench.world.taste import taste

    n = len(records) * images_per_prompt
    images = np.zeros((n, spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3), dtype=np.uint8)
    pidx = np.repeat(np.arange(len(records)), images_per_prompt)
    tastes = np.zeros(n, dtype=np.float64)
    infos: list[dict] = []
    it = range(len(records))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="pref images", unit="prompt")
    for i in it:
        rec = records[i]
        rng = np.random.default_rng([int(seed), 7, i])
        for k in range(images_per_prompt):
            j = i * images_per_prompt + k
            if k == 0:
                arr = np.asarray(render.render(rec, seed), dtype=np.uint8)
                info = {"renderer": True}
            else:
                arr, info = make_variant(rec, rng)
            images[j] = arr
            tastes[j] = taste(arr, rec)
            infos.append(info)
    return images, pidx, tastes, infos


def sample_pairs(prompt_index: np.ndarray, tastes: np.ndarray, num_pairs: int, seed: int = 0,
                 temperature: float = 0.05, flip: float = 0.03
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` distinct same-prompt pairs with noisy Bradley-Terry labels.

    P(label = 1) = sigmoid((taste[a] - taste[b]) / temperature), then flipped with probability
    ``flip``. Returns (pairs [P, 2], labels [P] float32)."""
    rng = np.random.default_rng([int(seed), 11])
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompt_index.tolist()):
        groups.setdefault(p, []).append(j)
    all_pairs = []
    for p in sorted(groups):
        idx = groups[p]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                all_pairs.append((idx[a], idx[b]))
    all_pairs = np.asarray(all_pairs, dtype=np.int64)
    if num_pairs > len(all_pairs):
        raise ValueError(f"asked for {num_pairs} pairs, only {len(all_pairs)} distinct exist; "
                         "use more prompts or images per prompt")
    pick = all_pairs[rng.permutation(len(all_pairs))[:num_pairs]]
    swap = rng.uniform(size=num_pairs) < 0.5  # random order inside a pair
    pick[swap] = pick[swap][:, ::-1]
    diff = tastes[pick[:, 0]] - tastes[pick[:, 1]]
    p_first = 1.0 / (1.0 + np.exp(-diff / temperature))
    labels = (rng.uniform(size=num_pairs) < p_first).astype(np.float32)
    flips = rng.uniform(size=num_pairs) < flip
    labels[flips] = 1.0 - labels[flips]
    return pick, labels


def make_pair_data(records: Sequence[dict], num_pairs: int, images_per_prompt: int = 8,
                   seed: int = 0, temperature: float = 0.05, flip: float = 0.03,
                   progress: bool = False) -> PairData:
    """Images of ``records`` scored by the oracle, and ``num_pairs`` noisy labelled pairs."""
    images, pidx, tastes, infos = make_images(records, images_per_prompt, seed, progress)
    pairs, labels = sample_pairs(pidx, tastes, num_pairs, seed, temperature, flip)
    return PairData(images, pidx, tastes, list(records), pairs, labels, infos)
