"""Object detector of the tiny world (numpy + scipy.ndimage, no learned weights).

Pipeline for one image:

1. background = per-channel median of the image (objects cover well under half of it);
2. distance of every pixel to the background (RGB Euclidean); the seed mask is the 3x3-smoothed
   distance above ``SEED_THRESHOLD``; 8-connected components smaller than ``MIN_AREA`` pixels
   (or with a box side under 7 px) are dropped;
3. per component, an alpha (coverage) map = (distance - floor) / (contrast - floor), with
   contrast the component's 90th percentile distance and floor the image's median distance (the
   background's own noise level): this undoes anti-aliasing, blur and noise bias, whatever the
   colour;
4. shape: the alpha map inside the component's box (alpha >= 0.5) is resampled to an 8x8 grid;
   the class is the nearest shape template (this world's shapes rendered at every side from
   spec.OBJECT_SIZE_MIN - 1 to OBJECT_SIZE_MAX + 1 px in 0.5 px steps, at 3x3 sub-pixel offsets); distance = RMS grid difference plus an
   aspect-ratio term;
5. confidence = fit * sep, fit = 1 / (1 + (d1 / 0.2)^6), sep = 1 / (1 + (d1 / d2 / 0.75)^8),
   with d1 the distance to the best class and d2 to the second best class: about 1 (> 0.9) for
   a clean render, low for a blob that looks like no shape (fit) or like two shapes (sep);
6. colour = nearest palette colour (spec.COLORS) in CIE Lab of the mean colour of the
   component's core (alpha >= 0.75);
7. non-objects: a component whose core colour varies a lot (a sign with letters) or that has
   holes (letters such as O, A, 8) is labelled ``"text"`` with confidence 0 (dropped by every
   GenEval threshold) and is only returned with ``keep_rejected=True``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from opd_bench.world import spec

SEED_THRESHOLD = 38.0
MIN_AREA = 30
MIN_SIDE = 7
GRID = 8
ASPECT_WEIGHT = 0.25
FIT_SCALE = 0.2
SEP_SCALE = 0.75
TEXT_COLOUR_STD = 32.0
HOLE_FRACTION = 0.04
TEMPLATE_OFFSETS = 3
TEMPLATE_SIDE_STEP = 0.5
TEMPLATE_BLUR = 0.8


# --------------------------------------------------------------------------------------------
# colour


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB values in 0-255, shape [..., 3] -> CIE Lab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
         [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


_PALETTE_LAB = _srgb_to_lab(np.array([spec.COLORS[c] for c in spec.COLOR_NAMES]))


def colour_name(rgb: Sequence[float]) -> str:
    """GenEval colour name nearest to an RGB triple (0-255) in CIE Lab."""
    lab = _srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    return spec.COLOR_NAMES[int(np.argmin(((_PALETTE_LAB - lab) ** 2).sum(-1)))]


# --------------------------------------------------------------------------------------------
# image input


def to_array(image: Any) -> np.ndarray:
    """PIL image, float tensor/array [3, H, W] or [H, W, 3] in [0, 1], or uint8 array ->
    float32 [H, W, 3] in 0-255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor; a uint8 one stays uint8 (0-255), floats (bfloat16 too) become float32
        import torch  # already loaded, since a tensor came in

        image = image.detach().cpu()
        image = (image if image.dtype == torch.uint8 else image.float()).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected one image with 3 dimensions, got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.transpose(arr, (1, 2, 0))
    if arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, [3, H, W] or [H, W, 3], got shape {arr.shape}; convert it to RGB first")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected uint8 (0-255) or floats in [0, 1], got {arr.dtype}; convert the image to one of them")
    if arr.size and float(np.nanmax(arr)) > 2.0:  # generated images overshoot 1 a little; 0-255 floats would clip to white
        raise ValueError(f"float images must be in [0, 1], got values up to {float(np.nanmax(arr)):.1f}; "
                         "divide by 255, or pass uint8")
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0



# --------------------------------------------------------------------------------------------
# shape features and templates


def _grid_feature(alpha_crop: np.ndarray) -> np.ndarray:
    h, w = alpha_crop.shape
    grid = np.asarray(
        Image.fromarray(alpha_crop.astype(np.float32), "F").resize((GRID, GRID), Image.BOX),
        dtype=np.float32,
    ).ravel()
    aspect = np.float32(ASPECT_WEIGHT * np.log(w / h) * np.sqrt(GRID * GRID))
    return np.concatenate([np.clip(grid, 0, 1), [aspect]])


def _box_of(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Template features [N, GRID*GRID+1] and their labels [N]: class index + 7 * bank, with
    bank 0 the crisp renders and bank 1 the blurred ones.

    Each template is one shape drawn by the renderer on a plain background and passed through
    the same alpha estimation as a detection, so that clean renders match a template closely.
    """
    from opd_bench.world.render import shape_alpha

    feats, labels = [], []
    grey = np.full(3, 150.0, dtype=np.float32)
    colours = [np.asarray(spec.COLORS[c], np.float32) for c in ("red", "blue", "yellow", "black")]
    for ci, shape in enumerate(spec.SHAPES):
        for side in np.arange(spec.OBJECT_SIZE_MIN - 1.0, spec.OBJECT_SIZE_MAX + 1.5, TEMPLATE_SIDE_STEP):
            for blur, n_off in ((0.0, TEMPLATE_OFFSETS), (TEMPLATE_BLUR, 2)):
                for k in range(n_off**2):
                    ox, oy = (k % n_off) / n_off, (k // n_off) / n_off
                    box = (4.0 + ox, 4.0 + oy, float(side))
                    alpha = shape_alpha(shape, box, size=int(side) + 9)
                    if blur:
                        alpha = ndimage.gaussian_filter(alpha, blur, mode="constant")
                    alpha = alpha[..., None]
                    img = np.rint(grey * (1 - alpha) + colours[k % 4] * alpha)
                    for comp in _components(img):
                        feats.append(_grid_feature(comp["crop"]))
                        labels.append(ci + (len(spec.SHAPES) if blur else 0))
    return np.stack(feats), np.asarray(labels)


def classify_shape(alpha_crop: np.ndarray) -> tuple[str, float, float, float]:
    """(class, confidence, d1, d2) of an alpha crop tight around one object."""
    feats, labels = _templates()
    f = _grid_feature(alpha_crop)
    d = np.sqrt(((feats - f) ** 2).sum(-1) / (GRID * GRID))
    n_cls = len(spec.SHAPES)
    per_label = np.full(2 * n_cls, np.inf)
    np.minimum.at(per_label, labels, d)
    per_bank = per_label.reshape(2, n_cls)
    bank, best = np.unravel_index(int(np.argmin(per_bank)), per_bank.shape)
    # d2: the best other class in the same bank (crisp vs crisp, blurred vs blurred)
    d1 = float(per_bank[bank, best])
    d2 = float(np.min(np.delete(per_bank[bank], best)))
    fit = 1.0 / (1.0 + (d1 / FIT_SCALE) ** 6)
    sep = 1.0 / (1.0 + (d1 / max(d2, 1e-6) / SEP_SCALE) ** 8)
    return spec.SHAPES[int(best)], float(fit * sep), d1, d2


# --------------------------------------------------------------------------------------------
# detection


def _components(img: np.ndarray) -> list[dict]:
    """Candidate objects of an image [H, W, 3] (0-255): window, alpha map, tight crop, colour."""
    h, w, _ = img.shape
    bg = np.median(img.reshape(-1, 3), axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    floor = float(np.median(dist))  # typical background deviation (noise, texture)
    smooth = ndimage.uniform_filter(dist, size=3, mode="nearest")
    seed = smooth > SEED_THRESHOLD
    labels, n = ndimage.label(seed, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    comps: list[dict] = []
    areas = ndimage.sum_labels(seed, labels, index=np.arange(1, n + 1))
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if areas[k - 1] < MIN_AREA:
            continue
        ys, xs = sl
        if ys.stop - ys.start < MIN_SIDE or xs.stop - xs.start < MIN_SIDE:
            continue
        # local window with a 2-pixel margin
        y0w, y1w = max(ys.start - 2, 0), min(ys.stop + 2, h)
        x0w, x1w = max(xs.start - 2, 0), min(xs.stop + 2, w)
        comp = labels[y0w:y1w, x0w:x1w] == k
        region = ndimage.binary_dilation(comp, iterations=1)
        d_loc = dist[y0w:y1w, x0w:x1w]
        contrast = float(np.percentile(d_loc[comp], 90))
        if contrast <= floor:
            continue
        alpha = np.clip((d_loc - floor) / (contrast - floor), 0.0, 1.0)
        alpha = np.where(region, alpha, 0.0).astype(np.float32)
        box = _box_of(alpha)
        if box is None:
            continue
        bx0, by0, bx1, by1 = box
        core = alpha >= 0.75
        if not core.any():
            core = alpha >= alpha.max() * 0.9
        pix = img[y0w:y1w, x0w:x1w][core]
        solid = alpha >= 0.5
        holes = int(ndimage.binary_fill_holes(solid).sum() - solid.sum())
        comps.append({
            "window": (x0w, y0w, x1w, y1w),
            "box": (float(bx0 + x0w), float(by0 + y0w), float(bx1 + x0w), float(by1 + y0w)),
            "crop": alpha[by0:by1, bx0:bx1],
            "solid": solid,
            "colour_rgb": pix.mean(0),
            "colour_std": float(pix.std(0).max()),
            "holes": holes,
        })
    return comps


def detect(image: Any, masks: bool = False, keep_rejected: bool = False) -> list[dict]:
    """Detections [{"class", "confidence", "box": (x0, y0, x1, y1), "color", "mask"?}]."""
    img = to_array(image)
    h, w, _ = img.shape
    out: list[dict] = []
    for comp in _components(img):
        solid = comp["solid"]
        textlike = comp["colour_std"] > TEXT_COLOUR_STD or comp["holes"] > HOLE_FRACTION * solid.sum()
        if textlike:
            name, conf = "text", 0.0
            if not keep_rejected:
                continue
        else:
            name, conf, _, _ = classify_shape(comp["crop"])
        det = {"class": name, "confidence": conf, "box": comp["box"],
               "color": colour_name(comp["colour_rgb"])}
        if masks:
            x0w, y0w, x1w, y1w = comp["window"]
            full = np.zeros((h, w), dtype=bool)
            full[y0w:y1w, x0w:x1w] = solid
            det["mask"] = full
        out.append(det)
    out.sort(key=lambda d: -d["confidence"])
    return out


def detect_batch(images: Any, masks: bool = False) -> list[list[dict]]:
    """Detections of every image of a batch (tensor [B, 3, H, W] in [0, 1] or a list)."""
    return [detect(images[i], masks=masks) for i in range(len(images))]


def main(argv: list[str] | None = None) -> int:
    """Renderer accuracy on a GenEval prompt file and detector throughput.

    python -m opd_bench.world.detect [--prompts FILE] [--seeds N]
    """
    import argparse
    import time

    from opd_bench import geneval
    from opd_bench.world import prompts, render

    parser = argparse.ArgumentParser(description="tiny-world renderer accuracy + detector speed")
    parser.add_argument("--prompts", default=str(prompts.DEFAULT_DIR / "geneval_test.jsonl"))
    parser.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    args = parser.parse_args(argv)
    records = prompts.read_jsonl(args.prompts)
    t0 = time.perf_counter()
    _templates()
    t_templates = time.perf_counter() - t0
    images, metas = [], []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for rec in records:
            images.append(render.render(rec, seed))
            metas.append(rec)
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_dets = [detect(im) for im in images]
    t_detect = time.perf_counter() - t0
    verdicts = [geneval.evaluate_image(m, d)[0] for m, d in zip(metas, all_dets)]
    summary = geneval.summarise([m["tag"] for m in metas], verdicts)
    n = len(images)
    print(f"{n} images ({len(records)} prompts x {args.seeds} seeds) from {args.prompts}")
    print(f"renderer accuracy: overall (mean of per-tag) {summary['overall']:.4f}, "
          f"fraction of images correct {sum(verdicts) / n:.4f}")
    for tag, acc in summary["per_tag"].items():
        print(f"  {tag:14s} {acc:.4f}  (n={summary['counts'][tag]})")
    print(f"templates built in {t_templates:.2f} s (once per process)")
    print(f"render: {n / t_render:.1f} images/s; detect: {n / t_detect:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
