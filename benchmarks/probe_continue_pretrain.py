"""Continue a base's pretraining with one change, to test a base design without a full rebuild (issue 11).

A full ``opd-bench pretrain base`` takes about 80 minutes on the 2-core machine. A change to the
denoiser's training that leaves the VAE and the architecture alone (a ``PretrainConfig`` field such
as ``mixture``) can be tried more cheaply: load the base (``--model``, default the shipped one),
render the same training scenes, encode them with its own VAE and train its transformer and text
encoders for ``--steps`` more steps (a fresh warm-up and cosine from the config's ``lr``), with the
config the base was pretrained with (its ``pretrain_info.json``; the defaults where it has none)
and every ``--set FIELD=VALUE`` applied. A control run with no change and the same ``--steps``
separates the change from the extra steps (probes U1-U4 in docs/benchmarks.md).

``--add-layers N`` tests the transformer's depth the same way: N new joint blocks are inserted
before the last one, each starting as a no-op (its AdaLN-Zero modulations are zero, so both of its
residual branches are gated shut): the deeper model starts out computing exactly what the base
computes, and the continued steps decide what the extra depth buys.

The data and the trained parts can be narrowed to ask where a skill comes from (probes J1-J12):
``--only-tag TAG`` trains on one GenEval tag's scenes (with ``--set 'mixture={"geneval": 1.0}'``),
``--coloured-position`` names and draws two colours in every position scene, ``--freeze-text``
keeps the base's text encoders, and ``--reinit`` trains fresh ones and a fresh transformer instead.

The result is an ordinary pipeline folder; score it with ``opd-bench eval`` and the base checks of
docs/tiny_base.md (``probe_object_quality.py DIR``, ``probe_text_use.py DIR --edits``).

    python benchmarks/probe_continue_pretrain.py --out DIR --steps 4000 [--set FIELD=VALUE] [--add-layers N]
        [--only-tag TAG] [--coloured-position] [--freeze-text | --reinit]
    opd-bench eval --model DIR --out DIR/eval --seed 0
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from torch import nn

from opd_bench import suites
from opd_bench.geneval import TAGS
from opd_bench.io import atomic_write_json
from opd_bench.policy import Policy
from opd_bench.presets import set_fields
from opd_bench.tiny.build import save_pipeline
from opd_bench.tiny.pretrain import PretrainConfig, encode_dataset, render_dataset, train_denoiser, training_records


# What a continued pretraining keeps from its base (and the CPU it runs on): changing one needs a rebuild.
KEPT = {"vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_kl", "reconstruction_limit", "latent_channels",
        "vae_channels", "patch_size", "num_layers", "num_heads", "text_layers", "char_tokens", "device"}


def base_config(model_dir: Path, steps: int) -> PretrainConfig:
    """The config ``model_dir`` was pretrained with (the defaults where it records none), for ``steps`` more steps."""
    info = model_dir / "pretrain_info.json"
    recorded = json.loads(info.read_text()).get("config", {}) if info.exists() else {}
    names = {f.name for f in fields(PretrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}
    return replace(PretrainConfig(**values), steps=steps, max_minutes=None, device="cpu")


def deepen(transformer, extra: int) -> None:
    """Insert ``extra`` joint blocks before ``transformer``'s last one, each a no-op until trained."""
    from diffusers.models.attention import JointTransformerBlock

    config = transformer.config
    if config.dual_attention_layers:  # the rebuilt config would give the inserted blocks other indices' attention
        raise ValueError("--add-layers supports transformers without dual-attention layers (SD3, not SD3.5)")
    new = [JointTransformerBlock(dim=config.num_attention_heads * config.attention_head_dim,
                                 num_attention_heads=config.num_attention_heads,
                                 attention_head_dim=config.attention_head_dim, context_pre_only=False, qk_norm=config.qk_norm)
           for _ in range(extra)]
    for block in new:  # zero modulation: every gate 0, so the block adds nothing to either stream
        for norm in (block.norm1, block.norm1_context):
            nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(norm.linear.bias)
    blocks = list(transformer.transformer_blocks)
    transformer.transformer_blocks = nn.ModuleList(blocks[:-1] + new + blocks[-1:])
    transformer.register_to_config(num_layers=config.num_layers + extra)


def reinitialise(pipeline, seed: int) -> None:
    """Fresh random weights for the transformer and both text encoders, of the same configs (from seed)."""
    torch.manual_seed(seed)
    pipeline.transformer = type(pipeline.transformer).from_config(pipeline.transformer.config)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name)
        setattr(pipeline, name, type(encoder)(encoder.config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="tiny", help="the base to continue: the shipped one or a pipeline folder")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--add-layers", type=int, default=0, help="insert this many new joint blocks, each a no-op at first")
    parser.add_argument("--only-tag", help="train on the scenes of this GenEval tag only (e.g. position; with "
                        "--set 'mixture={\"geneval\": 1.0}' they are a sixth of the scenes)")
    parser.add_argument("--coloured-position", action="store_true",
                        help="name and draw two colours in every position scene (--set coloured_position=true)")
    parser.add_argument("--reinit", action="store_true",
                        help="start the transformer and text encoders from fresh random weights (the base's VAE and tokenizer kept)")
    parser.add_argument("--freeze-text", action="store_true", help="keep both text encoders as the base has them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    if args.add_layers < 0:
        parser.error(f"--add-layers must be >= 0, got {args.add_layers}")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty; name a new folder")
    torch.set_num_threads(args.threads)
    fixed = sorted(KEPT & {pair.partition("=")[0].strip() for pair in args.overrides})
    if fixed:
        parser.error(f"--set {fixed[0]} cannot change in a continued pretraining (it keeps the base's VAE and "
                     "architecture and runs on the CPU); rebuild with `opd-bench pretrain base` instead")
    model_dir = Path(suites.resolve_model(args.model))
    try:
        config = set_fields(base_config(model_dir, args.steps), args.overrides)
    except ValueError as error:
        parser.error(str(error))

    policy = Policy.from_pretrained(str(model_dir))
    pipeline = policy.pipeline
    if args.reinit:
        if args.freeze_text or args.add_layers:
            parser.error("--reinit trains fresh text encoders and transformer; drop --freeze-text and --add-layers")
        reinitialise(pipeline, config.seed)
    if args.add_layers:
        torch.manual_seed(config.seed)
        deepen(pipeline.transformer, args.add_layers)
    config = replace(config, num_layers=pipeline.transformer.config.num_layers)  # recorded as trained
    started = time.time()
    if args.coloured_position:
        config = replace(config, coloured_position=True)
    records, _ = training_records(config)  # the same scenes as the base's own pretraining (same seed)
    if args.only_tag:
        records = [r for r in records if r.get("tag") == args.only_tag]
        if len(records) < config.batch:
            parser.error(f"--only-tag {args.only_tag!r} leaves {len(records)} scenes, fewer than a batch; "
                         f"name a GenEval tag ({', '.join(TAGS)}) and keep geneval in the mixture")
    latents = encode_dataset(pipeline.vae, render_dataset(records, config.seed), "cpu")
    latents = (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "pretrain_log.jsonl").open("w") as log_file:
        summary = train_denoiser(pipeline, latents, records, config,
                                 lambda record: log_file.write(json.dumps(record) + "\n"),
                                 train_text_encoders=not args.freeze_text)
    save_pipeline(pipeline, args.out)
    atomic_write_json(args.out / "pretrain_info.json", {
        **summary, "continued_from": args.model, "overrides": args.overrides, "added_layers": args.add_layers,
        "reinitialised": args.reinit, "only_tag": args.only_tag, "coloured_position": config.coloured_position, "scenes": len(records),
        "text_encoders_trained": not args.freeze_text, "config": asdict(config),
        "total_seconds": time.time() - started, "torch": torch.__version__, "threads": args.threads})
    print(json.dumps({"out": str(args.out), "steps": summary["denoiser_steps"], "minutes": round((time.time() - started) / 60, 1),
                      "overrides": args.overrides, "added_layers": args.add_layers}))


if __name__ == "__main__":
    main()
