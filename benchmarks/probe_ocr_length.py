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
from opd_bench.benchmarks import PromptSubset
from opd_bench.evaluate import SamplerSettings, evaluate_benchmark, policy_source
from opd_bench.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders or shipped aliases (tiny)")
    parser.add_argument("--length", type=int, default=1)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = suites.get("tiny")
    spec = PromptSubset(suite.benchmark("ocr"), lambda p: len(p.metadata.get("text", "")) == args.length)
    settings = SamplerSettings.of_suite(suite)
    reward = {"main": spec.build_reward()}
    for model in args.models:
        policy = Policy.from_pretrained(suites.resolve_model(model))
        result = evaluate_benchmark(spec, policy_source(policy, settings), seed=0, images_per_prompt=args.images,
                                    rewards=reward, progress=False)
        print(json.dumps({"model": model, "length": args.length, "ocr": round(result["score"], 4), "images": result["num_images"]}))


if __name__ == "__main__":
    main()
