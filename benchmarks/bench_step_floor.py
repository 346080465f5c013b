"""How fast could one GRPO step be at the same arithmetic? The floor behind issue 11's 1.75x target.

    python benchmarks/bench_step_floor.py

Same model and step settings as ``bench_step_speedup.py`` (one thread). Prints one JSON object:
the step's matmul and convolution work (``FlopCounterMode``, over ``--steps`` steps), one thread's
fp32 ``addmm`` speed on the step's own shapes, the step's kernel time by kind (``torch.profiler``
self time), the step's CPU time without the profiler, and torch's tanh-GELU against the exact one
and against the same function written with a sigmoid.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step_speedup as speedup  # noqa: E402  (the same model and trainer settings)

KINDS = {"matmul": ("aten::addmm", "aten::mm", "aten::bmm"), "attention": ("flash_attention",),
         "gelu": ("aten::gelu",), "convolution": ("convolution",), "layer_norm": ("layer_norm",)}


def per_call_seconds(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    speedup.import_tree(speedup.ROOT)
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from opd_bench.policy import Policy
    from opd_bench.tiny import TinyConfig, save_tiny
    from opd_bench.training import TrainingRun

    clocks = []
    end_step = TrainingRun.end_step

    def timed_end_step(self, *a, **k):
        clocks.append(time.process_time())
        return end_step(self, *a, **k)

    TrainingRun.end_step = timed_end_step
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": 1}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        save_tiny(scratch / "model", TinyConfig(**speedup.MODEL), seed=0)
        policy = Policy.from_pretrained(str(scratch / "model"))
        speedup.make_trainer("grpo", policy, scratch / "timed", 1 + args.steps, None).train(progress=False)
        out["step_cpu_s"] = round(statistics.median(b - a for a, b in zip(clocks, clocks[1:])), 4)
        counter = FlopCounterMode(display=False)
        with counter:
            speedup.make_trainer("grpo", policy, scratch / "counted", args.steps, None).train(progress=False)
        flops = {str(k): v / args.steps for k, v in counter.get_flop_counts()["Global"].items()}
        out["gflop_per_step"] = {k: round(v / 1e9, 2) for k, v in flops.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            speedup.make_trainer("grpo", policy, scratch / "profiled", args.steps, None).train(progress=False)
    kernels = {kind: 0.0 for kind in [*KINDS, "other"]}
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if any(n in event.key for n in names)), "other")
        kernels[kind] += event.self_cpu_time_total / 1e6 / args.steps
    out["kernel_s_per_step"] = {k: round(v, 4) for k, v in kernels.items()}

    gemm = {}
    for rows, k, n in [(1408, 96, 96), (1408, 96, 384), (1408, 384, 96), (704, 96, 384), (2048, 2048, 2048)]:
        a, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
        gemm[f"{rows}x{k}x{n}"] = round(2 * rows * k * n / per_call_seconds(lambda: torch.addmm(b, a, w.t()), 20 if k > 1000 else 300) / 1e9, 1)
    out["addmm_gflops"] = gemm
    x, c = torch.randn(16 * 88, 384), math.sqrt(2 / math.pi)
    out["gelu_us_16x88x384"] = {
        "tanh (SD3's)": round(per_call_seconds(lambda: F.gelu(x, approximate="tanh"), 300) * 1e6),
        "exact": round(per_call_seconds(lambda: F.gelu(x), 300) * 1e6),
        "x*sigmoid(2z)": round(per_call_seconds(lambda: x * torch.sigmoid(x * (2 * c + 2 * c * 0.044715 * x * x)), 300) * 1e6),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
