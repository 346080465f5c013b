"""Two probes behind the standard run's cheaper cells (docs/benchmarks.md, "Cheaper cells, the same numbers").

    python benchmarks/probe_cheaper_cells.py monitor --run runs/standard-v12 [--steps 10 --reps 2]
    python benchmarks/probe_cheaper_cells.py merged --run runs/standard-v12 [--reps 3]

``monitor``: the standard preset's OPD student from the run's teachers, ``--steps`` steps with and
without scoring its own rollouts with the task rewards, alternated ``--reps`` times; prints the wall
seconds of each and the sha256 of the saved adapter (equal: the monitoring changes no weight).
``merged``: 32 GenEval test prompts drawn with the suite's evaluation sampler by the base, by the
run's first OPD student as a LoRA adapter and by a copy of the transformer with that adapter merged
into its weights; prints the seconds of each and how far the merged copy's images are from the
adapter's. One thread, the run's shipped base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings, policy_source
from opd_bench.policy import Policy
from opd_bench.presets import plan


def _policy(suite) -> Policy:
    return Policy.from_pretrained(suites.resolve_model(suite.default_model), resolution=suite.image_side())


def monitor(run: Path, steps: int, reps: int) -> None:
    from opd_bench.trainers.opd import OPDTrainer

    suite = suites.get("tiny")
    teachers = {t: sorted((run / "teachers").glob(f"{t}-*/final"))[-1] for t in suite.tasks}
    specs = {t: suite.benchmark(t) for t in suite.tasks}
    rewards = {t: spec.build_reward("train") for t, spec in specs.items()}
    for rep in range(reps):
        for monitored in (True, False) if rep % 2 == 0 else (False, True):
            config = replace(plan("standard").opd, steps=steps, eval_every=0, checkpoint_every=0, monitor_rewards=monitored)
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                final = OPDTrainer(config, policy=_policy(suite), prompts={t: s.prompts("train") for t, s in specs.items()},
                                   teachers=teachers, run_dir=folder, adapter="student", rewards=rewards).train(progress=False)
                seconds = time.perf_counter() - start
                digest = hashlib.sha256((Path(final) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
            print(json.dumps({"probe": "monitor", "rep": rep, "monitor_rewards": monitored, "steps": steps,
                              "seconds": round(seconds, 1), "adapter_sha256": digest}))


def merged(run: Path, reps: int) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    suite = suites.get("tiny")
    policy = _policy(suite)
    policy.load_adapter("student", run / "methods" / "opd" / "seed0" / "final")
    policy.add_full_copy("merged", trainable=False)
    for layer in policy._full["merged"].modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter("student")
            layer.enable_adapters(True)  # a disabled layer would unmerge itself at its first forward
            layer.merge(adapter_names=["student"])
    prompts = suite.benchmark("geneval").prompts("test", 32)
    source = policy_source(policy, SamplerSettings.of_suite(suite))
    images = {}
    for rep in range(reps):
        for name in (None, "student", "merged"):
            with policy.use(name):
                start = time.perf_counter()
                images[name] = source(prompts, 0, 0)
                seconds = time.perf_counter() - start
            print(json.dumps({"probe": "merged", "rep": rep, "model": name or "base", "images": len(prompts),
                              "seconds": round(seconds, 2)}))
    print(json.dumps({"probe": "merged", "max_abs_pixel_diff_merged_vs_adapter":
                      float((images["merged"] - images["student"]).abs().max())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["monitor", "merged"])
    parser.add_argument("--run", type=Path, required=True, help="a finished standard run (teachers, OPD students)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe == "monitor":
        monitor(args.run, args.steps, args.reps)
    else:
        merged(args.run, args.reps)


if __name__ == "__main__":
    main()
