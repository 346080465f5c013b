"""How much signal is in one teacher step's gradient? (issue 11, teacher probes)

Takes ``--batches`` independent GRPO gradients of a fresh teacher adapter (the `standard` preset's
teacher config: each batch its own prompts and noise) on the tiny base and splits them into the
mean direction and the batch-to-batch noise:

    python benchmarks/probe_grad_snr.py --task geneval --task pref --batches 16

Per task, one JSON line: ``snr`` = |E g|^2 / E|g - E g|^2 for one batch (unbiased estimates; the
signal's jackknife standard error, and ``snr_upper`` at two of them), the images one gradient would
need for signal and noise to be equal (``images_for_snr_1``; ``..._at_least`` from ``snr_upper``),
the cosine between the mean gradients of the two halves of the batches, and the share of the
trained coordinates whose mean stands out of their own batch-to-batch noise (|t| > 3) against the
share pure noise would give.
"""

from __future__ import annotations

import json
import time

import scipy.stats
import torch

from opd_bench import suites
from opd_bench.presets import plan
from opd_bench.policy import Policy
from opd_bench.trainers.grpo import grpo_step
from opd_bench.training import sample_prompts, step_seed, student_optimizer
from probe_args import task_probe_parser


def signal_to_noise(grads: torch.Tensor) -> dict:
    """grads [K, D] (K independent batch gradients) -> signal, noise and their ratio per batch.

    ``signal`` = |E g|^2 as the mean dot product of distinct pairs (unbiased), with its jackknife
    standard error over the batches; ``noise`` = E|g - E g|^2 (unbiased).
    """
    count = grads.shape[0]
    gram = (grads.double() @ grads.double().T)
    off_diagonal = gram.sum() - gram.diagonal().sum()
    signal = float(off_diagonal / (count * (count - 1)))
    # leave batch k out: drop its row and column from the pair sum
    row = gram.sum(dim=1) - gram.diagonal()
    leave_one_out = (off_diagonal - 2 * row) / ((count - 1) * (count - 2))
    signal_se = float(((count - 1) / count * (leave_one_out - leave_one_out.mean()).pow(2).sum()).sqrt())
    noise = float(gram.diagonal().mean()) - signal  # E|g|^2 - |Eg|^2
    half = count // 2
    cosine = torch.nn.functional.cosine_similarity(grads[:half].mean(0), grads[half : 2 * half].mean(0), dim=0)
    # Adam moves each coordinate on its own: how many have a mean that stands out of their noise?
    moving = grads.std(dim=0) > 0
    t = grads.mean(dim=0)[moving] / (grads.std(dim=0)[moving] / count**0.5)
    return {"signal": signal, "signal_se": signal_se, "noise": noise, "snr": signal / noise,
            "snr_upper": (signal + 2 * signal_se) / noise, "half_cosine": float(cosine),
            "coords_t_above_3": float((t.abs() > 3).double().mean()),
            "coords_t_above_3_if_no_signal": float(2 * scipy.stats.t.sf(3, count - 1))}


def main() -> None:
    parser = task_probe_parser(__doc__)
    parser.add_argument("--batches", type=int, default=16)
    args = parser.parse_args()
    if args.batches < 4:
        parser.error("--batches must be at least 4 (two halves of two)")
    torch.set_num_threads(args.threads)

    config = plan("standard").teacher
    suite = suites.get("tiny")
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    for task in args.task:
        spec = suite.benchmark(task)
        rewards = {task: spec.build_reward("train")}
        pool = spec.prompts("train")
        params, _, _ = student_optimizer(policy, f"snr_{task}", config)
        started = time.perf_counter()
        grads = []
        for k in range(args.batches):
            for p in params:
                p.grad = None
            prompts = sample_prompts(pool, config.prompts_per_step, step_seed(args.seed, k, 1))
            grpo_step(policy, f"snr_{task}", prompts, rewards, config, seed=step_seed(args.seed, k, 2), params=params)
            grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        stats = signal_to_noise(torch.stack(grads))
        images = config.prompts_per_step * config.group_size
        print(json.dumps({
            "task": task, "batches": args.batches, "images_per_batch": images, "seed": args.seed,
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "grad_norm": float(f"{float(torch.stack(grads).norm(dim=1).mean()):.4g}"),
            **{k: float(f"{v:.4g}") for k, v in stats.items()},
            "images_for_snr_1": round(images / stats["snr"]) if stats["snr"] > 0 else None,
            "images_for_snr_1_at_least": round(images / stats["snr_upper"]) if stats["snr_upper"] > 0 else None,
        }), flush=True)


if __name__ == "__main__":
    main()
