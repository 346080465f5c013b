"""``opd-bench verify RUN_DIR``: check a run's final scores against its own artefacts.

``results.json`` (schema 2 or 3) records every image's score of every final evaluation and the sha256
of every trained adapter. Verification

1. checks the file's internal consistency (``result_schema.check_results``: each per-seed score is
   the suite's aggregate of its per-image scores, each mean and std those of its per-seed scores),
2. checks that every adapter in the run folder still has its recorded sha256,
3. regenerates a sample of the final evaluation's images from the base model and those adapters
   (the recorded noise seed, each cell's own seed in schema 2, and the recorded sampler settings)
   and scores them with the suite's rewards, and
4. compares each image's new score with the recorded one.

The sample is ``prompts`` test prompts per benchmark, ranked by a sha256 of the run's identity
(the adapters' hashes included) and ``salt``. Without a salt anyone can compute it, and a
submitter can steer it (any change to an adapter folder's files, even an extra file, changes it),
so ``opd-bench submit`` verifies with a random salt, recorded in the entry, and a maintainer who
re-checks an entry passes a salt of their own (any string), or a large ``prompts``.

Tolerance: an image matches when ``|new - recorded| <= ATOL + RTOL * |recorded|``. Images of a
batch of another size differ by float rounding (measured on the tiny suite: up to 4e-5 per pixel),
which can flip a discrete decision (a detection, an OCR read) near its threshold; so up to
``FLIPS_ALLOWED`` images per (model, seed, benchmark) may differ by more on the benchmarks scored
through such decisions (``DECISION_BENCHMARKS``), among at least ``FLIP_SAMPLE`` images (a
tolerated image in a sample of one would excuse any edit), and a strict GenEval score only from 0
to 1 or back (the values a flip can give). A model's continuous score (PickScore, the learned
preference model) has no decision to flip: every one of its images must match.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

from opd_bench.io import holds_weights
from opd_bench.result_schema import SubmissionError, dig, eval_noise_seed, model_loading

DEFAULT_PROMPTS = 8
ATOL = 1e-3
RTOL = 1e-3
FLIPS_ALLOWED = 1
DECISION_BENCHMARKS = frozenset({"geneval", "ocr", "pref_oracle"})  # detections and OCR reads: can flip
FLIP_SAMPLE = 8


def tolerated(bench: str, misses: Sequence[dict], images: int) -> bool:
    """Whether the images of one (model, seed, benchmark) sample that score differently
    (``recorded`` / ``recomputed``) can be the decisions float rounding flips; see the module doc."""
    if bench not in DECISION_BENCHMARKS or images < FLIP_SAMPLE or len(misses) > FLIPS_ALLOWED:
        return False
    if bench == "geneval":  # strict GenEval scores an image 0 or 1: a flip turns one into the other
        return all(min(abs(v), abs(v - 1)) <= ATOL for m in misses for v in (m["recorded"], m["recomputed"]))
    return True


class VerificationError(SubmissionError):
    """A run whose artefacts are missing or changed, or whose scores do not reproduce."""


def _check_suite_settings(recorded: dict | None, suite) -> None:
    """A configurable suite's reward options as the run had them (weight paths aside: a verifier's
    machine keeps its weights elsewhere), so a different option is named, not blamed on the run."""
    from opd_bench.io import json_differences

    def without_paths(value):
        if isinstance(value, dict):
            return {k: without_paths(v) for k, v in value.items() if not k.endswith("_path")}
        return value

    if recorded is None:
        return
    differences = json_differences(without_paths(recorded), without_paths(suite.settings()))
    if differences:
        raise VerificationError(f"the {suite.name} suite config differs from the one the run used in what decides its "
                                f"scores ({differences}); give the run's config (its weight paths may differ)")


def adapter_sha256(folder: str | Path) -> str:
    """sha256 over every file of an adapter folder (relative names and contents, sorted)."""
    from opd_bench.benchmarks import sha256_file

    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def run_key(results: dict, salt: str = "") -> str:
    """The run's identity, trained weights included, from which the sampled prompts follow."""
    identity = {k: results.get(k) for k in ("suite", "suite_version", "model", "model_sha256", "preset", "seeds")}
    identity["adapters"] = {name: {seed: a.get("sha256") for seed, a in per_seed.items()}
                            for name, per_seed in results.get("artifacts", {}).items()}
    identity["salt"] = salt
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def sample_prompts(key: str, task: str, available: int, count: int) -> list[int]:
    """``count`` of ``available`` test-prompt indices, the smallest by sha256(key, task, index)."""
    if count <= 0 or count >= available:
        return list(range(available))
    ranked = sorted(range(available), key=lambda i: hashlib.sha256(f"{key}:{task}:{i}".encode()).hexdigest())
    return sorted(ranked[:count])


def _adapter_folder(run_dir: Path, name: str, seed: int, results: dict) -> Path:
    record = dig(results, "artifacts", name, str(seed))
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise VerificationError(f"results.json records no adapter for {name} seed {seed}; re-run with `opd-bench run`")
    folder = (run_dir / record["path"]).resolve()
    if run_dir.resolve() not in folder.parents:
        raise VerificationError(f"the adapter path of {name} seed {seed} ({record['path']!r}) leaves the run folder; "
                                "submit the results.json written by `opd-bench run`")
    if not folder.is_dir():
        raise VerificationError(f"the adapter of {name} seed {seed} is missing ({folder}); keep the run folder whole "
                                "(adapters included) to verify it")
    if not holds_weights(folder):
        raise VerificationError(f"the adapter of {name} seed {seed} ({folder}) has no weights file; keep the run folder "
                                "whole (adapters included) to verify it")
    if adapter_sha256(folder) != record.get("sha256"):
        raise VerificationError(f"the adapter of {name} seed {seed} ({folder}) does not match its recorded sha256; "
                                "the adapter or results.json was changed")
    return folder


def _matches(recorded, recomputed: float, bounded: bool) -> tuple[bool, float]:
    if recorded is None or math.isnan(recomputed):  # "not applicable" must stay so
        return (recorded is None and math.isnan(recomputed)), 0.0
    difference = abs(recomputed - recorded)
    return difference <= ATOL + (0.0 if bounded else RTOL * abs(recorded)), difference


def verify_run(run_dir: str | Path, *, prompts: int = DEFAULT_PROMPTS, salt: str = "", device: str = "cpu",
               models: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Re-evaluate a sample of ``run_dir``'s final evaluations; returns a report (``ok`` is the verdict).

    ``models`` restricts the re-evaluation to some models (e.g. ``["opd"]``; default: all).

    Raises ``VerificationError`` (one line) when the run cannot be checked at all: an invalid or
    schema-1 result file, a missing or changed adapter, another shipped base model.
    """
    from opd_bench import suites
    from opd_bench.leaderboard import read_results
    from opd_bench.result_schema import UNBOUNDED, check_results, suite_benchmarks

    start = time.time()
    run_dir = Path(run_dir)
    results = read_results(run_dir / "results.json")
    check_results(results)
    if results["schema_version"] < 2:
        raise VerificationError(f"{run_dir / 'results.json'} is schema version {results['schema_version']}, which records "
                                "no per-image scores or adapter hashes; re-run with this opd-bench to verify")
    suite = suites.get(results["suite"])
    recorded = results.get("model_sha256")  # None: a hub model (or a local one, before folders were fingerprinted)
    if recorded is not None and suites.model_fingerprint(results["model"]) != recorded:
        raise VerificationError(f"the installed {results['model']!r} model is not the one the run used "
                                f"(weights {suites.model_fingerprint(results['model'])} vs {results.get('model_sha256')}); "
                                "verify with the opd-bench version that made the run")
    _check_suite_settings(results.get("suite_settings"), suite)
    first = suite_benchmarks(suite)[0]
    cells = {name: per_bench[first]["seeds"] for name, per_bench in results["results"].items()
             if models is None or name in models}
    unknown = sorted(set(models or ()) - set(results["results"]))
    if unknown:
        raise VerificationError(f"the run has no model {', '.join(unknown)}; it has {', '.join(results['results'])}")
    adapters = {(name, seed): None if name == "base" else _adapter_folder(run_dir, name, seed, results)
                for name, seeds in cells.items() for seed in seeds}

    from opd_bench import rewards as registry
    from opd_bench.evaluate import SamplerSettings, policy_source
    from opd_bench.policy import DTYPES, Policy
    from opd_bench.rewards.base import call_reward

    settings_record = results["config"]["eval"]
    if not all(isinstance(settings_record.get(k), (int, float)) for k in ("num_steps", "guidance_scale", "noise_level")):
        raise VerificationError("config['eval'] must record the sampler (num_steps, guidance_scale, noise_level); "
                                "submit the results.json written by `opd-bench run`")
    settings = SamplerSettings(settings_record["num_steps"], settings_record["guidance_scale"], settings_record["noise_level"])
    key = run_key(results, salt)
    plan = {}  # task -> (spec, prompts, images per prompt, sampled prompt indices)
    for task in suite.tasks:
        spec = suite.benchmark(task)
        test = spec.prompts("test", settings_record["limit"])
        plan[task] = (spec, test, settings_record["images_per_prompt"] or spec.images_per_prompt,
                      sample_prompts(key, task, len(test), prompts))
    scorers = {task: {task: spec.build_reward(), **{k: registry.get(n) for k, n in spec.extra_rewards.items()}}
               for task, (spec, *_) in plan.items()}

    loading = model_loading(results)  # the model loaded as the run loaded it (check_results checked it)
    policy = Policy.from_pretrained(suites.resolve_model(results["model"]), device=device,
                                    resolution=settings_record.get("resolution"), dtype=DTYPES[loading["dtype"]],
                                    drop_t5=loading["drop_t5"])
    source = policy_source(policy, settings)
    mismatches, flips, checked, worst = [], [], 0, 0.0
    for i, ((name, seed), folder) in enumerate(adapters.items()):
        adapter = None
        if folder is not None:
            adapter = f"verify_{i}"
            policy.load_adapter(adapter, folder)
        noise_seed = eval_noise_seed(settings_record.get("seed"), seed)
        with policy.use(adapter):
            for task, (spec, test, repeats, sampled) in plan.items():
                misses: list[dict] = []
                for index in sampled:
                    # the same prompt, seed and noise indices as image index*repeats.. of the evaluation
                    images = source([test[index]] * repeats, noise_seed, index * repeats)
                    texts, metadata = [test[index].text] * repeats, [test[index].metadata] * repeats
                    for bench, scorer in scorers[task].items():
                        recorded = results["per_image"][name][str(seed)][bench]
                        for j, value in enumerate(call_reward(scorer, bench, images, texts, metadata).scores.tolist()):
                            ok, difference = _matches(recorded[index * repeats + j], value, bench not in UNBOUNDED)
                            checked += 1
                            if ok:
                                worst = max(worst, difference)
                            else:
                                misses.append({"model": name, "seed": seed, "benchmark": bench, "image": index * repeats + j,
                                               "recorded": recorded[index * repeats + j], "recomputed": value})
                per_bench: dict[str, list] = {}
                for miss in misses:
                    per_bench.setdefault(miss["benchmark"], []).append(miss)
                for bench, group in per_bench.items():
                    (flips if tolerated(bench, group, len(sampled) * repeats) else mismatches).extend(group)
                if progress:
                    print(f"verify {name} seed {seed} {task}: {len(sampled) * repeats} images, "
                          f"{len(misses)} differ", flush=True)
    return {
        "ok": not mismatches, "prompts_per_benchmark": prompts, "images_checked": checked,
        "max_difference_within_tolerance": worst, "mismatches": mismatches, "flips": flips,
        "tolerance": {"atol": ATOL, "rtol_unbounded": RTOL, "flips_allowed_per_model_seed_benchmark": FLIPS_ALLOWED,
                      "flips_allowed_on": sorted(DECISION_BENCHMARKS), "flips_need_images": FLIP_SAMPLE},
        "salt": salt, "sample": {task: p[3] for task, p in plan.items()}, "seconds": round(time.time() - start, 1),
    }
