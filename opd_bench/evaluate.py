"""Evaluate a model (or the renderer) on a suite's test prompts with the suite's rewards.

The images of a model come from the shared ``rollout`` with the suite's evaluation sampler;
``renderer`` draws the tiny world's correct image for each prompt, to validate the evaluators.
Sample ``i`` of a benchmark always gets the same noise, whatever the batch size.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from opd_bench.benchmarks import BenchmarkSpec, aggregate
from opd_bench.rewards.base import call_reward
from opd_bench.rollout import Prompt

# (prompts, seed, sample_offset) -> images [B, 3, H, W] in [0, 1]
ImageSource = Callable[[Sequence[Prompt], int, int], torch.Tensor]


@dataclass
class SamplerSettings:
    num_steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float | list[float] = 0.0  # one level, or one per step (0: a deterministic step)

    @classmethod
    def of_suite(cls, suite) -> "SamplerSettings":
        """The suite's evaluation sampler."""
        return cls(suite.num_steps, suite.evaluation_guidance(), suite.noise_level)


def policy_source(policy, settings: SamplerSettings) -> ImageSource:
    from opd_bench.rollout import rollout

    def generate(prompts: Sequence[Prompt], seed: int, offset: int) -> torch.Tensor:
        trajectory = rollout(
            policy, prompts, num_steps=settings.num_steps, noise_level=settings.noise_level,
            guidance_scale=settings.guidance_scale, seed=seed, keep={"images"}, sample_offset=offset,
        )
        return trajectory.images

    return generate


def renderer_source() -> ImageSource:
    from opd_bench.world.render import render_batch

    def generate(prompts: Sequence[Prompt], seed: int, offset: int) -> torch.Tensor:
        return render_batch([p.metadata for p in prompts], [seed * 1_000_003 + offset + i for i in range(len(prompts))])

    return generate


def evaluate_benchmark(
    spec: BenchmarkSpec,
    source: ImageSource,
    *,
    seed: int = 0,
    limit: int | None = None,
    images_per_prompt: int | None = None,
    batch_size: int = 32,
    rewards: dict | None = None,
    progress: bool = True,
) -> dict:
    """Generate and score the test prompts of ``spec``; returns scores, timings and per-tag results.

    ``rewards`` may pass already-built reward objects (``{"main": r, "<extra>": r}``) to reuse
    loaded models across calls.
    """
    from tqdm import tqdm

    repeats = images_per_prompt or spec.images_per_prompt
    prompts = [p for p in spec.prompts("test", limit) for _ in range(repeats)]
    rewards = rewards or {}
    scorers = {"main": rewards.get("main") or spec.build_reward()}
    for key, name in spec.extra_rewards.items():
        from opd_bench import rewards as registry

        scorers[key] = rewards.get(key) or registry.get(name)
    scores: dict[str, list[float]] = {key: [] for key in scorers}
    seconds = {"generate": 0.0, **{key: 0.0 for key in scorers}}
    # `with`: closed on an error too, so the error's message starts a line of its own
    with tqdm(total=len(prompts), desc=f"eval {spec.key}", unit="img", disable=not progress, mininterval=2) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            t0 = time.perf_counter()
            images = source(chunk, seed, start)
            seconds["generate"] += time.perf_counter() - t0
            texts, metadata = [p.text for p in chunk], [p.metadata for p in chunk]
            for key, scorer in scorers.items():
                t0 = time.perf_counter()
                scores[key].extend(call_reward(scorer, spec.name if key == "main" else key, images, texts, metadata).scores.tolist())
                seconds[key] += time.perf_counter() - t0
            bar.update(len(chunk))
    metadata = [p.metadata for p in prompts]
    main = aggregate(spec.metric, scores["main"], metadata)
    result = {
        "score": main["score"],
        "num_images": len(prompts),
        "images_per_prompt": repeats,
        "seconds": seconds,
        "images_per_second": {k: (len(prompts) / v if v > 0 else math.inf) for k, v in seconds.items()},
        "extra": {key: aggregate("mean", scores[key], metadata)["score"] for key in scorers if key != "main"},
        # every image's score, in evaluation order (image i shows prompt i // images_per_prompt), so a
        # result can be checked by regenerating a few images (opd_bench.verify)
        "per_image": {spec.name if key == "main" else key: values for key, values in scores.items()},
    }
    if "per_tag" in main:
        result["per_tag"] = main["per_tag"]
    return result


def select_tasks(suite, tasks: Sequence[str] | None) -> list[str]:
    """``tasks`` checked against the suite's benchmarks (None: all of them)."""
    from opd_bench.registry import did_you_mean

    if tasks is None:
        return list(suite.tasks)
    if not tasks:
        raise ValueError("no benchmark is given")
    for i, task in enumerate(tasks):
        if task not in suite.tasks:
            raise ValueError(f"suite {suite.name!r} has no benchmark {task!r}.{did_you_mean(task, suite.tasks)} "
                             f"Its benchmarks: {', '.join(suite.tasks)}")
        if task in tasks[:i]:
            raise ValueError(f"benchmark {task!r} is given twice; name each once")
    return list(tasks)


def evaluate_suite(
    suite,
    source: ImageSource,
    *,
    tasks: Sequence[str] | None = None,
    finished: Mapping[str, dict] | None = None,
    on_benchmark: Callable[[str, dict], None] | None = None,
    **options,
) -> dict:
    """Evaluate every task of ``suite``; returns ``{"scores", "per_tag", "per_image", "benchmarks"}``.

    ``per_image[benchmark]`` lists every image's score (extra rewards under their own names).
    ``finished``: benchmarks already evaluated (``evaluate_benchmark``'s results), not run again;
    ``on_benchmark(task, result)`` is called as each other one ends (to save it, so a killed
    evaluation resumes).
    """
    tasks = select_tasks(suite, tasks)
    results = {}
    for task in tasks:
        if finished and task in finished:
            results[task] = finished[task]
            continue
        results[task] = evaluate_benchmark(suite.benchmark(task), source, **options)
        if on_benchmark is not None:
            on_benchmark(task, results[task])
    scores: dict[str, float] = {}
    per_tag: dict[str, dict] = {}
    per_image: dict[str, list[float]] = {}
    for task, result in results.items():
        scores[task] = result["score"]
        scores.update(result["extra"])
        per_image.update(result["per_image"])
        if "per_tag" in result:
            per_tag[task] = result["per_tag"]
    return {"scores": scores, "per_tag": per_tag, "per_image": per_image, "benchmarks": results}


def make_evaluator(
    suite,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = 16,
    images_per_prompt: int = 1,
    settings: SamplerSettings | None = None,
    seed: int = 12345,
) -> Callable:
    """A ``policy -> {task: score, extra: score}`` function for periodic evaluation during training.

    Rewards are built once and reused; the prompts (``limit`` test prompts of every task, spread over its tags as ``--limit`` spreads them) and
    the noise are the same at every call, so successive evaluations are comparable. For the same
    reason an adapter that still equals the base (a run's step 0) gets the base's scores, computed
    once: every training run of a comparison starts there, and they are the same numbers.
    """
    tasks = list(tasks or suite.tasks)
    settings = settings or SamplerSettings.of_suite(suite)
    specs = {task: suite.benchmark(task) for task in tasks}
    built: dict[str, dict] = {}
    of_base: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> the base's scores

    def evaluate(policy) -> dict[str, float]:
        if policy.equals_base(policy.active_adapter):
            if policy not in of_base:
                with policy.use(None):
                    of_base[policy] = score(policy)
            return dict(of_base[policy])
        return score(policy)

    def score(policy) -> dict[str, float]:
        from opd_bench import rewards as registry

        scores: dict[str, float] = {}
        source = policy_source(policy, settings)
        for task, spec in specs.items():
            if task not in built:
                built[task] = {"main": spec.build_reward(), **{k: registry.get(n) for k, n in spec.extra_rewards.items()}}
            result = evaluate_benchmark(
                spec, source, seed=seed, limit=limit, images_per_prompt=images_per_prompt,
                rewards=built[task], progress=False,
            )
            scores[task] = result["score"]
            scores.update(result["extra"])
        return scores

    return evaluate
