"""Could the OCR reward cost less without changing it? Detector sizes against the suite's setting.

    python benchmarks/probe_ocr_speed.py [--prompts 160] [--images 2] [--threads 1]

The OCR engine is about 40% of a final evaluation of the tiny suite and about half of the OCR
teacher's time, and most of it is the text detector run on a 256 px image (a 64 px image upscaled
3x, padded and rounded up). This draws the base model's own evaluation images for the first
``--prompts`` OCR test prompts (the suite's evaluation sampler and noise, ``--images`` per prompt)
and the renderer's correct images for the same prompts, then scores both with the suite's setting
(upscale 3, pad 24, detector side 256) and with cheaper ones. For each setting it prints the
milliseconds per image, the mean reward, and the share of images whose reward is unchanged: a
setting is a free speed-up only if that share is 1.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# (upscale, pad, detector side): the suite's setting first
SETTINGS = [(3, 24, 256), (2, 16, 160), (2, 8, 128), (1, 8, 128), (2, 0, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from opd_bench import suites
    from opd_bench.evaluate import SamplerSettings, policy_source, renderer_source
    from opd_bench.policy import Policy
    from opd_bench.rewards.ocr import OCRReward

    suite = suites.get("tiny")
    prompts = [p for p in suite.benchmark("ocr").prompts("test", args.prompts) for _ in range(args.images)]
    policy = Policy.from_pretrained(suites.resolve_model(suite.default_model), resolution=suite.image_side())
    generate = policy_source(policy, SamplerSettings.of_suite(suite))
    with torch.no_grad():
        drawn = torch.cat([generate(prompts[i:i + 32], 0, i) for i in range(0, len(prompts), 32)])
    rendered = renderer_source()(prompts, 0, 0)
    texts, metadata = [p.text for p in prompts], [p.metadata for p in prompts]

    reference = None
    for upscale, pad, side in SETTINGS:
        reward = OCRReward(upscale=upscale, pad=pad, engine_options={"det_limit_side_len": side, "num_threads": args.threads})
        reward(drawn[:2], texts[:2], metadata[:2])  # warm-up
        start = time.perf_counter()
        base = reward(drawn, texts, metadata).scores
        ms = 1000 * (time.perf_counter() - start) / len(prompts)
        truth = reward(rendered, texts, metadata).scores
        reference = reference or (base, truth)
        print(json.dumps({
            "upscale": upscale, "pad": pad, "detector_side": side, "ms_per_image": round(ms, 1),
            "base_mean": round(base.mean().item(), 4), "base_unchanged": round((base == reference[0]).float().mean().item(), 3),
            "base_mean_abs_change": round((base - reference[0]).abs().mean().item(), 4),
            "renderer_mean": round(truth.mean().item(), 4), "renderer_unchanged": round((truth == reference[1]).float().mean().item(), 3),
        }), flush=True)


if __name__ == "__main__":
    main()
