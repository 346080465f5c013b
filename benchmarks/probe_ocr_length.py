"""OCR of a model on the test prompts whose quoted text has a given length (docs/tiny_base.md, P9).

    python benchmarks/probe_ocr_length.py MODEL [MODEL ...] --length 1 --images 4

Prints one JSON line per model: its OCR score (the suite's reward, 10 ODE steps, CFG 4.5, seed 0)
on every test prompt with ``--length`` characters, and how many images that is.
"""

from __future__ import annotations

import argparse
import json

import torch

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, evaluate_benchmark, policy_source
from opd_bench.policy import Policy


class TextsOfLength:
    """The OCR benchmark restricted to prompts whose text has ``length`` characters."""

    def __init__(self, spec, length: int):
        self.spec, self.length = spec, length

    def __getattr__(self, name):
        return getattr(self.spec, name)

    def prompts(self, split: str = "test", limit: int | None = None):
        chosen = [p for p in self.spec.prompts(split) if len(p.metadata.get("text", "")) == self.length]
        return chosen[:limit] if limit else chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders or shipped aliases (tiny)")
    parser.add_argument("--length", type=int, default=1)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = suites.get("tiny")
    spec = TextsOfLength(suite.benchmark("ocr"), args.length)
    settings = SamplerSettings(suite.num_steps, suite.guidance_scale, suite.noise_level)
    reward = {"main": spec.build_reward()}
    for model in args.models:
        policy = Policy.from_pretrained(suites.resolve_model(model))
        result = evaluate_benchmark(spec, policy_source(policy, settings), seed=0, images_per_prompt=args.images,
                                    rewards=reward, progress=False)
        print(json.dumps({"model": model, "length": args.length, "ocr": round(result["score"], 4), "images": result["num_images"]}))


if __name__ == "__main__":
    main()
