"""Named presets of a comparison run (``smoke``, ``standard``, ``paper``) and ``--set`` changes to them.

A ``RunPlan`` holds one config per trainer (the teachers' GRPO, DiffusionOPD and its PPO-style
variant, multi-reward and cascade RL) plus the evaluation settings. ``plan(name)`` builds a preset;
``apply_overrides(plan, ["opd.lr=3e-4", ...])`` changes single fields of it, checked against the
config dataclasses (unknown names get a "did you mean", wrong types a one-line error). A changed
plan is another experiment: it is part of a run's identity (``run.json``) and of its teachers' keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from opd_bench.baselines.cascade import CascadeConfig
from opd_bench.baselines.multi_reward import MultiRewardConfig
from opd_bench.trainers.grpo import GRPOConfig
from opd_bench.trainers.opd import OPDConfig
from opd_bench.training import check_fields


@dataclass
class RunPlan:
    """Everything a comparison run needs besides the suite, model and seeds (a named preset)."""

    teacher: GRPOConfig
    opd: OPDConfig
    opd_ppo: OPDConfig
    multi_reward: MultiRewardConfig
    cascade: CascadeConfig
    eval_limit: int | None = 32  # test prompts per benchmark for the final evaluations
    eval_images_per_prompt: int | None = 2  # None: each benchmark's own (GenEval: 4)
    # Noise seed of every final evaluation. One seed for all models pairs their images (same
    # prompt, same starting noise), so a difference between two models is theirs, not the
    # sampler's; None scores each cell with its training seed (schema 2 runs).
    eval_seed: int | None = 0
    train_eval_limit: int = 12  # test prompts per benchmark for the curves during training
    variance_batches: tuple[int, ...] = (1, 2, 4, 8)
    variance_noise_levels: tuple[float, ...] = (0.1, 0.3, 0.7, 1.0)
    variance_repeats: int = 6
    variance_reference: tuple[int, float] = (4, 0.7)
    sample_prompts_per_task: int = 2
    teacher_overrides: dict[str, dict] = field(default_factory=dict)  # per task, e.g. {"pref": {"kl_beta": 0.01}}

    def __post_init__(self) -> None:
        def whole(value: Any, minimum: int, optional: bool = False) -> bool:
            if value is None:
                return optional
            return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

        check_fields("run plan", self, {
            "eval_limit": (whole(self.eval_limit, 1, optional=True), "an integer >= 1, or null: every test prompt"),
            "eval_images_per_prompt": (whole(self.eval_images_per_prompt, 1, optional=True), "an integer >= 1, or null"),
            "eval_seed": (whole(self.eval_seed, 0, optional=True), "an integer >= 0, or null"),
            "train_eval_limit": (whole(self.train_eval_limit, 1), "an integer >= 1"),
            "variance_batches": (bool(self.variance_batches) and all(whole(b, 1) for b in self.variance_batches),
                                 "a non-empty list of integers >= 1"),
            # > 0: the PPO-style estimator needs stochastic steps (one at 0 failed after all the training)
            "variance_noise_levels": (bool(self.variance_noise_levels) and all(
                isinstance(v, (int, float)) and v > 0 for v in self.variance_noise_levels), "a non-empty list of numbers > 0"),
            "variance_repeats": (whole(self.variance_repeats, 2), "an integer >= 2"),
            # the ratio the report quotes is read from the grid's row at this point: one outside it was NaN
            "variance_reference": (self._reference_in_grid(), f"a pair [batch, noise level] with the batch one of "
                                   f"variance_batches {list(self.variance_batches)} and the noise level one of "
                                   f"variance_noise_levels {list(self.variance_noise_levels)}"),
            "sample_prompts_per_task": (whole(self.sample_prompts_per_task, 1), "an integer >= 1"),
        })

    def _reference_in_grid(self) -> bool:
        reference = self.variance_reference
        if not isinstance(reference, (list, tuple)) or len(reference) != 2:
            return False
        batch, noise = reference
        return (isinstance(batch, int) and not isinstance(batch, bool) and batch in self.variance_batches
                and isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise in self.variance_noise_levels)

    def to_dict(self) -> dict:
        return asdict(self)

    def teacher_for(self, task: str) -> GRPOConfig:
        """The teacher config of ``task``: the teachers' own, with that task's changes."""
        return replace(self.teacher, **self.teacher_overrides.get(task, {}))


def _smoke() -> RunPlan:
    # one update per rollout: the smoke run's GRPO runs and cascade stages are one or two steps long
    grpo = dict(steps=2, prompts_per_step=2, group_size=2, num_steps=3, micro_batch=64, eval_every=1, checkpoint_every=1,
                train_fraction=0.5, updates_per_rollout=1)
    opd = dict(steps=2, prompts_per_task=1, num_steps=3, micro_batch=64, eval_every=1, checkpoint_every=1)
    return RunPlan(
        teacher=GRPOConfig(**grpo),
        opd=OPDConfig(**opd),
        opd_ppo=OPDConfig(mode="ppo", noise_level=0.7, **opd),
        multi_reward=MultiRewardConfig(**{**grpo, "prompts_per_step": 3}),
        cascade=CascadeConfig(stages=[("geneval", 1), ("ocr", 1)], grpo=GRPOConfig(**{**grpo, "prompts_per_step": 3})),
        eval_limit=2, eval_images_per_prompt=1, train_eval_limit=1,
        variance_batches=(1, 2), variance_noise_levels=(0.7,), variance_repeats=2, variance_reference=(2, 0.7),
        sample_prompts_per_task=1,
    )


def _standard() -> RunPlan:
    # Matched student budgets: every method takes `steps` optimizer steps on 12 images per step,
    # with the same adapter (LoRA r32). 60 steps at r32 rather than 30 at r8: in the student probes
    # the OPD student kept 81% of the pref teacher's gain against 59% (docs/benchmarks.md, S1-S10).
    # Each method keeps the learning rate its probes chose: 1e-3 for OPD; 3e-4 (Flow-GRPO's for
    # r32) for the GRPO students, which at 1e-3 and r32 fell below the base (M1-M3).
    steps = 60
    student_lora = dict(lora_rank=32, lora_alpha=64)
    # Every GRPO run (teachers, multi-reward, cascade) keeps a KL penalty to the base: without it every
    # pref teacher seed lost 0.013-0.036 of the hidden taste pref_oracle, with it none lost more than
    # 0.004 (docs/benchmarks.md, K0-K1). Those probes measured the exact per-step KL ("step") at
    # Flow-GRPO's beta 0.04, which on the 4 trained steps is 9-19x Flow-GRPO's own penalty at that
    # beta ("reference"). Each group's advantages are divided by its own std, where Flow-GRPO divides
    # by the whole batch's. Both are what the committed runs were made with, and on the pref teacher
    # Flow-GRPO's forms did worse: its weighting let the taste drift by 0.016 (K4), its batch std
    # gave a smaller pref gain at every seed, about 30% less (A1; docs/benchmarks.md). One update per
    # rollout (Flow-GRPO makes two) is also what the committed runs were made with, and two left the
    # pref teacher's gain where it was (Y0-Y1).
    grpo = dict(prompts_per_step=3, group_size=4, num_steps=8, noise_level=0.7, train_fraction=0.5, lr=1e-3,
                lora_rank=8, lora_alpha=16, micro_batch=48, eval_every=10, checkpoint_every=5, clip_range=0.2,
                kl_beta=0.04, kl_weighting="step", adv_std="group", updates_per_rollout=1)
    student_grpo = {**grpo, **student_lora, "lr": 3e-4}
    # The students' task rewards are not scored on their own rollouts: the report reads none of
    # them, and the OCR engine alone made an OPD cell ~17% longer (docs/benchmarks.md, "Cheaper
    # cells"). `--set opd.monitor_rewards=true` logs them again; the trained weights are the same.
    opd = dict(steps=steps, prompts_per_task=4, num_steps=8, train_fraction=0.875, lr=1e-3, micro_batch=48,
               eval_every=10, checkpoint_every=5, monitor_rewards=False, **student_lora)
    # Teachers: 60 steps of 8 prompts x 8 images (3,840 images each), LoRA r8. On base v4 this is
    # what the 2-core budget buys; larger learning rates made the geneval teacher worse, larger
    # batches or all steps trained did not make it learn, and on v6 neither did r32
    # (docs/benchmarks.md, teacher probes T1-T14, G1-G4).
    return RunPlan(
        teacher=GRPOConfig(steps=60, **{**grpo, "prompts_per_step": 8, "group_size": 8}),
        opd=OPDConfig(**opd),
        opd_ppo=OPDConfig(mode="ppo", noise_level=0.7, clip_range=0.2, **opd),
        multi_reward=MultiRewardConfig(steps=steps, **student_grpo),
        cascade=CascadeConfig(stages=[("pref", 20), ("geneval", 20), ("ocr", 20)],
                              grpo=GRPOConfig(steps=steps, **student_grpo)),
        # 160 test prompts x 2 images per task: on 32 the teachers' and students' gains were within
        # the evaluation's own noise (docs/benchmarks.md, P1 and P2).
        eval_limit=160,
    )


def _paper() -> RunPlan:
    # PAPER.md's SD3.5-Medium settings (512 px, 10 training steps, LoRA r=32 alpha=64, lr 3e-4), for
    # real models on GPUs. Matched student budgets: 300 steps of 48 images for every method.
    # Prompt counts per step (4 and 16) divide by 1, 2 or 4 processes.
    steps = 300
    lora = dict(lora_rank=32, lora_alpha=64, lr=3e-4, micro_batch=8, eval_every=50, checkpoint_every=25)
    grpo = dict(num_steps=10, noise_level=0.7, guidance_scale=4.5, clip_range=1e-4, adv_clip=5.0, kl_beta=0.04,
                train_fraction=0.9, **{**lora, "checkpoint_every": 50})  # GRPO checkpoints between its two-update rollouts
    opd = dict(steps=steps, prompts_per_task=16, num_steps=10, noise_level=0.0, train_fraction=0.9, ema=0.9, **lora)
    return RunPlan(
        teacher=GRPOConfig(steps=600, prompts_per_step=8, group_size=24, **grpo),
        teacher_overrides={"pref": {"kl_beta": 0.01}},
        opd=OPDConfig(**opd),
        opd_ppo=OPDConfig(**{**opd, "mode": "ppo", "noise_level": 0.7, "clip_range": 0.2}),
        multi_reward=MultiRewardConfig(steps=steps, prompts_per_step=4, group_size=12, **grpo),
        # The published cascade ran pref 800 -> geneval 300 -> pref 200 -> geneval 200 -> ocr 100
        # iterations; here its stages share the matched budget.
        cascade=CascadeConfig(stages=[("pref", 100), ("geneval", 100), ("ocr", 100)],
                              grpo=GRPOConfig(steps=steps, prompts_per_step=4, group_size=12, **grpo)),
        eval_limit=None, eval_images_per_prompt=None, train_eval_limit=64,
        variance_batches=(1, 2, 4, 8), variance_noise_levels=(0.1, 0.3, 0.7, 1.0), variance_reference=(4, 0.7),
    )


PRESETS: dict[str, Callable[[], RunPlan]] = {"smoke": _smoke, "standard": _standard, "paper": _paper}


def plan(preset: str) -> RunPlan:
    if preset not in PRESETS:
        from opd_bench.registry import did_you_mean

        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}.{did_you_mean(preset, sorted(PRESETS))}")
    return PRESETS[preset]()


# --set SECTION.FIELD=VALUE: the sections a user names, and the RunPlan field each one is
SECTIONS = {"teacher": "teacher", "opd": "opd", "opd-ppo": "opd_ppo", "multi-reward": "multi_reward", "cascade": "cascade"}
SET_EXAMPLES = ("teacher.lr=1e-4", "teacher.pref.kl_beta=0.01", "opd.steps=100", "opd-ppo.clip_range=0.1",
                "multi-reward.lora_rank=16", 'cascade.stages=[["pref",20],["ocr",20]]', "cascade.grpo.lr=1e-4",
                "eval_limit=64")


class OverrideError(ValueError):
    """A ``--set`` that names no field or gives a value the field cannot take; the message says which."""


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a bare word: cosine, ppo, ...
        return text


SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _coerce(where: str, current: Any, value: Any, annotation: str) -> Any:
    """``value`` in the type of the field: the one its annotation names where that is a plain bool,
    int, float or str (optional or not), else that of its present value; or an ``OverrideError``
    saying what it takes. By the annotation, not the value: a preset may hold an int in a float
    field (``lora_alpha=16``), which still takes 32.5."""
    optional = "None" in annotation
    kind = SCALARS.get(annotation.replace(" | None", ""))
    example = current if current is not None or kind is None else kind()

    def wrong(takes: str) -> OverrideError:
        takes += ", or null" if optional else ""
        return OverrideError(f"--set {where}={json.dumps(value)}: takes {takes}, e.g. {where}={json.dumps(example)}")

    if dataclasses.is_dataclass(current):
        fields = ", ".join(f.name for f in dataclasses.fields(current))
        raise OverrideError(f"--set {where}: is a config of its own; set one of its fields ({fields}), e.g. {where}.lr=1e-4")
    if value is None and optional:  # an optional field switched off
        return None
    if annotation.startswith("float | list"):  # one value, or one per item (noise_level)
        if isinstance(value, list):  # numbers as floats, as a single value is; the config checks the rest
            return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise OverrideError(f"--set {where}={json.dumps(value)}: takes a number or a JSON list of numbers, "
                                f"e.g. {where}=0.7 or {where}=[0.7,0.7,0,0]")
        return float(value)
    kind = kind or type(current)
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong("a word")
        return value
    if isinstance(current, (list, tuple)):
        if not isinstance(value, list):
            raise wrong("a JSON list")
        inner = current[0] if current else None
        items = [tuple(v) if isinstance(inner, tuple) and isinstance(v, list) else v for v in value]
        return tuple(items) if isinstance(current, tuple) else items
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise wrong("a JSON object")
        return value
    return value


def _set_field(config: Any, path: list[str], value: Any, where: str) -> Any:
    """``config`` with the field at ``path`` (nested configs: several names) set to ``value``."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(config)}
    names = list(annotations)
    name = path[0]
    if name not in names:
        raise OverrideError(f"--set {where}: {type(config).__name__} has no field {name!r}{_suggest(name, names)}; "
                            f"its fields: {', '.join(names)}")
    current = getattr(config, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise OverrideError(f"--set {where}: {name} is a value, not a config with fields of its own")
        new = _set_field(current, path[1:], value, where)
    else:
        new = _coerce(where, current, value, annotations[name])
        if new == current:  # 16.0 for a preset's 16: kept as it was, so the plan's JSON (teacher keys) is too
            new = current
    try:
        return replace(config, **{name: new})
    except (TypeError, ValueError) as error:  # the config's own checks (ranges, choices)
        raise OverrideError(f"--set {where}={json.dumps(value)}: {error}") from None


def set_fields(config: Any, pairs: Sequence[str]) -> Any:
    """A dataclass ``config`` with every ``FIELD=VALUE`` (a nested config's: ``A.FIELD=VALUE``) applied,
    each checked as ``--set`` is (``opd-bench pretrain base --set``, the probe scripts)."""
    def apply(state: Any, pair: str) -> Any:
        where, value = _split(pair)
        return _set_field(state, where.split("."), value, where)

    return _in_any_order(config, pairs, apply)


def _in_any_order(state: Any, pairs: Sequence[str], apply: Callable[[Any, str], Any]) -> Any:
    """``apply(state, pair)`` for every pair, whatever their order: a pair its config refuses at its
    turn (a check that reads another field, e.g. ``steps`` a multiple of ``updates_per_rollout``) is
    tried again after the others, until none applies; then the first refusal left is raised. Of
    several changes to one name the last is kept, as applying them in turn would."""
    last = {pair.partition("=")[0].strip(): pair for pair in pairs}
    pending = [pair for pair in pairs if last[pair.partition("=")[0].strip()] is pair]
    while pending:
        refused: list[tuple[str, OverrideError]] = []
        for pair in pending:
            try:
                state = apply(state, pair)
            except OverrideError as error:
                refused.append((pair, error))
        if len(refused) == len(pending):
            raise refused[0][1]
        pending = [pair for pair, _ in refused]
    return state


def _split(pair: str) -> tuple[str, Any]:
    where, sep, text = pair.partition("=")
    if not sep or not where.strip():
        raise OverrideError(f"--set {pair!r} is not NAME=VALUE; e.g. {', '.join(SET_EXAMPLES)}")
    return where.strip(), _parse(text)


def read_set_file(path: str | Path) -> list[str]:
    """The ``NAME=VALUE`` lines of a ``--set-file``: one change a line, as ``--set`` takes it; blank
    lines and lines starting with ``#`` are skipped. A line that is not ``NAME=VALUE`` is an error
    naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not part of the first name
    except UnicodeDecodeError as error:
        raise OverrideError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line or not line.partition("=")[0].strip():
            raise OverrideError(f"{path}:{number}: {line!r} is not NAME=VALUE; write one change a line, "
                                f"e.g. {SET_EXAMPLES[0]}")
        pairs.append(line)
    return pairs


def apply_overrides(run_plan: RunPlan, pairs: Sequence[str], tasks: Sequence[str] = ()) -> RunPlan:
    """``run_plan`` with every ``SECTION.FIELD=VALUE`` (or a plan-level ``FIELD=VALUE``) applied, in
    any order (``_in_any_order``); VALUE is parsed as JSON (a bare word is a string).
    ``teacher.TASK.FIELD`` changes one task's teachers only (``tasks``: the suite's, to check TASK)."""
    plan_fields = [f.name for f in dataclasses.fields(RunPlan)
                   if f.name not in SECTIONS.values() and f.name != "teacher_overrides"]

    def apply(run_plan: RunPlan, pair: str) -> RunPlan:
        where, value = _split(pair)
        head, *rest = where.split(".")
        if (rest or [head])[-1] == "seed":
            raise OverrideError(f"--set {where}: every training run takes its seed from --seeds; use --seeds instead")
        if where == "cascade.grpo.steps":  # each stage trains its own number of steps
            raise OverrideError(f"--set {where}: the cascade trains the steps of its stages "
                                f"({json.dumps([list(s) for s in run_plan.cascade.stages])}); "
                                "change them with --set cascade.stages='[[\"pref\",20],[\"geneval\",20]]'")
        if head in SECTIONS and rest and rest[-1] == "eval_limit":  # a field nothing reads (see GRPOConfig)
            raise OverrideError(f"--set {where}: the curves during training score the run field train_eval_limit "
                                f"test prompts per benchmark (now {run_plan.train_eval_limit}); use --set train_eval_limit=N")
        if head == "teacher" and len(rest) > 2:  # a teacher config has no nested configs
            raise OverrideError(f"--set {where}: the name has too many parts; a teacher's field is teacher.FIELD "
                                "or teacher.TASK.FIELD, e.g. teacher.lr=1e-4 or teacher.pref.lr=1e-4")
        if head == "teacher" and len(rest) == 2:  # teacher.TASK.FIELD
            return _set_teacher_of(run_plan, rest[0], rest[1], value, where, tasks)
        elif head in SECTIONS:
            if not rest:
                raise OverrideError(f"--set {where}: {head} is a config; set one of its fields, e.g. {head}.lr=1e-4")
            section = SECTIONS[head]
            return replace(run_plan, **{section: _set_field(getattr(run_plan, section), rest, value, where)})
        elif head in plan_fields and not rest:
            return _set_field(run_plan, [head], value, where)
        else:
            names = [*SECTIONS, *plan_fields]
            raise OverrideError(f"--set {where}: no section or field {head!r}{_suggest(head, names)}; sections: "
                                f"{', '.join(SECTIONS)}; run fields: {', '.join(plan_fields)}")

    run_plan = _in_any_order(run_plan, pairs, apply)
    run_plan = _without_teacher_wide_values(run_plan)
    for task, own in run_plan.teacher_overrides.items():  # a teacher-wide change made after one task's
        try:
            run_plan.teacher_for(task)
        except (TypeError, ValueError) as error:
            raise OverrideError(f"--set teacher.{task}.{'/'.join(own)}: no longer fits the teacher settings changed "
                                f"after it: {error}") from None
    _check_task_keys(run_plan, tasks)
    _check_teacher_guidance(run_plan, tasks)
    changed_stages = any(pair.partition("=")[0].strip() == "cascade.stages" for pair in pairs)
    unknown = [task for task, _ in run_plan.cascade.stages if changed_stages and tasks and task not in tasks]
    if unknown:  # caught now, not after the teachers have trained
        raise OverrideError(f"--set cascade.stages: the suite has no task {unknown[0]!r}{_suggest(unknown[0], tasks)}; "
                            f"tasks: {', '.join(tasks)}")
    return run_plan


def _without_teacher_wide_values(run_plan: RunPlan) -> RunPlan:
    """``run_plan`` without the per-task teacher changes that equal the teacher-wide value: they
    change no teacher, and kept they would make a plan equal to its preset another experiment.
    Dropped once every change is applied: a later teacher-wide change can make them a change again."""
    kept = {}
    for task, own in run_plan.teacher_overrides.items():
        own = {name: value for name, value in own.items() if value != getattr(run_plan.teacher, name)}
        if own:
            kept[task] = own
    return replace(run_plan, teacher_overrides=kept)


PER_TASK_FIELDS = ("reward_weights", "teacher_guidance")  # dicts keyed by task, checked by the trainers too


def _check_task_keys(run_plan: RunPlan, tasks: Sequence[str]) -> None:
    """A per-task key that names no task of the suite, caught now rather than when its trainer is
    built (after the teachers have trained); so are reward weights where one reward is trained
    (a teacher, a cascade stage), which its trainer would refuse for every other task."""
    single = [("teacher", run_plan.teacher), ("cascade.grpo", run_plan.cascade.grpo),
              *((f"teacher.{task}", own) for task, own in run_plan.teacher_overrides.items())]
    for where, part in single:
        weights = part.get("reward_weights") if isinstance(part, dict) else part.reward_weights
        if weights:
            raise OverrideError(f"--set {where}.reward_weights: a teacher or cascade stage trains on its own task's "
                                "reward alone, so it takes no reward weights; they weigh multi-reward's rewards "
                                "(--set multi-reward.reward_weights=...)")
    for head, section in SECTIONS.items() if tasks else ():
        config = getattr(run_plan, section)
        for where, part in ((head, config), (f"{head}.grpo", getattr(config, "grpo", None))):
            for name in PER_TASK_FIELDS:
                unknown = [key for key in getattr(part, name, None) or {} if key not in tasks]
                if unknown:
                    raise OverrideError(f"--set {where}.{name}: the suite has no task {unknown[0]!r}"
                                        f"{_suggest(unknown[0], tasks)}; tasks: {', '.join(tasks)}")


def _check_teacher_guidance(run_plan: RunPlan, tasks: Sequence[str]) -> None:
    """DiffusionOPD queries each teacher at the CFG scale it was trained with (PAPER.md). A task
    missing from ``teacher_guidance`` falls back to the student's scale; where that is not the
    teacher's, say so now rather than distil a teacher at a scale it never sampled."""
    trained = {task: run_plan.teacher_for(task).guidance_scale for task in tasks}
    for head, section in (("opd", run_plan.opd), ("opd-ppo", run_plan.opd_ppo)):
        differ = {task: scale for task, scale in trained.items()
                  if task not in section.teacher_guidance and scale != section.guidance_scale}
        if differ:
            wanted = ", ".join(f'"{task}": {scale:g}' for task, scale in differ.items())
            raise OverrideError(
                f"--set: the {', '.join(differ)} teacher(s) train at another CFG scale than {head}'s "
                f"{section.guidance_scale:g}, which {head} would query them at; add --set {head}.teacher_guidance='{{{wanted}}}' "
                f"(each teacher's own scale), or name {section.guidance_scale:g} there to keep the student's")


def _set_teacher_of(run_plan: RunPlan, task: str, name: str, value: Any, where: str, tasks: Sequence[str]) -> RunPlan:
    """One task's teacher config changed (``RunPlan.teacher_overrides``), the others left as they are."""
    if tasks and task not in tasks:
        raise OverrideError(f"--set {where}: the suite has no task {task!r}{_suggest(task, tasks)}; tasks: {', '.join(tasks)}")
    own = dict(run_plan.teacher_overrides.get(task, {}))
    checked = _set_field(replace(run_plan.teacher, **own), [name], value, where)
    own[name] = getattr(checked, name)
    return replace(run_plan, teacher_overrides={**run_plan.teacher_overrides, task: own})
