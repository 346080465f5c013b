"""Does a teacher learn its task? One GRPO run on one task, then the base and the teacher on the same
held-out prompts and noise (the probe behind the `standard` preset's teacher settings, issue 11).

    python benchmarks/probe_teacher.py --task geneval --steps 40 --set lr=3e-3 --set group_size=8

Starts from the `standard` preset's teacher config; every ``--set FIELD=VALUE`` changes one field.
Prints one JSON line: the settings, wall minutes, the training-batch reward per step, and the
held-out score of base and teacher (first ``--eval-limit`` test prompts, 2 images each, per tag for
GenEval; the benchmark's evaluation-only rewards too, e.g. pref_oracle for pref) with the suite's
evaluation sampler (ODE) and with the teacher's training sampler (SDE), and for the ODE each gain
with the standard error of its per-image differences (``gain_and_se``; the training sampler's in
``training_sampler_gain_and_se``, and how much it exceeds the ODE's gain, per image, with that
difference's s.e., in ``training_sampler_excess_over_ode_and_se``). With ``--also TASK`` base and
teacher are scored on that other benchmark too, with both samplers (``also``: is what the teacher
gains its task, or any image's repair?). With ``--sampler STEPS,NOISE`` base and teacher are scored
on their own task with that sampler too, its excess over the ODE's gain included (``samplers``: is
the gain tied to the training sampler's steps, or to its noise?); NOISE is one level, or one per
step joined by ``/`` (which steps' noise?). With ``--curve-every N`` the held-out ODE gain is
measured every N steps as well (``curve``: does a longer teacher keep gaining?).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import replace

from opd_bench import suites
from opd_bench.benchmarks import PromptSubset
from opd_bench.evaluate import SamplerSettings
from opd_bench.presets import plan
from opd_bench.policy import Policy
from opd_bench.results_view import paired_gain
from opd_bench.trainers.grpo import GRPOTrainer
from opd_bench.training import read_metrics
from probe_args import held_out, probe_config, probe_parser, summary, tag_score_gain


def parse_sampler(parser, text: str, guidance_scale: float) -> tuple:
    """``STEPS,NOISE``: one noise level for every step, or one per step joined by ``/`` (0: a
    deterministic step), e.g. ``8,0/0/0/0/0.7/0.7/0.7/0.7`` for noise on the last four steps only."""
    steps_text, _, noise_text = text.partition(",")
    try:
        steps, levels = int(steps_text), [float(level) for level in noise_text.split("/")]
    except ValueError:
        steps, levels = 0, []
    if steps < 1 or not levels or not all(0 <= level < math.inf for level in levels) or len(levels) not in (1, steps):
        parser.error(f"--sampler {text!r} is not STEPS,NOISE (steps >= 1; one noise level >= 0, or one per step "
                     f"joined by '/'); write e.g. --sampler 8,0 or --sampler 4,0/0/0.7/0.7")
    return steps, guidance_scale, levels[0] if len(levels) == 1 else levels


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--task", required=True, choices=["geneval", "ocr", "pref"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tag", default=None, help="train and evaluate on the prompts of one GenEval tag only")
    parser.add_argument("--curve-every", type=int, default=0, metavar="N",
                        help="also score the held-out ODE gain every N steps (0: only at the end)")
    parser.add_argument("--also", action="append", default=[], choices=["geneval", "ocr", "pref"], metavar="TASK",
                        help="also score base and teacher on this other benchmark, with both samplers (repeatable)")
    parser.add_argument("--sampler", action="append", default=[], metavar="STEPS,NOISE",
                        help="also score the own task with this sampler, e.g. 8,0 (an ODE on the training steps) or "
                             "8,0/0/0/0/0.7/0.7/0.7/0.7 (one level per step; repeatable)")
    args = parser.parse_args()
    config, overrides = probe_config(parser, args, plan("standard").teacher, steps=args.steps, eval_every=0, checkpoint_every=0)

    suite = suites.get("tiny")
    spec = suite.benchmark(args.task)
    policy = Policy.from_pretrained(suites.resolve_model("tiny"))
    reward = spec.build_reward("train")
    held_out_reward = {"main": spec.build_reward()}
    settings = SamplerSettings.of_suite(suite)

    if args.tag:  # one tag only
        spec = PromptSubset(spec, lambda p: p.metadata.get("tag") == args.tag)

    # the training sampler too: does what the teacher learned on its SDE rollouts carry to the ODE?
    train_settings = SamplerSettings(config.num_steps, config.guidance_scale, config.noise_level)

    samplers = {"ode": settings, "training_sampler": train_settings}  # by label; --sampler adds its own
    for text in args.sampler:
        samplers[text] = SamplerSettings(*parse_sampler(parser, text, config.guidance_scale))
    extra_labels = list(samplers)[2:]
    if args.task in args.also:
        parser.error(f"--also {args.task} is the probe's own task, scored anyway; name another benchmark")

    # per-image scores by (adapter, sampler label, benchmark); adapter None is the base
    per_image: dict[tuple, dict] = {}
    others = {name: suite.benchmark(name) for name in dict.fromkeys(args.also)}
    other_rewards = {name: {"main": other.build_reward()} for name, other in others.items()}

    def score(adapter: str | None, sampler: str = "ode", benchmark=spec) -> dict:
        """``sampler``: "ode" (the evaluation's), "training_sampler", or a ``--sampler`` label."""
        rewards = held_out_reward if benchmark is spec else other_rewards[benchmark.name]
        result = held_out(policy, adapter, benchmark, samplers[sampler], rewards, args.eval_limit)
        per_image[adapter, sampler, benchmark.name] = result["per_image"]
        return summary(result)  # with the benchmark's evaluation-only rewards, e.g. pref's hidden taste

    def teacher_and_base(sampler: str, name: str) -> tuple[dict, dict]:
        return per_image["probe_final", sampler, name], per_image[None, sampler, name]

    def paired(sampler: str, name: str) -> dict:
        """Teacher minus base per image on one benchmark and sampler: each score's gain per image and
        its s.e.; for GenEval, whose score is the tags' mean, also the score's gain (``score``) with
        its stratified s.e."""
        after, before = teacher_and_base(sampler, name)
        gains = {key: [round(v, 4) for v in paired_gain(values, before[key])] for key, values in after.items()}
        if name == "geneval":
            gain, se = tag_score_gain(after[name], before[name], spec if spec.name == name else others[name], args.eval_limit)
            gains["score"] = [round(gain, 4), None if se is None else round(se, 4)]
        return gains

    def excess_over_ode(sampler: str) -> list[float]:
        """How much more the teacher gains on the own task with ``sampler`` than with the ODE, per
        image (image i pairs with image i: same prompt, same starting noise), and its s.e."""
        def gains(label: str) -> list[float]:
            after, before = teacher_and_base(label, spec.name)
            return [a - b for a, b in zip(after[spec.name], before[spec.name], strict=True)]

        return [round(v, 4) for v in paired_gain(gains(sampler), gains("ode"))]

    def score_extra(adapter: str | None) -> tuple[dict, dict]:
        """The other benchmarks with both samplers, and the own task with every ``--sampler``."""
        return ({name: {"ode": score(adapter, "ode", other), "training_sampler": score(adapter, "training_sampler", other)}
                 for name, other in others.items()},
                {label: score(adapter, label) for label in extra_labels})

    before, before_sde, (before_others, before_samplers) = score(None), score(None, "training_sampler"), score_extra(None)
    curve_points: list[dict] = []

    def curve_point(trained) -> dict:
        """The trainer's evaluation hook (called with the adapter active): the held-out ODE gain so far."""
        result = held_out(trained, "probe", spec, settings, held_out_reward, args.eval_limit)
        gain, se = paired_gain(result["per_image"][spec.name], per_image[None, "ode", spec.name][spec.name])
        curve_points.append({"images": len(curve_points) * args.curve_every * config.prompts_per_step * config.group_size,
                             "score": round(result["score"], 4), "gain": round(gain, 4), "se": round(se, 4)})
        print(json.dumps({"curve": curve_points[-1]}), flush=True)  # a long probe shows its progress
        return {"score": result["score"]}

    if args.curve_every:
        if args.steps % args.curve_every:
            parser.error(f"--steps {args.steps} is not a multiple of --curve-every {args.curve_every}; make it one")
        config = replace(config, eval_every=args.curve_every)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(config, policy=policy, prompts=spec.prompts("train"), rewards={args.task: reward},
                              run_dir=run_dir, adapter="probe", evaluate=curve_point if args.curve_every else None)
        final = trainer.train(progress=False)
        minutes = (time.perf_counter() - started) / 60
        curve = [round(r[f"reward/{args.task}/mean"], 3) for r in read_metrics(f"{run_dir}/metrics.jsonl") if f"reward/{args.task}/mean" in r]
        # the saved adapter, as the harness evaluates it: with `ema` set it holds the averaged weights
        policy.load_adapter("probe_final", final)
        after, after_sde, (after_others, after_samplers) = (score("probe_final"), score("probe_final", "training_sampler"),
                                                             score_extra("probe_final"))
    # base and teacher saw the same prompts and noise: their per-image differences give each gain's error
    also = {name: {"base": before_others[name], "teacher": after_others[name],
                   "gain_and_se": paired("ode", name), "training_sampler_gain_and_se": paired("training_sampler", name)}
            for name in others}
    extra = {label: {"base": before_samplers[label], "teacher": after_samplers[label], "gain_and_se": paired(label, spec.name),
                     "excess_over_ode_and_se": excess_over_ode(label)}
             for label in extra_labels}
    print(json.dumps({"task": args.task, "tag": args.tag, "steps": args.steps, "overrides": overrides, "threads": args.threads,
                      "train_minutes": round(minutes, 2), "base": before, "teacher": after,
                      "gain_and_se": paired("ode", spec.name),
                      "training_sampler": {"base": before_sde, "teacher": after_sde},
                      "training_sampler_gain_and_se": paired("training_sampler", spec.name),
                      "training_sampler_excess_over_ode_and_se": excess_over_ode("training_sampler"), "train_reward": curve,
                      **({"also": also} if also else {}), **({"samplers": extra} if extra else {}), **({"curve": curve_points} if args.curve_every else {})}))


if __name__ == "__main__":
    main()
