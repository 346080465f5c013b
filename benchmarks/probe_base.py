"""One probe of the tiny base model's design: pretrain at a fixed budget, evaluate, sample.

A probe is `opd-bench pretrain base` with some PretrainConfig fields changed, a fixed number of
VAE and denoiser steps (a step budget, not a time budget, so probes run side by side on a shared
machine stay comparable), then `opd-bench eval` on the tiny suite's test prompts (per-tag
scores) and a sample grid of fixed prompts. One JSON line per probe is appended to
``--table`` (default ``probes.jsonl`` in the output folder's parent) for docs/tiny_base.md.

    python benchmarks/probe_base.py --name vae2x_c4_p4 --out /work/probes \\
        --set vae_channels=[8,32] --set latent_channels=4 --set patch_size=4

Run it with OMP_NUM_THREADS=1 to run two probes on two cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GRID_PROMPTS = [
    "a photo of a red circle",
    "a photo of a square",
    "a photo of three blue squares",
    "a photo of a star left of a heart",
    'a sign that says "K7"',
    'a poster with the text "AB"',
]


def run(cmd: list[str]) -> float:
    start = time.time()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--num-images", type=int, default=24000)
    ap.add_argument("--limit", type=int, default=96, help="test prompts per benchmark")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args()

    folder = args.out / args.name
    model = folder / "model"
    sets = [x for pair in args.overrides for x in ("--set", pair)]
    minutes_train = run(["opd-bench", "pretrain", "base", "--out", str(model), "--num-images", str(args.num_images),
                         "--vae-steps", str(args.vae_steps), "--steps", str(args.steps), "--force", *sets]) / 60
    minutes_eval = run(["opd-bench", "eval", "--model", str(model), "--out", str(folder / "eval"), "--benchmarks", "geneval,ocr",
                        "--limit", str(args.limit), "--images-per-prompt", str(args.images_per_prompt), "--force"]) / 60
    prompts = [x for p in GRID_PROMPTS for x in ("--prompt", p)]
    run(["opd-bench", "sample", "--model", str(model), *prompts, "--images-per-prompt", "6", "--out", str(folder / "samples.png"), "--force"])

    info = json.loads((model / "pretrain_info.json").read_text())
    losses = [json.loads(line) for line in (model / "pretrain_log.jsonl").read_text().splitlines()]
    den = [r["loss"] for r in losses if r.get("phase") == "denoiser" and "loss" in r]
    results = json.loads((folder / "eval" / "results.json").read_text())
    row = {
        "name": args.name, "overrides": args.overrides, "vae_steps": args.vae_steps, "steps": args.steps,
        "num_images": args.num_images, "minutes_train": round(minutes_train, 1), "minutes_eval": round(minutes_eval, 1),
        "vae_reconstruction": info.get("vae_reconstruction_scores"),
        "final_loss": round(sum(den[-10:]) / max(len(den[-10:]), 1), 4),
        "eval": results, "date": time.strftime("%Y-%m-%d"),
    }
    table = args.table or args.out / "probes.jsonl"
    with table.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row)[:2000])


if __name__ == "__main__":
    sys.exit(main())
