"""Can a base model learn which glyph a character asks for, given nothing else to learn?

Fine-tunes the transformer and text encoders of MODEL on single-character scenes of the tiny world
(every surface, ``--per-char`` renders of each of the 36 characters, the pretraining loss and
captions), in chunks of 500 steps (each a fresh cosine schedule, transformer EMA 0.99), and prints
after each chunk the character-swap ratio of ``probe_text_use.py`` (x0 error under another sign's
character / under its own, at sigma 0.4 / 0.6 / 0.8 / 0.9; 1.00 = the character is ignored).
Saves the pipeline to ``--out``; score it with ``probe_ocr_length.py OUT --length 1``.
docs/tiny_base.md, rows G1-G3.

    python benchmarks/probe_glyph_finetune.py [MODEL] --out DIR [--steps 1500] [--lr 1e-3]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from probe_text_use import CHARACTERS, sign, wrong_word_ratios

from opd_bench import suites
from opd_bench.policy import Policy
from opd_bench.tiny import pretrain
from opd_bench.tiny.tokenizer import portable_tokenizer_class
from opd_bench.world import spec

CHUNK = 500


def single_character_records(per_char: int) -> list[dict]:
    records = []
    for char in spec.TEXT_ALPHABET:
        for k in range(per_char):
            surface = spec.TEXT_SURFACES[k % len(spec.TEXT_SURFACES)]
            prompt = f'the text "{char}"' if surface == "plain" else f'a {surface} that says "{char}"'
            records.append({"text": char, "surface": surface, "prompt": prompt})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-char", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(suites.resolve_model(args.model))
    pipe, vae = policy.pipeline, policy.pipeline.vae
    records = single_character_records(args.per_char)
    latents = pretrain.encode_dataset(vae, pretrain.render_dataset(records, 0), "cpu")
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    probe = [sign(c) for c in CHARACTERS]

    def report(step: int) -> None:
        ratios = wrong_word_ratios(policy, probe)
        print(json.dumps({"step": step, "character_swap_ratio": {s: round(r, 3) for s, r in ratios.items()}}), flush=True)

    report(0)
    done = 0
    while done < args.steps:
        n = min(CHUNK, args.steps - done)
        config = pretrain.PretrainConfig(steps=n, lr=args.lr, warmup=20 if done == 0 else 1, ema=0.99, seed=done)
        pretrain.train_denoiser(pipe, latents, records, config, log=lambda record: None)
        done += n
        report(done)
    pipe.save_pretrained(args.out)
    portable_tokenizer_class(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
