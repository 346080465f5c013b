"""Are a base's objects drawn well enough to be detected? Per GenEval tag, base samples against the world's renders.

A GenEval-style image is scored by the world's detector, which keeps an object only if its shape is
classified with confidence above the rules' threshold (0.3; counting 0.9). This probe samples the first
``--per-tag`` test prompts of each tag (``--seeds`` images each, the suite's evaluation sampler) and
reports, per tag, how many objects the detector finds per image (every shape, kept or not; not the
components it calls text), the share GenEval keeps (``geneval.keep_detections``), and their median
confidence, with the same for the world's own renders of those
prompts (the ceiling). A base whose objects are there but not kept fails GenEval on drawing, not on
layout or counting; that is the first thing a candidate base must fix (docs/tiny_base.md).

``--position`` scores instead the position tag alone, strictly, on its test prompts as written and with
two colours named and drawn (``opd_bench.world.prompts.coloured_position``), with the share of images whose two
objects are both kept (and coloured as named): of those, the share placed right is what reading the
relation adds over chance (probes J1-J12 in docs/benchmarks.md).

    python benchmarks/probe_object_quality.py [MODEL] [--position]   # MODEL: a pipeline folder, default the shipped base
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, policy_source
from opd_bench.geneval import TAGS, keep_detections
from opd_bench.policy import Policy
from opd_bench.world.detect import detect
from opd_bench.world.render import render


def object_stats(images, records: list[dict]) -> dict:
    """Objects per image, the share GenEval keeps under each record's threshold, their median confidence."""
    found, kept = [], 0
    for image, record in zip(images, records, strict=True):
        shapes = detect(image)
        found += [shape["confidence"] for shape in shapes]
        kept += sum(len(group) for group in keep_detections(shapes, record).values())
    return {"objects_per_image": len(found) / len(records), "kept": kept / len(found) if found else 0.0,
            "median_confidence": float(np.median(found)) if found else 0.0}


def position_scores(draw, prompts, seeds: int) -> dict[str, dict]:
    """Strict score, and the share with both objects kept, of the position prompts plain and coloured."""
    from probe_text_use import coloured_records

    from opd_bench.geneval import evaluate_image
    from opd_bench.rollout import Prompt

    coloured = [Prompt(c["prompt"], p.task, c) for p, c in zip(prompts, coloured_records([p.metadata for p in prompts]))]
    out = {}
    for name, chosen in (("as written", list(prompts)), ("two colours named", coloured)):
        verdicts = [evaluate_image(p.metadata, detect(image))
                    for seed in range(seeds) for p, image in zip(chosen, draw(chosen, seed, 0), strict=True)]
        right = sum(ok for ok, _ in verdicts)
        # wrong only in the relation: every reason is about the target ("expected star left of target, found ...")
        placed = right + sum(all("target" in line for line in why.split("\n")) for ok, why in verdicts if not ok)
        out[name] = {"images": len(verdicts), "score": right / len(verdicts), "both_kept": placed / len(verdicts),
                     "right_when_both_kept": right / placed if placed else float("nan")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="tiny")
    parser.add_argument("--per-tag", type=int, default=28, help="test prompts per tag")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt (noise seeds 0..N-1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position", action="store_true", help="score the position prompts, plain and coloured (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = suites.get("tiny")
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    draw = policy_source(policy, SamplerSettings.of_suite(suite))
    prompts = suite.benchmark("geneval").prompts("test")
    if args.position:
        chosen = [p for p in prompts if p.metadata["tag"] == "position"][: args.per_tag]
        for name, row in position_scores(draw, chosen, args.seeds).items():
            print(f"position, {name}: {row['images']} images, strict score {row['score']:.3f}, both objects kept "
                  f"{row['both_kept']:.3f}, placed right when both kept {row['right_when_both_kept']:.2f}", flush=True)
        return
    print(f"{'tag':14s} {'base: objects/image':>20s} {'kept':>6s} {'median conf':>12s}   {'renders: objects/image':>23s} {'kept':>6s}")
    for tag in TAGS:
        chosen = [p for p in prompts if p.metadata["tag"] == tag][: args.per_tag]
        records = [p.metadata for p in chosen] * args.seeds
        images = torch.cat([draw(chosen, seed, 0) for seed in range(args.seeds)])
        renders = [render(record, k) for k, record in enumerate(records)]
        base, world = object_stats(images, records), object_stats(renders, records)
        print(f"{tag:14s} {base['objects_per_image']:20.2f} {base['kept']:6.2f} {base['median_confidence']:12.2f}   "
              f"{world['objects_per_image']:23.2f} {world['kept']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
