"""What the probe scripts share: their options, the preset config with one change applied, and the
held-out evaluation (same prompts and noise for every model they compare)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from opd_bench.presets import set_fields


def _parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a probe that trains with one preset change and scores the held-out evaluation."""
    parser = _parser(doc)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--eval-limit", type=int, default=64)
    return parser


def task_probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a probe that measures the tiny base per task (``--task`` repeats)."""
    parser = _parser(doc)
    parser.add_argument("--task", action="append", choices=["geneval", "ocr", "pref"], required=True)
    return parser


def probe_config(parser: argparse.ArgumentParser, args: argparse.Namespace, base, **fixed):
    """``base`` (a preset's config) with ``fixed`` and then every ``--set`` applied; sets the thread count."""
    torch.set_num_threads(args.threads)
    try:  # a bad FIELD=VALUE (unknown name, wrong type, out of range): one line, as from the CLI
        config = set_fields(replace(base, **{"seed": args.seed, **fixed}), args.overrides)
    except ValueError as error:
        parser.error(str(error))
    names = [pair.partition("=")[0].strip() for pair in args.overrides]
    return config, {name: getattr(config, name) for name in names}


def summary(result: dict) -> dict:
    """An evaluation's score, per-tag scores (GenEval) and evaluation-only scores (e.g. pref_oracle), rounded."""
    return {"score": round(result["score"], 4),
            **({"per_tag": {k: round(v, 3) for k, v in result["per_tag"].items()}} if "per_tag" in result else {}),
            **{key: round(value, 4) for key, value in result["extra"].items()}}


HELD_OUT_IMAGES = 2  # images per held-out prompt


def held_out(policy, adapter: str | None, spec, sampler, rewards: dict, limit: int) -> dict:
    """``adapter`` (None = base) on the first ``limit`` test prompts of ``spec``, 2 images each, noise seed 777."""
    from opd_bench.evaluate import evaluate_benchmark, policy_source

    with policy.use(adapter):
        return evaluate_benchmark(spec, policy_source(policy, sampler), seed=777, limit=limit,
                                  images_per_prompt=HELD_OUT_IMAGES, rewards=rewards, progress=False)


def tag_score_gain(after: list[float], before: list[float], spec, limit: int) -> tuple[float, float | None]:
    """For a score that is the mean over tags (GenEval), from ``held_out``'s per-image results of two
    models: the score's gain and its stratified paired s.e. (None where a tag has one image)."""
    from opd_bench.results_view import by_stratum, stratified_paired_se

    tags = [p.metadata.get("tag") for p in spec.prompts("test", limit) for _ in range(HELD_OUT_IMAGES)]
    per_tag = by_stratum([a - b for a, b in zip(after, before, strict=True)], tags).values()
    return sum(sum(g) / len(g) for g in per_tag) / len(per_tag), stratified_paired_se(after, before, tags)
