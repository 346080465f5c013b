"""Time one rollout through ``opd_bench.rollout`` against the plain diffusers pipeline call.

CPU (tiny):   python benchmarks/bench_rollout.py
GPU (SD3.5-M-sized random transformer, bf16, 512 px):
              python benchmarks/bench_rollout.py --size sd35m --device cuda --dtype bfloat16

Both paths do the same work: encode prompts, ``--steps`` guided transformer calls on a batch of
``--batch`` images, decode. Our rollout also records per-step means, stds and log-probs.
Prints one JSON line per measurement (median of ``--repeats`` after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SD35M = dict(  # SD3.5-Medium's transformer; tiny text encoders (text cost is not what we time)
    num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def build(size: str, device: str = "cpu"):
    """The benchmark's random pipeline, its weights drawn directly on ``device``.

    Drawing a 2.2B-parameter transformer's initial weights on the CPU and then copying them over
    takes minutes; under ``torch.device(device)`` every parameter is created where it will run.
    """
    with torch.device(device):
        return _build(size)


def _build(size: str):
    from opd_bench.tiny import TinyConfig, build_pipeline

    if size == "tiny":
        return build_pipeline(TinyConfig(), seed=0)
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    pipe = build_pipeline(TinyConfig(text_hidden=2048, text_projection=1024, text_heads=16, text_layers=1), seed=0)
    pipe.transformer = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, **SD35M)
    pipe.vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe.register_modules(transformer=pipe.transformer, vae=pipe.vae)
    pipe.vae_scale_factor = 8
    return pipe


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd35m"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from opd_bench.policy import Policy
    from opd_bench.rollout import rollout

    dtype = getattr(torch, args.dtype)
    pipe = build(args.size, args.device).to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    policy = Policy(pipe)
    height = 512 if args.size == "sd35m" else 64
    prompts = [f"a photo of {i} red circles" for i in range(args.batch)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def ours():
        rollout(policy, prompts, num_steps=args.steps, noise_level=0.7, guidance_scale=args.guidance,
                height=height, width=height, keep={"images"})

    def plain():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=height,
                 width=height, output_type="pt", max_sequence_length=policy.max_sequence_length)

    ours_s, plain_s = timed(ours, args.repeats, sync), timed(plain, args.repeats, sync)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(json.dumps({
        "size": args.size, "device": device, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "batch": args.batch, "steps": args.steps, "guidance": args.guidance, "height": height,
        "rollout_s": round(ours_s, 3), "pipeline_s": round(plain_s, 3), "ratio": round(ours_s / plain_s, 3),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
