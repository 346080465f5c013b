"""Seconds per optimizer step and peak memory of DiffusionOPD and Flow-GRPO, through the real trainers.

CPU (tiny):   python benchmarks/bench_train_step.py
GPU (SD3.5-Medium-sized random transformer, bf16, 512 px, LoRA r=32), issue 6's measurement:
              python benchmarks/bench_train_step.py --size sd35m --device cuda --dtype bfloat16

Each method runs ``--steps`` optimizer steps with PAPER.md's step settings (10 sampling steps,
9 of them trained for OPD with three teacher adapters, noise level 0.7 and groups for GRPO);
the first step is a warm-up and the median of the others is reported, with the peak GPU memory.
Then the work of one step is counted (``torch.utils.flop_counter``: matmuls, convolutions and,
on a GPU, attention; a 2-step run's count minus a 1-step run's, so setup cancels), which gives
the achieved TFLOP/s and, on a GPU, its share of ``--peak-tflops`` (by default the card's bf16
dense peak, looked up from its name; the peak used is printed and recorded).
Rewards are the dependency-free ``toy/brightness`` (reward cost is not what is timed).
Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import build  # noqa: E402  (the same SD3.5-M-sized stand-in)


def step_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_seconds"] for r in rows if "loss" in r]
    return [b - a for a, b in zip(walls, walls[1:])]


def step_flops(make_trainer) -> float:
    """FLOPs of one optimizer step of the trainer ``make_trainer(steps, run_name)`` builds: a 2-step
    run's count minus a 1-step run's, so what a run does once (building, evaluating, saving)
    cancels. Call it after a run of the same trainer: the policy computes some things once (the
    negative prompt's embedding), which would otherwise fall into the 1-step count only."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            make_trainer(steps, f"flops{steps}").train(progress=False)
        counts.append(counter.get_total_flops())
    return float(counts[1] - counts[0])


# bf16 dense peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets; the first entry whose
# words all appear in torch.cuda.get_device_name() wins ("NVIDIA H100 80GB HBM3" is the SXM card).
BF16_PEAKS = ((("H100", "NVL"), 835.0), (("H200", "NVL"), 835.0), (("H100", "PCIe"), 756.0),
              (("H100", "SXM"), 989.0), (("H100", "HBM3"), 989.0), (("H200",), 989.0))
GUESSED_PEAK = 790.0  # issue 6's figure, for a card not in the table


def bf16_peak_tflops(device_name: str) -> tuple[float, str]:
    """The card's bf16 dense peak and where it came from (a table entry, or a guess)."""
    for words, peak in BF16_PEAKS:
        if all(word.lower() in device_name.lower() for word in words):
            return peak, f"{' '.join(words)} bf16 dense peak, from the device name {device_name!r}"
    return GUESSED_PEAK, f"a guess: {device_name!r} is not in the table; pass --peak-tflops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd35m"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per method (the first is a warm-up)")
    parser.add_argument("--prompts-per-task", type=int, default=4, help="OPD: prompts per teacher per step")
    parser.add_argument("--group", type=int, default=8, help="GRPO: images per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="GRPO: prompts per step")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--no-flops", action="store_true", help="skip counting a step's FLOPs (3 more steps per method)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense peak in this dtype, for the share reported (default: the card's bf16 peak, "
                             "from its name: H100 SXM and H200 989, H100/H200 NVL 835, H100 PCIe 756, else a guessed 790)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)

    from opd_bench import rewards
    from opd_bench.policy import Policy
    from opd_bench.rollout import Prompt
    from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
    from opd_bench.trainers.opd import OPDConfig, OPDTrainer

    pipe = build(args.size, args.device).to(args.device, getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    policy = Policy(pipe, gradient_checkpointing=args.checkpointing, resolution=512 if args.size == "sd35m" else 64)
    tasks = ("geneval", "ocr", "pref")
    prompts = {task: [Prompt(f"a photo of {i} {task} things", task) for i in range(16)] for task in tasks}
    reward = rewards.get("toy/brightness")
    lora = dict(lora_rank=args.rank, lora_alpha=2 * args.rank, micro_batch=args.micro_batch,
                eval_every=10**6, checkpoint_every=10**6)
    cuda = torch.device(args.device).type == "cuda"
    peak_tflops, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops is not None else (None, None)
    if cuda and peak_tflops is None:
        if args.dtype == "bfloat16":
            peak_tflops, peak_source = bf16_peak_tflops(torch.cuda.get_device_name())
        else:  # the table holds bf16 peaks only
            peak_source = f"none: no {args.dtype} peak is known; pass --peak-tflops for a share of peak"
    if cuda:
        print(f"peak used: {peak_tflops} TFLOP/s ({peak_source})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        policy.add_adapter("bench_teacher", rank=args.rank, alpha=2 * args.rank, trainable=False, seed=1)
        teacher = policy.save_adapter("bench_teacher", scratch / "teacher")
        runs = {
            "opd": lambda steps, name: OPDTrainer(
                OPDConfig(steps=steps, prompts_per_task=args.prompts_per_task, num_steps=10, train_fraction=0.9,
                          monitor_rewards=False, **lora),
                policy=policy, prompts=prompts, teachers={t: teacher for t in tasks}, run_dir=scratch / f"opd-{name}",
                adapter=f"bench_opd-{name}",
            ),
            "grpo": lambda steps, name: GRPOTrainer(
                # one rollout and one update per step, so every timed step costs the same
                GRPOConfig(steps=steps, prompts_per_step=args.prompts_per_step, group_size=args.group, num_steps=10,
                           noise_level=0.7, train_fraction=0.9, updates_per_rollout=1, **lora),
                policy=policy, prompts=[p for pool in prompts.values() for p in pool], rewards={t: reward for t in tasks},
                run_dir=scratch / f"grpo-{name}", adapter=f"bench_grpo-{name}",
            ),
        }
        for method, make in runs.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            make(args.steps, "timed").train(progress=False)
            seconds = step_seconds(scratch / f"{method}-timed")
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
            per_step = statistics.median(seconds) if seconds else None
            flops = None if args.no_flops else step_flops(make)
            achieved = flops / per_step / 1e12 if flops and per_step else None
            images = 3 * args.prompts_per_task if method == "opd" else args.prompts_per_step * args.group
            print(json.dumps({
                "method": method, "size": args.size, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                "dtype": args.dtype, "images_per_step": images, "lora_rank": args.rank, "micro_batch": args.micro_batch,
                "gradient_checkpointing": args.checkpointing,
                "seconds_per_step": round(per_step, 3) if per_step else None,
                "peak_memory_gb": peak,
                "tflop_per_step": float(f"{flops / 1e12:.4g}") if flops else None,
                "achieved_tflops": float(f"{achieved:.4g}") if achieved else None,
                "share_of_peak": round(achieved / peak_tflops, 3) if achieved and cuda and peak_tflops else None,
                "peak_tflops": peak_tflops, "peak_source": peak_source, "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }))


if __name__ == "__main__":
    main()
