"""Speed and accuracy of the OCR reward on 64x64 rendered text (the tiny suite's regime).

    PYTHONPATH=. python benchmarks/bench_ocr.py [--threads N] [--n 200] [--batch 64]

Speed: images/second of ``OCRReward`` on a batch of ``--batch`` rendered images (after one
warm-up batch, best and median of ``--repeats``). Accuracy: ``--n`` random strings of 1-4
characters from A-Z0-9 in DejaVu Sans Bold, half plain (dark on light), half on a coloured
sign with contrasting text; reports the mean reward, the fraction read exactly (reward 1) and
the same fraction when O/0 and I/L/1 count as equal (shape-identical in this font at 64 px).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from opd_bench.rewards.ocr import OCRReward, normalize_text

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
POINTS = {1: 48, 2: 34, 3: 24, 4: 18}


def render(text: str, rng: np.random.Generator, sign: bool, size: int = 64) -> torch.Tensor:
    if sign:
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        board = tuple(int(v) for v in rng.integers(0, 256, 3))
    else:
        background = board = tuple(int(v) for v in rng.integers(190, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if sign:
        draw.rectangle((3, 8, size - 4, size - 9), fill=board)
    light = 0.299 * board[0] + 0.587 * board[1] + 0.114 * board[2] > 128
    foreground = (15, 15, 15) if light else (245, 245, 245)
    points = POINTS[len(text)] - (6 if sign and len(text) == 1 else 0)
    font = ImageFont.truetype(FONT, points)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.text(xy, text, font=font, fill=foreground)
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def random_strings(n: int, rng: np.random.Generator) -> list[str]:
    return ["".join(rng.choice(list(ALPHABET), int(rng.integers(1, 5)))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="rapidocr")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--upscale", type=int, default=3)
    parser.add_argument("--pad", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    options = {} if args.threads is None else {"num_threads": args.threads}
    reward = OCRReward(args.engine, upscale=args.upscale, pad=args.pad, engine_options=options)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    reward(torch.zeros(1, 3, 64, 64), ['"A"'], [{}])
    build_s = time.perf_counter() - t0

    words = random_strings(args.batch, rng)
    images = torch.stack([render(w, rng, sign=i % 2 == 1) for i, w in enumerate(words)])
    prompts = [f'a sign that says "{w}"' for w in words]
    reward(images, prompts, [{}] * len(words))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        reward(images, prompts, [{}] * len(words))
        times.append(time.perf_counter() - t0)

    words = random_strings(args.n, rng)
    images = torch.stack([render(w, rng, sign=i % 2 == 1) for i, w in enumerate(words)])
    out = reward(images, [f'"{w}"' for w in words], [{}] * len(words))
    scores = out.scores
    fold = str.maketrans("oil", "011")
    loose = [
        normalize_text(w).translate(fold) in normalize_text(p).translate(fold)
        for w, p in zip(words, out.details["prediction"])
    ]
    misses = [(w, p) for w, p, s in zip(words, out.details["prediction"], scores.tolist()) if s < 1]

    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()}")
    print(f"engine={args.engine} upscale={args.upscale} pad={args.pad} threads={args.threads}")
    print(f"engine build + first image: {build_s:.2f} s")
    print(
        f"speed: batch {args.batch} of 64x64: best {args.batch / min(times):.1f} img/s, "
        f"median {args.batch / statistics.median(times):.1f} img/s ({args.repeats} repeats)"
    )
    print(
        f"accuracy on {args.n} strings of 1-4 chars: mean reward {scores.mean().item():.3f}, "
        f"exact {(scores == 1).float().mean().item():.3f}, "
        f"exact up to O/0 I/L/1 {sum(loose) / len(loose):.3f}"
    )
    for length in range(1, 5):
        sel = [s for w, s in zip(words, scores.tolist()) if len(w) == length]
        if sel:
            print(f"  {length} chars: n={len(sel)} mean reward {sum(sel) / len(sel):.3f}")
    print(f"misses ({len(misses)}): {misses[:30]}")


if __name__ == "__main__":
    main()
