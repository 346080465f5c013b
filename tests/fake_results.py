"""A synthetic but schema-valid ``results.json`` (version 2) for report and leaderboard tests.

Prompt hashes are the installed tiny suite's real ones; per-image scores are random but seeded,
and every per-seed score is the suite's aggregate of them (as `opd-bench run` computes it); the
config and step counts are the standard preset's; sample grids are tiny PNGs; adapter hashes are
made up (these runs have no adapters, so they cannot be verified). ``make_run(run_dir)`` writes
the run directory and returns the dict.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from pathlib import Path

BENCHMARKS = ["geneval", "ocr", "pref", "pref_oracle"]
HEADLINE = ["geneval", "ocr", "pref_oracle"]
ALL_METHODS = ["base", "teacher/geneval", "teacher/ocr", "teacher/pref", "opd", "opd-ppo", "multi-reward", "cascade"]
STUDENTS = ["opd", "opd-ppo", "multi-reward", "cascade"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
PROMPTS = ["a photo of a red circle", 'a sign that says "AB3"', "a photo of a square above a heart"]


def _suite_version() -> str:
    from opd_bench import suites

    return suites.get("tiny").version


def prompt_hashes() -> dict:
    from opd_bench import suites

    suite = suites.get("tiny")
    return {task: {"test": suite.benchmark(task).file_hash("test"), "train": suite.benchmark(task).file_hash("train")}
            for task in suite.tasks}


def _png(rows: int, cols: int, seed: int, cell: int = 8) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (cols * cell, rows * cell))
    for r in range(rows):
        for c in range(cols):
            colour = tuple(rng.randrange(256) for _ in range(3))
            image.paste(colour, (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _standard_evaluation() -> tuple[int, int]:
    from opd_bench.presets import plan

    return plan("standard").eval_limit, plan("standard").eval_images_per_prompt


# the final evaluation the fake per-image scores stand for: the standard preset's, as submit requires
EVAL_LIMIT, EVAL_IMAGES = _standard_evaluation()


def _score(rng: random.Random, bench: str, level: float, noise: float = 0.05) -> float:
    if bench == "pref":
        return 18.0 + 6.0 * level + rng.uniform(-6 * noise, 6 * noise)
    return min(1.0, max(0.0, level + rng.uniform(-noise, noise)))


@functools.lru_cache(maxsize=None)
def _metadata(bench: str) -> tuple[str, list[dict]]:
    """The metric and per-image metadata of a benchmark's fake final evaluation."""
    from opd_bench import suites

    suite = suites.get("tiny")
    task = "pref" if bench == "pref_oracle" else bench
    spec = suite.benchmark(task)
    metric = spec.metric if bench == task else "mean"
    return metric, [p.metadata for p in spec.prompts("test", EVAL_LIMIT) for _ in range(EVAL_IMAGES)]


@functools.lru_cache(maxsize=None)
def _standard_config() -> str:
    return json.dumps(standard_config())


def standard_config() -> dict:
    from dataclasses import asdict

    from opd_bench.presets import plan

    p = plan("standard")
    return json.loads(json.dumps({"teachers": asdict(p.teacher), "opd": asdict(p.opd), "opd-ppo": asdict(p.opd_ppo),
                                  "multi-reward": asdict(p.multi_reward), "cascade": asdict(p.cascade),
                                  "eval": {"limit": EVAL_LIMIT, "images_per_prompt": EVAL_IMAGES, "seed": 0, "num_steps": 10,
                                           "guidance_scale": 4.5, "noise_level": 0.0, "resolution": None}}))


def _cascade_stages(config: dict) -> list[dict]:
    """The stage ends the harness records for the configured cascade."""
    stages, end = [], 0
    for i, (task, steps) in enumerate(config["cascade"]["stages"]):
        end += steps
        stages.append({"stage": i, "task": task, "end_step": end})
    return stages


def make_results(methods=ALL_METHODS, seeds=(0, 1, 2), rng_seed: int = 0, fixed: dict | None = None) -> dict:
    """``fixed``: {method: level} gives every image of that method the same score (exact means)."""
    from opd_bench import suites
    from opd_bench.benchmarks import aggregate

    rng = random.Random(rng_seed)
    seeds = list(seeds)
    config = json.loads(_standard_config())
    level = {m: rng.uniform(0.2, 0.8) for m in methods}
    level["base"] = 0.2
    level.update(fixed or {})
    results, per_tag, curves, grad, compute, per_image, artifacts = {}, {}, {}, {}, {}, {}, {}
    for m in methods:
        cell_seeds = seeds[:1] if m == "base" or m.startswith("teacher/") else seeds
        results[m], per_image[m] = {}, {str(s): {} for s in cell_seeds}
        for bench in BENCHMARKS:
            metric, metadata = _metadata(bench)
            values = []
            for s in cell_seeds:
                images = [_score(rng, bench, level[m], 0.0 if m in (fixed or {}) else 0.05) for _ in metadata]
                per_image[m][str(s)][bench] = [round(v, 6) for v in images]
                values.append(aggregate(metric, per_image[m][str(s)][bench], metadata)["score"])
            n = len(values)
            mean = sum(values) / n
            std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
            results[m][bench] = {"mean": mean, "std": std, "per_seed": values, "seeds": cell_seeds}
        per_tag[m] = {"geneval": {t: round(rng.random(), 4) for t in TAGS}}
        if m == "base":
            continue
        # another model (level), another adapter: runs that differ only in ``fixed`` do not share adapters
        artifacts[m] = {str(s): {"path": f"methods/{m}/seed{s}/final",
                                 "sha256": hashlib.sha256(f"{rng.getrandbits(256)}:{level[m]}".encode()).hexdigest()}
                        for s in cell_seeds}
        steps = config["teachers"]["steps"] if m.startswith("teacher/") else \
            sum(n for _, n in config["cascade"]["stages"]) if m == "cascade" else config[m]["steps"]
        curves[m] = {}
        grad[m] = {}
        for s in seeds:
            rows, grows = [], []
            for i in range(0, steps + 1, 3):
                frac = i / steps
                row = {"step": i, "student_forwards": i * 40, "teacher_forwards": i * 36 if m.startswith("opd") else 0,
                       "images": i * 8, "wall_seconds": i * 1.5}
                for bench in BENCHMARKS:
                    row[f"eval/{bench}"] = _score(rng, bench, 0.2 + (level[m] - 0.2) * frac)
                if m == "cascade":
                    row["stage"] = min(2, i * 3 // (steps + 1))
                    row["stage_task"] = ["pref", "geneval", "ocr"][row["stage"]]
                rows.append(row)
                variance = rng.uniform(0.5, 2.0) * (10.0 if m == "opd-ppo" else 1.0)
                grows.append({"step": i, "grad/variance": variance, "grad/variance_rel": variance / 3})
            curves[m][str(s)] = rows
            grad[m][str(s)] = grows
        compute[m] = {"optimizer_steps": steps, "student_forwards": float(steps * 40),
                      "teacher_forwards": float(steps * 36 if m.startswith("opd") else 0), "images": float(steps * 8),
                      "wall_seconds": steps * 1.5}
    variance_rows = []
    for noise in (0.1, 0.7):
        for batch in (1, 2, 4, 8):
            va, vp = rng.uniform(0.1, 1) / batch, rng.uniform(1, 10) / batch / noise
            variance_rows.append({"batch": batch, "noise_level": noise, "repeats": 16, "var_analytic": va, "var_ppo": vp,
                                  "ratio_ppo_over_analytic": vp / va, "rel_var_analytic": va / 2, "rel_var_ppo": vp / 2,
                                  "cosine_of_means": rng.uniform(0.8, 1.0)})
    return {
        "schema_version": 3, "package_version": "0.1.0", "git_commit": "0123456789abcdef", "date": "2026-11-26T06:00:00Z",
        "command": "opd-bench run --method all --suite tiny --out runs/fake", "suite": "tiny", "suite_version": _suite_version(),
        "prompt_hashes": prompt_hashes(), "model": "tiny", "model_sha256": suites.model_fingerprint("tiny"), "preset": "standard",
        "seeds": seeds, "benchmarks": list(BENCHMARKS), "headline": list(HEADLINE), "config": config,
        "per_image": per_image, "artifacts": artifacts, "results": results, "per_tag": per_tag, "curves": curves, "gradient_variance": grad, "compute": compute,
        "variance": {"rows": variance_rows, "ratio_ppo_over_analytic": variance_rows[-1]["ratio_ppo_over_analytic"],
                     "reference": {"batch": 8, "noise_level": 0.7}},
        "cascade_stages": _cascade_stages(config) if "cascade" in methods else [],
        "curve_evaluation": {"limit": 2, "images_per_prompt": 1},
        "samples": {"prompts": list(PROMPTS), "grids": {m: f"samples/{m.replace('/', '_')}-seed0.png" for m in methods},
                    "images_per_prompt": 4, "noise_seed": 0, "seeds": {m: 0 if m == "base" or m.startswith("teacher/") else seeds[0] for m in methods}},
        "environment": {"python": "3.11.7", "torch": "2.14.1", "diffusers": "0.42.1", "platform": "Linux",
                        "cpu": "test cpu", "threads": 2, "device": "cpu", "jobs": 1},
        "seconds": 93.0,
    }


def make_run(run_dir, results: dict | None = None, **kwargs) -> dict:
    """Write ``results.json`` and the sample PNGs into ``run_dir``; return the results dict."""
    run_dir = Path(run_dir)
    results = make_results(**kwargs) if results is None else results
    run_dir.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(sorted(results.get("samples", {}).get("grids", {}).values())):
        path = run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(len(PROMPTS), 2, seed=i))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
