"""Draw docs/tiny_base_samples.png: the shipped base's samples next to the renderer's image.

Each row is one prompt: the first column is the world's own (correct) render, the next ones the
base model's samples for seeds 0..N-1 (10 ODE steps, CFG 4.5, the suite's sampler).

    python scripts/tiny_base_samples.py [--model tiny] [--seeds 6] [--out docs/tiny_base_samples.png]
"""
from __future__ import annotations

import argparse

import torch
from torchvision.utils import save_image

from opd_bench import suites
from opd_bench.policy import Policy
from opd_bench.rollout import Prompt, rollout
from opd_bench.world.render import render_batch

ROWS = [
    {"task": "geneval", "tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"task": "geneval", "tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a photo of a red square"},
    {"task": "geneval", "tag": "counting", "include": [{"class": "star", "count": 3}], "exclude": [{"class": "star", "count": 4}], "prompt": "a photo of three stars"},
    {"task": "geneval", "tag": "position", "include": [{"class": "heart", "count": 1}, {"class": "triangle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a triangle left of a heart"},
    {"task": "ocr", "text": "K7", "surface": "sign", "prompt": 'a sign that says "K7"'},
    {"task": "ocr", "text": "AB", "surface": "poster", "prompt": 'a poster with the text "AB"'},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", default="docs/tiny_base_samples.png")
    args = ap.parse_args()
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    suite = suites.get("tiny")
    rows = []
    for record in ROWS:
        truth = render_batch([record], [0])
        samples = rollout(policy, [Prompt(record["prompt"], record["task"], record)], images_per_prompt=args.seeds,
                          num_steps=suite.num_steps, noise_level=suite.noise_level, guidance_scale=suite.guidance_scale,
                          seed=0, keep={"images"}).images
        rows.append(torch.cat([truth, samples]))
    save_image(torch.cat(rows), args.out, nrow=args.seeds + 1, padding=2, pad_value=1.0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
