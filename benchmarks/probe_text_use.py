"""Does a base model use the words of its prompt? The x0 error with a wrong word over the right one.

Renders seven single objects of the tiny world, noises their latents to each sigma, and asks the
denoiser for x0 under every image's own prompt and under the other images' prompts. Printed per
sigma: mean x0 error with another shape's prompt (same colour) / with the own prompt, and the same
for another colour's prompt (same shape), and for another quoted text on the same sign (one
character, then four). 1.00 means the model ignores that word or text.

``--paths`` also swaps only one of SD3's two conditioning paths at a time: the per-token context
(joint attention) or the pooled vector (the AdaLN modulation), to see which one carries a word.

    python benchmarks/probe_text_use.py [MODEL] [--paths]   # MODEL: a pipeline folder, default the shipped base
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from opd_bench import suites
from opd_bench.policy import Policy
from opd_bench.world.render import render

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond"]
COLOURS = ["red", "blue", "yellow", "green", "purple", "white", "black"]
SIGMAS = (0.4, 0.6, 0.8, 0.9)
CHARACTERS = ["A", "K", "7", "R", "3", "X", "O"]
TEXTS = ["K7AB", "R3XO", "MZ42", "QTE8", "H5WN", "CKOI", "Y9DP"]


def record(shape: str, colour: str) -> dict:
    return {"tag": "single_object", "include": [{"class": shape, "count": 1, "color": colour}],
            "prompt": f"a photo of a {colour} {shape}"}


def sign(text: str) -> dict:
    return {"text": text, "surface": "sign", "prompt": f'a sign that says "{text}"'}


@torch.no_grad()
def wrong_word_ratios(policy: Policy, records: list[dict], swap: str = "both") -> dict[float, float]:
    """``swap``: which conditioning comes from the other prompt: "both", "context" or "pooled"."""
    pipe, transformer = policy.pipeline, policy.pipeline.transformer
    images = torch.stack([torch.from_numpy(np.array(render(r, k).convert("RGB"))).permute(2, 0, 1).float() / 255
                          for k, r in enumerate(records)])
    z = policy.encode_images(images)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[r["prompt"] for r in records], prompt_2=None, prompt_3=None,
                                              device="cpu", do_classifier_free_guidance=False, max_sequence_length=1)
    n, out = len(records), {}
    for sigma in SIGMAS:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        xt = (1 - sigma) * z + sigma * noise
        errors = torch.zeros(n, n)  # [image, prompt]
        for j in range(n):
            context = embeds[j : j + 1].expand(n, -1, -1) if swap in ("both", "context") else embeds
            vector = pooled[j : j + 1].expand(n, -1) if swap in ("both", "pooled") else pooled
            v = transformer(hidden_states=xt, timestep=torch.full((n,), sigma * 1000.0), encoder_hidden_states=context,
                            pooled_projections=vector, return_dict=False)[0]
            errors[:, j] = ((xt - sigma * v - z) ** 2).mean(dim=(1, 2, 3))
        wrong = (errors.sum() - errors.diag().sum()) / (n * n - n)
        out[sigma] = float(wrong / errors.diag().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="tiny")
    ap.add_argument("--paths", action="store_true", help="also swap the context tokens and the pooled vector alone")
    args = ap.parse_args()
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    for name, records in (("shape", [record(s, "red") for s in SHAPES]), ("colour", [record("circle", c) for c in COLOURS]),
                          ("character", [sign(c) for c in CHARACTERS]), ("4-character text", [sign(t) for t in TEXTS])):
        for swap in ("both", "context", "pooled") if args.paths else ("both",):
            ratios = wrong_word_ratios(policy, records, swap)
            what = "" if swap == "both" else f" ({swap} only)"
            print(f"wrong {name}{what} / own prompt, x0 error by sigma: " + "  ".join(f"{s}: {r:.3f}" for s, r in ratios.items()))


if __name__ == "__main__":
    main()
