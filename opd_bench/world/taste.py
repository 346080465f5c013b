"""Hidden "taste" oracle of the tiny world's preference task (the stand-in for human raters).

``taste(image, record) -> float in [0, 1]`` is a deterministic, hand-written function of a
64x64 image and its pref prompt record (``{"objects": [{"class", "color", "size"}], ...}``).
It plays the role of the (unknown) human preference that Pick-a-Pic labels sample from: the
learned preference model (:mod:`opd_bench.rewards.pref`) only ever sees noisy pairwise labels
drawn from it, and the oracle reward ``tiny/pref-oracle`` exposes it for evaluation so that
reward hacking of the learned model is visible.

Definition (all terms in [0, 1]; ``docs/tiny_pref.md`` restates it)::

    taste = 0.40 F + 0.15 C + 0.10 K + 0.15 Q + 0.20 A

The image is analysed once with the world's detector (:func:`opd_bench.world.detect.detect`,
detections kept at confidence >= ``KEEP_CONF``) and the detector's own background model
(per-channel median, distance map).

* **F, prompt fidelity.** Asked objects are matched one-to-one to kept detections (Hungarian,
  maximising the credit). Credit of a (asked, detection) pair = (0.55 [class] + 0.30 [colour]
  + 0.15 [size]) x (0.6 + 0.4 confidence), where [size] = the detection's box side (max of
  width, height) lies in the asked size range +-1 px; a pair with neither class nor colour right
  gets no credit (and does not count as matched). F = clip(sum of credits / n_asked - 0.25
  n_extra, 0, 1) with n_extra the kept detections left unmatched.
* **C, composition** (over the matched detections; 0 when none): 0.5 balance + 0.3 in-frame +
  0.2 spacing. balance = clip(1 - |area-weighted centroid of the boxes - image centre| / 24, 0,
  1); in-frame = mean over objects of clip((gap to the nearest border - 1) / 3, 0, 1) (a cut
  object touches the border: 0); spacing = clip(smallest gap between two boxes / 6, 0, 1), 1 for
  one object.
* **K, contrast** (matched detections; 0 when none): mean of clip((d - 30) / 90, 0, 1), d the
  RGB distance of the object's core colour (mask eroded by 1 px) to the background median.
* **Q, cleanliness:** 0.4 noise + 0.35 sharpness + 0.25 tidiness. noise = clip(1 - (sigma -
  2.5) / 10, 0, 1), sigma = robust (MAD) estimate of the pixel noise from neighbour
  differences on the background, the smaller of the horizontal and vertical estimates;
  sharpness = mean over matched objects of clip((r - 0.25) / 0.4, 0, 1), r = 90th percentile of
  the edge gradient of the distance map on the object's boundary band / the object's contrast d
  (0 when no object); tidiness = clip(1 - stray / 60, 0, 1), stray = pixels of the detector's
  seed mask (smoothed distance > 38) farther than 2 px from every kept detection (specks,
  blobs, unrecognisable debris).
* **A, aesthetic** (the taste a model must learn; matched detections; 0 when none): 0.6 size +
  0.4 vividness. size = mean of clip(1 - |side - (hi + 1)| / 6, 0, 1) with hi the top of the
  asked size range (raters like objects at the large end of what was asked, a little beyond is
  fine); vividness = HSV saturation of the core colour over that of the palette colour (capped
  at 1) for chromatic colours, and clip(1 - saturation / 0.3, 0, 1) for black and white.

Clean renders of the renderer score about 0.7-0.95 (their random sizes and positions vary C
and A); blur, noise, clipping, occlusion, missing / extra / wrong-colour objects, low contrast
and stray blobs all lower the score.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from opd_bench.world import spec

WEIGHTS = {"fidelity": 0.40, "composition": 0.15, "contrast": 0.10, "cleanliness": 0.15,
           "aesthetic": 0.20}
KEEP_CONF = 0.3
EXTRA_PENALTY = 0.25
SEED_THRESHOLD = 38.0


def _saturation(rgb: np.ndarray) -> float:
    mx, mn = float(np.max(rgb)), float(np.min(rgb))
    return 0.0 if mx <= 1e-6 else (mx - mn) / mx


_PALETTE_SAT = {name: _saturation(np.asarray(rgb, np.float64)) for name, rgb in spec.COLORS.items()}
_ACHROMATIC = {"black", "white"}


def _side_ok(side: float, size: str) -> bool:
    lo, hi = spec.SIZES.get(size, spec.SIZES["medium"])
    return lo - 1 <= side <= hi + 1


def _box_side(box) -> float:
    x0, y0, x1, y1 = box
    return float(max(x1 - x0, y1 - y0))


def taste_terms(image: Any, record: dict) -> dict:
    """All terms of the taste function (``"taste"`` is the total); NaN total off pref records."""
    from opd_bench.world.detect import detect, to_array

    objects = record.get("objects") if isinstance(record, dict) else None
    if not objects:
        return {"taste": float("nan")}
    img = to_array(image)
    h, w, _ = img.shape
    dets_all = detect(img / 255.0, masks=True)  # float input in [0, 1], as detect expects
    dets = [d for d in dets_all if d["confidence"] >= KEEP_CONF]

    # background model (as the detector's)
    bg = np.median(img.reshape(-1, 3), axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    seed = ndimage.uniform_filter(dist, size=3, mode="nearest") > SEED_THRESHOLD

    # ---- F: fidelity (Hungarian matching of asked objects to detections)
    n_ask, n_det = len(objects), len(dets)
    credit = np.zeros((n_ask, max(n_det, 1)))
    for i, obj in enumerate(objects):
        for j, d in enumerate(dets):
            cls_ok = d["class"] == obj["class"]
            col_ok = d["color"] == obj["color"]
            if not (cls_ok or col_ok):
                continue
            size_ok = _side_ok(_box_side(d["box"]), obj.get("size", "medium"))
            credit[i, j] = (0.55 * cls_ok + 0.30 * col_ok + 0.15 * size_ok) * (
                0.6 + 0.4 * float(d["confidence"])
            )
    matched: list[tuple[int, int]] = []
    if n_det:
        rows, cols = linear_sum_assignment(-credit[:, :n_det])
        matched = [(int(r), int(c)) for r, c in zip(rows, cols) if credit[r, c] > 0]
    n_extra = n_det - len(matched)
    fidelity = float(np.clip(sum(credit[r, c] for r, c in matched) / n_ask
                             - EXTRA_PENALTY * n_extra, 0.0, 1.0))

    mdets = [dets[c] for _, c in matched]
    mobjs = [objects[r] for r, _ in matched]

    # ---- per-object measurements
    contrasts, sharps, sizes, vivids = [], [], [], []
    for obj, d in zip(mobjs, mdets):
        mask = d["mask"]
        core = ndimage.binary_erosion(mask, iterations=1)
        if not core.any():
            core = mask
        colour = img[core].mean(0)
        c = float(np.sqrt(((colour - bg) ** 2).sum()))
        contrasts.append(float(np.clip((c - 30.0) / 90.0, 0.0, 1.0)))
        band = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
        gx = np.abs(np.diff(dist, axis=1, append=dist[:, -1:]))
        gy = np.abs(np.diff(dist, axis=0, append=dist[-1:, :]))
        g = np.maximum(gx, gy)[band]
        r = float(np.percentile(g, 90)) / max(c, 1e-6) if g.size else 0.0
        sharps.append(float(np.clip((r - 0.25) / 0.4, 0.0, 1.0)))
        hi = spec.SIZES.get(obj.get("size", "medium"), spec.SIZES["medium"])[1]
        sizes.append(float(np.clip(1.0 - abs(_box_side(d["box"]) - (hi + 1)) / 6.0, 0.0, 1.0)))
        sat = _saturation(colour)
        if obj["color"] in _ACHROMATIC:
            vivids.append(float(np.clip(1.0 - sat / 0.3, 0.0, 1.0)))
        else:
            vivids.append(float(np.clip(sat / _PALETTE_SAT[obj["color"]], 0.0, 1.0)))

    # ---- C: composition
    if mdets:
        boxes = np.array([d["box"] for d in mdets], dtype=np.float64)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        centroid = (centres * areas[:, None]).sum(0) / max(areas.sum(), 1e-6)
        balance = float(np.clip(1.0 - np.linalg.norm(centroid - np.array([w / 2, h / 2])) / 24.0, 0, 1))
        margins = np.minimum.reduce([boxes[:, 0], boxes[:, 1], w - boxes[:, 2], h - boxes[:, 3]])
        in_frame = float(np.clip((margins - 1.0) / 3.0, 0.0, 1.0).mean())
        if len(boxes) > 1:
            gaps = []
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    gx_ = max(boxes[b, 0] - boxes[a, 2], boxes[a, 0] - boxes[b, 2])
                    gy_ = max(boxes[b, 1] - boxes[a, 3], boxes[a, 1] - boxes[b, 3])
                    gaps.append(max(gx_, gy_))
            spacing = float(np.clip(min(gaps) / 6.0, 0.0, 1.0))
        else:
            spacing = 1.0
        composition = 0.5 * balance + 0.3 * in_frame + 0.2 * spacing
    else:
        balance = in_frame = spacing = composition = 0.0

    contrast = float(np.mean(contrasts)) if contrasts else 0.0

    # ---- Q: cleanliness
    near_obj = ndimage.binary_dilation(seed, iterations=3)
    sig = []
    for axis in (0, 1):
        diff = np.abs(np.diff(img, axis=axis))  # [h', w', 3]
        valid = ~(near_obj[1:, :] | near_obj[:-1, :]) if axis == 0 else ~(near_obj[:, 1:] | near_obj[:, :-1])
        vals = diff[valid]
        sig.append(1.4826 * float(np.median(vals)) / np.sqrt(2.0) if vals.size > 50 else 30.0)
    sigma = min(sig)
    noise = float(np.clip(1.0 - (sigma - 2.5) / 10.0, 0.0, 1.0))
    sharpness = float(np.mean(sharps)) if sharps else 0.0
    covered = np.zeros((h, w), dtype=bool)
    for d in dets:
        covered |= d["mask"]
    covered = ndimage.binary_dilation(covered, iterations=2)
    stray = int((seed & ~covered).sum())
    tidiness = float(np.clip(1.0 - stray / 60.0, 0.0, 1.0))
    cleanliness = 0.4 * noise + 0.35 * sharpness + 0.25 * tidiness

    # ---- A: aesthetic
    if sizes:
        size_pref = float(np.mean(sizes))
        vivid = float(np.mean(vivids))
        aesthetic = 0.6 * size_pref + 0.4 * vivid
    else:
        size_pref = vivid = aesthetic = 0.0

    terms = {
        "fidelity": fidelity, "composition": composition, "contrast": contrast,
        "cleanliness": cleanliness, "aesthetic": aesthetic,
    }
    total = float(np.clip(sum(WEIGHTS[k] * v for k, v in terms.items()), 0.0, 1.0))
    terms.update({
        "taste": total, "n_detections": n_det, "n_matched": len(matched), "n_extra": n_extra,
        "balance": balance, "in_frame": in_frame, "spacing": spacing, "noise_sigma": sigma,
        "noise": noise, "sharpness": sharpness, "stray_pixels": stray, "tidiness": tidiness,
        "size_pref": size_pref, "vividness": vivid,
    })
    return terms


def taste(image: Any, record: dict) -> float:
    """Hidden taste of ``image`` (PIL, [3, H, W] / [H, W, 3] array or tensor) for a pref
    ``record``, in [0, 1]; NaN when ``record`` has no ``"objects"`` (not a pref record)."""
    return float(taste_terms(image, record)["taste"])


def taste_batch(images: Any, records: Sequence[dict]) -> np.ndarray:
    """Taste of every image of a batch (tensor [B, 3, H, W] in [0, 1], uint8 array [B, H, W, 3]
    or a list) against its record; float64 array [B] (NaN off pref records)."""
    if len(images) != len(records):
        raise ValueError(f"got {len(images)} images and {len(records)} records")
    return np.array([taste(images[i], records[i]) for i in range(len(records))], dtype=np.float64)
