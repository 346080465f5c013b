"""Does a base model use the words of its prompt? The x0 error with a wrong word over the right one.

Renders seven single objects of the tiny world, noises their latents to each sigma, and asks the
denoiser for x0 under every image's own prompt and under the other images' prompts. Printed per
sigma: mean x0 error with another shape's prompt (same colour) / with the own prompt, and the same
for another colour's prompt (same shape), and for another quoted text on the same sign (one
character, then four). 1.00 means the model ignores that word or text.

``--paths`` also swaps only one of SD3's two conditioning paths at a time: the per-token context
(joint attention) or the pooled vector (the AdaLN modulation), to see which one carries a word.

``--edits`` asks the same of the words that GenEval's hard tags turn on, one minimal edit per test
prompt (up to 24 per tag, each image paired with its own prompt edited): the second object's shape
(two_object), the count word (counting), the relation swapped (position: "left of" -> "right of"),
the two colours swapped (color_attr: "a red cross and a white square" -> "a white cross and a red
square"), and as controls the shape of single_object and colors. 1.00 here means the denoiser
draws the same whichever way the edited word reads.

``--coloured-position`` adds the position edit on the same prompts with two colours named and drawn
(``opd_bench.world.prompts.coloured_position``).

    python benchmarks/probe_text_use.py [MODEL] [--paths] [--edits [--coloured-position]]   # MODEL: a pipeline folder, default the shipped base
"""
from __future__ import annotations

import argparse
import re

import numpy as np
import torch

from opd_bench import suites
from opd_bench.geneval import TAGS
from opd_bench.policy import Policy
from opd_bench.world import spec
from opd_bench.world.prompts import coloured_position
from opd_bench.tiny.captions import OPPOSITE_RELATION
from opd_bench.world.render import render_batch

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond"]
COLOURS = ["red", "blue", "yellow", "green", "purple", "white", "black"]
SIGMAS = (0.4, 0.6, 0.8, 0.9)
EDIT_SIGMAS = (0.4, 0.6, 0.8, 0.9, 0.97)  # the layout (where objects go, how many) is settled at the highest
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
    z = policy.encode_images(render_batch(records, 0))  # record k drawn with seed k
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


def _replace_word(prompt: str, word: str, other: str, last: bool = False) -> str:
    spans = list(re.finditer(rf"\b{re.escape(word)}\b", prompt))
    start, end = spans[-1 if last else 0].span()
    return prompt[:start] + other + prompt[end:]


def edited_prompt(record: dict, rng: np.random.Generator) -> str | None:
    """``record``'s prompt with the one word its tag turns on changed (None: no such edit)."""
    prompt, tag, include = record["prompt"], record["tag"], record["include"]
    if tag in ("single_object", "colors"):
        shape = include[0]["class"]
        return _replace_word(prompt, shape, str(rng.choice([s for s in spec.SHAPES if s != shape])))
    if tag == "two_object":
        first, second = include[0]["class"], include[1]["class"]
        return _replace_word(prompt, second, str(rng.choice([s for s in spec.SHAPES if s not in (first, second)])), last=True)
    if tag == "counting":
        word = spec.COUNT_WORDS[include[0]["count"]]
        return _replace_word(prompt, word, str(rng.choice([w for n, w in spec.COUNT_WORDS.items() if n >= 2 and w != word])))
    if tag == "position":
        relation = next((r for r in OPPOSITE_RELATION if f" {r} " in prompt), None)
        if relation is None:
            raise ValueError(f"position prompt {prompt!r} names no relation")
        return prompt.replace(f" {relation} ", f" {OPPOSITE_RELATION[relation]} ", 1)
    if tag == "color_attr":
        a, b = include[0]["color"], include[1]["color"]
        if a == b:
            return None
        swapped = re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, prompt)
        return re.sub(r"\ban ([^aeiou])", r"a \1", re.sub(r"\ba ([aeiou])", r"an \1", swapped))
    raise ValueError(f"no edit for tag {tag!r}")


def coloured_records(records: list[dict]) -> list[dict]:
    """``records`` (position prompts) with two colours named and drawn, record k's drawn from seed [k, 7]."""
    return [coloured_position(r, np.random.default_rng([k, 7])) for k, r in enumerate(records)]


def edit_pairs(records: list[dict]) -> list[tuple[dict, str]]:
    """Each record with its edited prompt (records without an edit left out; the same every call)."""
    return [(r, e) for r, e in ((r, edited_prompt(r, np.random.default_rng([k, 5]))) for k, r in enumerate(records)) if e]


@torch.no_grad()
def context_change(policy: Policy, records: list[dict]) -> float:
    """How far the edit moves the text encoders' per-token context: mean |edited - own| / |own|."""
    pairs = edit_pairs(records)
    own, edited = (policy.encode(prompts).embeds.float() for prompts in ([r["prompt"] for r, _ in pairs], [e for _, e in pairs]))
    return float(((edited - own).flatten(1).norm(dim=1) / own.flatten(1).norm(dim=1)).mean())


@torch.no_grad()
def edit_ratios(policy: Policy, records: list[dict], noise_seeds: int = 2) -> dict[float, float]:
    """x0 error under each record's edited prompt / under its own, summed over images, per sigma
    (conditional velocity, the policy's active adapter; record k drawn with seed k % 3)."""
    pairs = edit_pairs(records)
    images = render_batch([r for r, _ in pairs], [k % 3 for k in range(len(pairs))])
    z = policy.encode_images(images.to(policy.device)).float()
    own, edited = policy.encode([r["prompt"] for r, _ in pairs]), policy.encode([e for _, e in pairs])
    out = {}
    for sigma in EDIT_SIGMAS:
        errors = {"own": 0.0, "edited": 0.0}
        for seed in range(noise_seeds):
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
            xt = (1 - sigma) * z + sigma * noise
            for name, embeds in (("own", own), ("edited", edited)):
                v = policy.velocity(xt, sigma, embeds).float()
                errors[name] += float(((xt - sigma * v - z) ** 2).sum())
        out[sigma] = errors["edited"] / errors["own"]
    return out


def geneval_edit_records(per_tag: int = 24) -> dict[str, list[dict]]:
    """The first ``per_tag`` test records of each GenEval tag of the tiny suite."""
    records = [p.metadata for p in suites.get("tiny").benchmark("geneval").prompts("test")]
    return {tag: [r for r in records if r["tag"] == tag][:per_tag] for tag in TAGS}


def geneval_edit_ratios(policy: Policy, per_tag: int = 24) -> dict[str, dict[float, float]]:
    """``edit_ratios`` on the first ``per_tag`` test prompts of each GenEval tag of the tiny suite."""
    return {tag: edit_ratios(policy, records) for tag, records in geneval_edit_records(per_tag).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="tiny")
    ap.add_argument("--paths", action="store_true", help="also swap the context tokens and the pooled vector alone")
    ap.add_argument("--edits", action="store_true", help="only the minimal edits of GenEval's tags (see above)")
    ap.add_argument("--coloured-position", action="store_true",
                    help="with --edits: also the position edit on its prompts with two colours named and drawn")
    args = ap.parse_args()
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    if args.edits:
        for tag, records in geneval_edit_records().items():
            ratios = edit_ratios(policy, records)
            print(f"{tag} edited / own prompt, x0 error by sigma: " + "  ".join(f"{s}: {r:.3f}" for s, r in ratios.items())
                  + f"  (context tokens moved by {context_change(policy, records):.2f} of their norm)")
            if tag == "position" and args.coloured_position:
                coloured = coloured_records(records)
                ratios = edit_ratios(policy, coloured)
                print("position, colours named, edited / own prompt, x0 error by sigma: "
                      + "  ".join(f"{s}: {r:.3f}" for s, r in ratios.items())
                      + f"  (context tokens moved by {context_change(policy, coloured):.2f} of their norm)")
        return
    for name, records in (("shape", [record(s, "red") for s in SHAPES]), ("colour", [record("circle", c) for c in COLOURS]),
                          ("character", [sign(c) for c in CHARACTERS]), ("4-character text", [sign(t) for t in TEXTS])):
        for swap in ("both", "context", "pooled") if args.paths else ("both",):
            ratios = wrong_word_ratios(policy, records, swap)
            what = "" if swap == "both" else f" ({swap} only)"
            print(f"wrong {name}{what} / own prompt, x0 error by sigma: " + "  ".join(f"{s}: {r:.3f}" for s, r in ratios.items()))


if __name__ == "__main__":
    main()
