"""Does this machine draw the base's evaluation images as another did? Prints a sha256 of the
base's images for the first N pref test prompts (2 images each, the standard run's evaluation
sampler: 10 ODE steps, CFG 4.5, noise seed 0, one thread) and their learned-preference scores.

Run it with two checkouts on one machine (``PYTHONPATH=OTHER_CHECKOUT python ...``) to tell a code
change from a host change: the same hash from both means the code draws the same images here, and
scores unlike another run's recorded ``per_image['base']['0']['pref']`` then point at the host.
"""

import argparse
import hashlib

import torch

import opd_bench
from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, policy_source
from opd_bench.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = suites.get("tiny").benchmark("pref")
    test = spec.prompts("test", 160)[: args.prompts]
    policy = Policy.from_pretrained(suites.resolve_model("tiny"), device="cpu")
    chosen = [prompt for prompt in test for _ in range(2)]
    images = policy_source(policy, SamplerSettings(10, 4.5, 0.0))(chosen, 0, 0)
    scores = spec.build_reward()(images, [p.text for p in chosen], [p.metadata for p in chosen]).scores
    print(f"code: {opd_bench.__file__}")
    print(f"images sha256: {hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]}")
    print("pref scores:", " ".join(f"{v:.7f}" for v in scores.tolist()))


if __name__ == "__main__":
    main()
