"""Suites: a named, versioned set of benchmarks with a default model and evaluation sampler.

``tiny`` is embedded: its prompt files and trained weights ship inside the package
(``opd_bench/suites/tiny/``). Suites register their benchmarks as ``"<suite>/<name>"`` in
``opd_bench.benchmarks``. Importing this module is cheap (specs are plain data).

``sd`` (``opd_bench/suites/sd.py``, imported on first use) is for real SD3 / SD3.5 models: its
prompt files and reward weights are the user's, so its specs are built from a configuration
(``configure("sd", ...)`` or the ``OPD_SD_CONFIG`` file) when asked for, not registered.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from opd_bench import benchmarks
from opd_bench.benchmarks import BenchmarkSpec
from opd_bench.registry import Registry

SUITE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    tasks: tuple[str, ...]  # benchmark names, each registered as "<suite>/<task>"
    default_model: str
    num_steps: int  # evaluation sampler
    guidance_scale: float
    noise_level: float = 0.0  # 0 = the deterministic (ODE) sampler
    resolution: int | None = None  # evaluation image side in pixels; None = the pipeline's default
    headline: tuple[str, ...] = ()  # scores in [0, 1] averaged into the overall score
    description: str = ""

    def benchmark(self, task: str) -> BenchmarkSpec:
        return benchmarks.get(f"{self.name}/{task}")

    def image_side(self) -> int | None:
        """The image side runs of this suite use (None: the pipeline's default)."""
        return self.resolution

    def evaluation_guidance(self) -> float:
        """The evaluation sampler's guidance scale (a configurable suite may set its own)."""
        return self.guidance_scale

    def settings(self) -> dict | None:
        """What decides this suite's scores beyond its version: None when everything ships with
        the package; a configurable suite's prompt files and reward options (``sd``)."""
        return None


REGISTRY = Registry("suite")


def get(name: str) -> Suite:
    return REGISTRY.resolve(name)


def configure(name: str, config=None, **sections) -> None:
    """Give a configurable suite (``sd``) its files and weights: a dict or JSON file and/or
    sections, e.g. ``configure("sd", geneval={"test": "evaluation_metadata.jsonl"})``."""
    suite = get(name)
    if not hasattr(suite, "configure"):
        raise ValueError(f"suite {name!r} takes no configuration (its files ship with the package)")
    suite.configure(config, **sections)


def _tiny() -> Suite:
    prompts = "suites/tiny/prompts"
    version = "tiny-v3"  # = opd_bench.world.spec.PROMPTS_VERSION (checked by a test)
    common = dict(suite="tiny", version=version, images_per_prompt=2)
    benchmarks.register(BenchmarkSpec(
        name="geneval", test_file=f"{prompts}/geneval_test.jsonl", train_file=f"{prompts}/geneval_train.jsonl",
        reward="tiny/geneval-strict", train_reward="tiny/geneval", metric="geneval",
        required_fields=("prompt", "tag", "include"),
        description="tiny world: GenEval's six tags and rules, scored by the world's detector", **common,
    ))
    benchmarks.register(BenchmarkSpec(
        name="ocr", test_file=f"{prompts}/ocr_test.jsonl", train_file=f"{prompts}/ocr_train.jsonl",
        reward="ocr", required_fields=("prompt", "text"),
        description="tiny world: quoted 1-4 character texts, read by a real OCR engine", **common,
    ))
    benchmarks.register(BenchmarkSpec(
        name="pref", test_file=f"{prompts}/pref_test.jsonl", train_file=f"{prompts}/pref_train.jsonl",
        reward="tiny/pref", extra_rewards={"pref_oracle": "tiny/pref-oracle"},
        required_fields=("prompt", "objects"),
        description="tiny world: a learned preference model (and the hidden taste it was trained on)", **common,
    ))
    return Suite(
        name="tiny", version=version, tasks=("geneval", "ocr", "pref"), default_model="tiny",
        num_steps=10, guidance_scale=4.5, headline=("geneval", "ocr", "pref_oracle"),
        description="embedded miniature SD3 world; runs on a laptop CPU",
    )


REGISTRY.register("tiny", _tiny(), "embedded miniature SD3 world (prompts and weights ship with the package)")
REGISTRY.register("sd", "opd_bench.suites.sd:SUITE", "real SD3 / SD3.5 models on GenEval, OCR and PickScore (user-given files)")

# Shipped models, by alias.
MODELS = {"tiny": SUITE_DIR / "tiny" / "weights" / "base"}


def canonical_model(model: str) -> str:
    """A model named one way whatever way it was given: a shipped model's folder -> its alias,
    another local folder -> its absolute path (``../sd3`` and ``/models/sd3`` are one model);
    aliases and hub ids as they are.

    Run identities, teacher caches, the fingerprint check and the leaderboard compare model
    names as strings: the shipped base passed as ``.../weights/base`` would otherwise count as
    another model than ``tiny`` (and get no fingerprint), and a run resumed from another working
    directory as another experiment.
    """
    path = Path(model).expanduser()
    if model in MODELS or not path.is_dir():
        return model
    for alias, folder in MODELS.items():
        if path.resolve() == folder.resolve():
            return alias
    return os.path.abspath(path)  # normalises "..", keeps the links the user named


def resolve_model(model: str) -> str:
    """A shipped model alias ("tiny") -> its folder; anything else is returned unchanged.

    A local pipeline folder (the alias's included) has its weights checked first, so a missing
    or truncated file is named in one clear line (``weights.check_pipeline_folder``).
    """
    from opd_bench.weights import check_pipeline_folder

    if model in MODELS:
        folder = MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the shipped {model!r} model is missing from {folder}; reinstall the package or "
                f"rebuild it with `opd-bench pretrain base --out {folder}`"
            )
        check_pipeline_folder(folder)
        return str(folder)
    if (Path(model).expanduser() / "model_index.json").is_file():
        check_pipeline_folder(Path(model).expanduser())
    elif "/" not in model and not Path(model).expanduser().exists():  # hub ids are org/name: a mistyped alias
        from opd_bench.registry import did_you_mean

        raise FileNotFoundError(f"model {model!r} is neither a shipped alias ({', '.join(MODELS)}) nor a folder.{did_you_mean(model, MODELS)} "
                                "A hub id has the form org/name")
    return model


def model_fingerprint(model: str) -> str | None:
    """Short hash of a model's transformer weights: the shipped alias's, or a local pipeline
    folder's (None for a hub id, or a folder without ``.safetensors`` transformer weights). A
    sharded transformer is hashed over the shards its index names, each of which must be there.

    Weights change under one name: a shipped alias between releases, a local folder rebuilt in
    place (``pretrain base --force``). Run folders, teachers and evaluations record the fingerprint,
    so work done on other weights is never reused or mixed with the new. A shard is hashed once
    per process and file version (a real model's ~5 GB take seconds, beside a minute to load).
    """
    from opd_bench.weights import indexed_shards

    folder = Path(resolve_model(model)) if model in MODELS else Path(model).expanduser()
    transformer = folder / "transformer"
    # a sharded model: the shards its index names, every one there (not whichever happen to be)
    shards = (indexed_shards(transformer) or sorted(transformer.glob("*.safetensors"))) if transformer.is_dir() else []
    if not shards:
        return None
    digests = [_weights_digest(str(shard), shard.stat().st_size, shard.stat().st_mtime_ns) for shard in shards]
    # one file (the shipped base): its own digest, as recorded since before sharded models were fingerprinted
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per file version: a leaderboard rebuild checks every submission against it."""
    return benchmarks.sha256_file(path)[:12]
