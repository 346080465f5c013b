"""Does this machine draw the base's evaluation images as another did? Prints a sha256 of the
base's images for the first N pref test prompts (2 images each, the standard run's evaluation
sampler: 10 ODE steps, CFG 4.5, noise seed 0, one thread) and their learned-preference scores,
with the commit (and uncommitted state) of the tree whose code drew them, torch and the CPU model.

Run it with two checkouts on one machine (``PYTHONPATH=OTHER_CHECKOUT python ...``) to tell a code
change from a host change: the same hash from both means the code draws the same images here, and
scores unlike another run's recorded ``per_image['base']['0']['pref']`` then point at the host.
Every loaded ``opd_bench`` module must come from the tree ``opd_bench`` itself was imported from
(the editable install maps ``opd_bench.trainers`` to its own checkout whatever PYTHONPATH says);
the script refuses to compare otherwise.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

import opd_bench
from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, policy_source
from opd_bench.policy import Policy
from opd_bench.rewards.base import call_reward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import provenance, stray_modules  # noqa: E402

TREE = Path(opd_bench.__file__).resolve().parents[1]  # the checkout the user chose (PYTHONPATH or the install)


def check_one_tree() -> None:
    stray = stray_modules(TREE)
    if stray:
        module = sys.modules[stray[0]]
        raise SystemExit(f"{stray[0]} was imported from {Path(module.__file__).parent}, not from the chosen tree {TREE}; "
                         f"run with a virtual environment where {TREE} is the installed opd_bench (pip install -e {TREE})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    check_one_tree()
    torch.set_num_threads(1)
    spec = suites.get("tiny").benchmark("pref")
    test = spec.prompts("test", 160)[: args.prompts]
    policy = Policy.from_pretrained(suites.resolve_model("tiny"), device="cpu")
    chosen = [prompt for prompt in test for _ in range(2)]
    images = policy_source(policy, SamplerSettings(10, 4.5, 0.0))(chosen, 0, 0)
    scores = call_reward(spec.build_reward(), spec.name, images, [p.text for p in chosen], [p.metadata for p in chosen]).scores
    check_one_tree()  # again: sampling and the reward import modules lazily
    code = {"tree": str(TREE), **provenance(TREE)}
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    print(f"code: {TREE} at {code['commit']}{' (uncommitted changes)' if code['dirty'] else ''}, "
          f"torch {code['torch']}, CPU {code['cpu']}")
    print(f"images sha256: {digest[:16]}")
    print("pref scores:", " ".join(f"{v:.7f}" for v in scores.tolist()))
    print(json.dumps({**code, "prompts": args.prompts, "images_sha256": digest, "pref_scores": scores.tolist()}))


if __name__ == "__main__":
    main()
