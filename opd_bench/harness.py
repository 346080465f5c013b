"""``opd-bench run``: teachers, DiffusionOPD and the baselines on one suite, evaluated alike.

Every piece of work is a *cell* with its own folder under the run directory: a teacher, a
(method, seed) training run, an evaluation, the variance experiment, the image grids. A cell
that finished is skipped when the command is run again, and an unfinished training cell
resumes from its checkpoint, so a killed run continues where it stopped. ``results.json`` is
assembled from the cells at the end, including cells that earlier runs in the same folder finished
(another ``--method`` or ``--seeds``), so a partial rerun adds to the results instead of replacing them.

A run folder carries a marker file (``.opd-bench-run``); ``--force`` deletes only folders that hold
a run, and no folder that is not empty and holds no run is ever written into.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from opd_bench import __version__, distributed, trackers
from opd_bench.io import CorruptFileError, atomic_write_json, json_differences, read_json, without_later_settings
from opd_bench.presets import apply_overrides, plan
from opd_bench.result_schema import FORWARD_KEYS, SCHEMA_VERSION, STUDENT_METHODS, eval_noise_seed

RUN_MARKER = ".opd-bench-run"
LOCK_FILE = ".opd-bench-lock"  # held (flock) by the command working in the folder
# what a run folder holds before any of its work is saved
BOOKKEEPING_FILES = {RUN_MARKER, LOCK_FILE, "run.json"}
METHODS = STUDENT_METHODS
METHOD_CHOICES = ("all", "teachers", *METHODS)


# How a run loads its model when nothing else is asked for (the tiny suite's runs and results).
DEFAULT_MODEL_OPTIONS = {"dtype": "float32", "drop_t5": False}


def methods_for(method: str) -> list[str]:
    if method not in METHOD_CHOICES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_CHOICES)}")
    return list(METHODS) if method == "all" else [] if method == "teachers" else [method]


def _weights_hash(adapter_dir: Path | None) -> str | None:
    """What an evaluation, grid or variance record names as the model it used (None: the base)."""
    from opd_bench.io import weights_sha256

    return None if adapter_dir is None else weights_sha256(adapter_dir)


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds an opd-bench run: its marker, or the run.json / results.json of a
    run made before markers existed. Those are read, not just found: ``--force`` deletes what this
    accepts, and both are common file names (an `opd-bench eval` results.json has no schema_version)."""
    folder = Path(folder)
    if (folder / RUN_MARKER).is_file():
        return True
    return (_has_keys(folder / "run.json", ("suite", "model", "preset", "plan"))
            or _has_keys(folder / "results.json", ("schema_version", "suite", "results")))


def _has_keys(path: Path, keys: Sequence[str]) -> bool:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def _without_locations(value):
    """Reward options without where things are (weight paths and folders, a server's url, device,
    token), at any depth: a remote reward's spec nests the served reward's options."""
    if isinstance(value, dict):
        return {k: _without_locations(v) for k, v in value.items()
                if k not in ("url", "device", "token") and not k.endswith(("_path", "_dir"))}
    return [_without_locations(v) for v in value] if isinstance(value, (list, tuple)) else value


_HELD_LOCKS: dict[Path, object] = {}


def hold_lock(folder: Path) -> None:
    """Take ``folder``'s lock for as long as this process lives, so that two commands never write
    one run at once (harnesses of one process share it). A no-op where the OS has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    path = (folder / LOCK_FILE).resolve()
    if path in _HELD_LOCKS and path.exists():
        return
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise FileExistsError(f"another opd-bench command{f' (pid {owner})' if owner else ''} is working in {folder}; "
                              "wait for it to end or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_LOCKS[path] = handle


def _score(value: float) -> float | None:
    """A per-image score as stored: 6 decimals (far below any verification tolerance); NaN
    ("not applicable") as null, so the file stays standard JSON."""
    return None if math.isnan(value) else round(float(value), 6)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# what a rerun changes in results.json although it trained and evaluated nothing new
INVOCATION_KEYS = ("date", "command", "seconds", "environment", "git_commit", "package_version")


def _same_outcome(previous: dict, results: dict) -> bool:
    """Whether ``results`` says what ``previous`` (a written results.json) says, apart from the invocation."""
    fresh = json.loads(json.dumps(results))
    return all(previous.get(key) == fresh.get(key) for key in {*previous, *fresh} - set(INVOCATION_KEYS))


def environment(device: str, threads: int | None = None, jobs: int = 1) -> dict:
    """Where a run ran; ``threads``: torch threads per cell (a cell's numbers depend on them),
    ``jobs``: cells side by side."""
    import diffusers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "threads": threads or torch.get_num_threads(), "jobs": jobs, "device": device,
    }


class Harness:
    def __init__(
        self,
        out: str | Path,
        *,
        suite: str = "tiny",
        model: str | None = None,
        preset: str = "standard",
        overrides: Sequence[str] = (),
        seeds: Sequence[int] = (0, 1, 2),
        method: str = "all",
        device: str = "cpu",
        dtype: str = "auto",
        drop_t5: bool = False,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
        max_batch: int | None = None,
        log_to: Sequence[str] = (),
        force: bool = False,
        command: str = "",
        progress: bool = True,
        hold_folder: bool = True,
    ):
        from opd_bench import suites
        from opd_bench.policy import check_max_batch, resolve_dtype

        self.out = Path(out)
        self.suite = suites.get(suite)
        self.model = suites.canonical_model(model or self.suite.default_model)
        # a preset with --set changes is another experiment: the plan is part of the identity below
        preset_plan = plan(preset)
        self.plan = apply_overrides(preset_plan, list(overrides), tasks=list(self.suite.tasks))
        # --set changes that leave the preset as it is (opd.steps=60 on standard) are no change: recorded
        # as such, so whether a run can be listed does not depend on its last command's spelling
        self.preset, self.overrides = preset, list(overrides) if self.plan != preset_plan else []
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed, e.g. 0,1,2")
        self.methods = methods_for(method)
        self.device, self.force, self.command, self.progress = device, force, command, progress
        self.dtype = resolve_dtype(dtype, device)
        # memory savers (recorded in results.json's environment): the first two leave every number as
        # it is; max_batch changes float rounding only, which training amplifies (keep it within a run)
        self.memory = {"gradient_checkpointing": gradient_checkpointing, "offload_text_encoders": offload_text_encoders,
                       "max_batch": check_max_batch(max_batch)}
        self.cell_threads, self.jobs = None, 1  # set by run()
        self.results_unchanged = False  # set by run(): a rerun found nothing new and kept results.json
        # experiment trackers mirror every training cell's metrics; they change no number (not in the identity)
        self.log_to = list(log_to)
        trackers.configure(self.log_to, self.out)
        # what a worker process of a parallel run (opd_bench.parallel) needs to build the same harness
        self.options = dict(out=str(self.out), suite=suite, model=model, preset=preset, overrides=self.overrides,
                            seeds=self.seeds, method=method,
                            device=device, dtype=self.dtype, drop_t5=drop_t5, command=command, log_to=self.log_to,
                            **self.memory)
        self.identity = {"suite": suite, "suite_version": self.suite.version, "model": self.model, "preset": preset, "plan": self.plan.to_dict()}
        # A precision or a model without T5 is another experiment. Only the non-default is written, so
        # the float32 runs made before the option existed keep their identity and their teachers.
        self.model_options = {"dtype": self.dtype, "drop_t5": drop_t5}
        variant = {k: v for k, v in self.model_options.items() if v != DEFAULT_MODEL_OPTIONS[k]}
        self.identity.update(variant)
        self.resolution = self.suite.image_side()
        fingerprint = suites.model_fingerprint(self.model)
        if self.resolution is not None:  # a run at another image size is another experiment
            self.identity["resolution"] = self.resolution
        if fingerprint:  # the shipped alias's weights change between releases; a local folder can be rebuilt
            self.identity["model_sha256"] = fingerprint
        self.suite_settings = self.suite.settings()
        if self.suite_settings is not None:  # a configurable suite's prompt files and rewards
            self.identity["suite_settings"] = self.suite_settings
        # teachers are reused by (base, suite version, task, config): weights and image side are part of the base
        self.teacher_base = (self.model + (f"#{fingerprint}" if fingerprint else "") + (f"@{self.resolution}px" if self.resolution else "")
                             + "".join(f"~{key}={value}" for key, value in variant.items()))
        # whether run() deletes the old run first (--force on a run folder)
        self.start_over = False
        if hold_folder:  # one process touches the folder (--force deletes it); a parallel run's workers use it as is
            self.start_over = distributed.current().run_on_main(self._check_folder)
        self._policy = None
        self._evaluators: dict = {}

    # ------------------------------------------------------------------------ bookkeeping
    def _check_folder(self) -> bool:
        """Refuse an --out that is not this run's to use; returns whether --force will delete it."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file; choose a folder for the run")
        occupied = out.is_dir() and any(out.iterdir())
        if occupied and not holds_run(out):  # never write into (or delete) someone else's files
            raise FileExistsError(f"--out {out} is not empty and holds no opd-bench run; nothing was changed, "
                                  "choose a new or empty folder")
        if self.force and occupied:
            target, here = out.resolve(), Path.cwd().resolve()
            if target == here or target in here.parents:
                raise FileExistsError(f"--force would delete {out}, the working directory or a folder above it; "
                                      "nothing was changed, run from elsewhere or choose another --out")
            if out.is_symlink():
                raise FileExistsError(f"--out {out} is a symbolic link; pass the folder it points to ({target}) to --force")
        self.out.mkdir(parents=True, exist_ok=True)
        hold_lock(out)
        # --force deletes the old run only once run() has checked the rest of the input: a typo in
        # --model must not cost a finished run
        if not (self.force and occupied):
            self._claim_folder()
        return self.force and occupied

    def _check_cleared(self) -> None:
        """Work written before run() has deleted the old run (--force) would mix with it, or be deleted."""
        if self.start_over:
            raise RuntimeError(f"Harness(force=True) deletes the run in {self.out} when run() starts; call run() first")

    def _clear_folder(self) -> None:
        """--force: delete the old run but the lock this command holds. The marker is written first
        and the old run.json replaced last, so a kill midway leaves a run folder (the next --force
        finishes the job) that a plain run of other settings still refuses."""
        import shutil

        self._write_marker()  # a run made before markers existed has none
        for path in self.out.iterdir():
            if path.name not in (LOCK_FILE, RUN_MARKER, "run.json"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        self._claim_folder()

    def _write_marker(self) -> None:
        atomic_write_json(self.out / RUN_MARKER, {"what": "an opd-bench run folder; `opd-bench run --force` may delete it",
                                                  "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})

    def _claim_folder(self) -> None:
        """Refuse a folder of another run's identity; write the marker and this run's identity."""
        out = self.out
        identity_path = out / "run.json"
        work_saved = any(path.name not in BOOKKEEPING_FILES for path in out.iterdir())
        # Without run.json what made the work is unknown, and evaluations are not keyed by their settings:
        # they could pass for this run's. Teachers are keyed by theirs, so a copied teachers/ is welcome.
        unkeyed = [path.name for path in out.iterdir() if path.name not in {*BOOKKEEPING_FILES, "teachers"}]
        if unkeyed and not identity_path.exists():
            raise FileExistsError(f"{out} holds a run's work ({', '.join(sorted(unkeyed)[:3])}) but no run.json, so what made "
                                  "it is unknown; restore run.json from a copy, or use another --out (--force deletes this work)")
        if identity_path.exists() and work_saved:  # a start that failed before any work (say, a wrong --model) binds nothing
            fix = "restore it from a copy, or use another --out (--force deletes this run's work)"
            saved, current = read_json(identity_path, fix=fix), json.loads(json.dumps(self.identity))
            saved, current = without_later_settings(saved), without_later_settings(current)  # settings added since
            if saved != current:
                defaults = DEFAULT_MODEL_OPTIONS  # written only when not the default: compare them filled in
                raise FileExistsError(
                    f"{self.out} holds a run with another suite, suite config, model, preset or --set change "
                    f"({json_differences({**defaults, **saved}, {**defaults, **current})}); to go on with it, rerun with its "
                    "saved settings (a moved weight folder: link its old path to the new place); otherwise use another "
                    "--out (--force deletes this run's trained work)"
                )
        if not (self.out / RUN_MARKER).exists():
            self._write_marker()
        atomic_write_json(identity_path, self.identity)

    @property
    def policy(self):
        if self._policy is None:
            from opd_bench.policy import DTYPES, Policy
            from opd_bench.suites import resolve_model

            # with several processes a bare "cuda" means this process's GPU
            self._policy = Policy.from_pretrained(
                resolve_model(self.model), device=distributed.current().device(self.device), resolution=self.resolution,
                dtype=DTYPES[self.dtype], drop_t5=self.model_options["drop_t5"], **self.memory,
            )
        return self._policy

    def prompts(self, split: str) -> dict:
        return {task: self.suite.benchmark(task).prompts(split) for task in self.suite.tasks}

    def train_rewards(self) -> dict:
        if not hasattr(self, "_train_rewards"):
            self._train_rewards = {task: self.suite.benchmark(task).build_reward("train") for task in self.suite.tasks}
        return self._train_rewards

    def evaluator(self, limit: int | None, images_per_prompt: int):
        from opd_bench.evaluate import make_evaluator

        key = (limit, images_per_prompt)
        if key not in self._evaluators:
            self._evaluators[key] = make_evaluator(self.suite, limit=limit, images_per_prompt=images_per_prompt)
        return self._evaluators[key]

    # ----------------------------------------------------------------------------- cells
    def _check_split(self, processes: int) -> None:
        """Every trainer's prompts per step must split evenly over the processes: checked for all
        of them before the first trains (each trainer checks its own, hours later for the last)."""
        counts = {f"teacher.{task}.prompts_per_step" if task in self.plan.teacher_overrides else "teacher.prompts_per_step":
                  self.plan.teacher_for(task).prompts_per_step for task in self.suite.tasks}
        students = {"opd": ("opd.prompts_per_task", self.plan.opd.prompts_per_task),
                    "opd-ppo": ("opd-ppo.prompts_per_task", self.plan.opd_ppo.prompts_per_task),
                    "multi-reward": ("multi-reward.prompts_per_step", self.plan.multi_reward.prompts_per_step),
                    "cascade": ("cascade.grpo.prompts_per_step", self.plan.cascade.grpo.prompts_per_step)}
        counts.update(students[method] for method in self.methods)
        uneven = [f"{name}={count}" for name, count in counts.items() if count % processes]
        if uneven:
            raise ValueError(f"{', '.join(uneven)} cannot be split over {processes} processes (each takes an equal share of a "
                             f"step's prompts); --set each to a multiple of {processes}")

    def teacher_suite(self, task: str) -> str:
        """The suite version a teacher of ``task`` is keyed by: with a configurable suite, plus a
        digest of what it trains on (the train prompt file by content, the training reward and its
        options), so that a teacher trained on other prompts or rewards (a copied ``teachers/``
        folder) is never reused. Where things are (weight paths, a reward server's url, a device) is
        left out: the same teacher on another machine is the same teacher."""
        if self.suite_settings is None:
            return self.suite.version
        name, options = self.suite.benchmark(task).reward_of("train")
        train_file = (self.suite_settings.get(task) or {}).get("train")  # its sha256
        trains_on = {"train": train_file, "reward": [name, _without_locations(options)]}
        text = json.dumps(trains_on, sort_keys=True, default=str)
        return f"{self.suite.version}+{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def teacher_dir(self, task: str) -> Path:
        """Where the teacher of ``task`` is (or will be) trained; known before it is."""
        from opd_bench.trainers.teachers import teacher_key, teacher_run_dir

        key = teacher_key(self.teacher_base, self.teacher_suite(task), task, self.plan.teacher_for(task))
        return teacher_run_dir(self.out / "teachers", task, key)

    def teacher(self, task: str) -> Path:
        """Train (or reuse) the teacher of ``task``; returns its run folder (adapter in ``final/``)."""
        from opd_bench.trainers.teachers import finished_teacher, train_teacher

        self._check_cleared()
        run_dir = self.teacher_dir(task)
        if finished_teacher(run_dir) is not None:
            return run_dir  # without loading the model and the rewards it would train with
        return train_teacher(
            task, policy=self.policy, prompts=self.prompts("train")[task], reward=self.train_rewards()[task],
            config=self.plan.teacher_for(task), root=self.out / "teachers",
            base=self.teacher_base, suite_version=self.teacher_suite(task),
            evaluate=self.evaluator(self.plan.train_eval_limit, 1), progress=self.progress,
        )

    def teachers(self) -> dict[str, Path]:
        return {task: self.teacher(task) for task in self.suite.tasks}

    def teacher_dirs(self) -> dict[str, Path]:
        """Every task's teacher folder, trained or not."""
        return {task: self.teacher_dir(task) for task in self.suite.tasks}

    def method_dir(self, method: str, seed: int) -> Path:
        """The folder of one (method, seed) training cell."""
        return self.out / "methods" / method / f"seed{seed}"

    def final_adapter(self, method: str, seed: int) -> Path:
        """Where the trained adapter of one (method, seed) cell is (or will be) saved."""
        run_dir = self.method_dir(method, seed)
        if method == "cascade":  # the last stage's adapter is the cascade's result
            last_task = self.plan.cascade.stages[-1][0]
            return run_dir / f"stage{len(self.plan.cascade.stages) - 1}-{last_task}" / "final"
        return run_dir / "final"

    def trained(self, method: str, seed: int) -> bool:
        """Whether the (method, seed) cell finished: its adapter saved and DONE written beside it.

        A cascade's combined curve is written after its last stage's DONE; one killed in between
        gets it here, from its stages' files (no model needed).
        """
        final = self.final_adapter(method, seed)
        done = final.exists() and (final.parent / "DONE").exists()
        if done and method == "cascade" and not (self.method_dir(method, seed) / "metrics.jsonl").exists():
            done = self._join_cascade_curve(seed)
        return done

    def _join_cascade_curve(self, seed: int) -> bool:
        """Write a cascade's combined curve from its stages' files; False if a stage is unfinished
        (the cell then resumes). A stage's log that cannot be read condemns the whole cell: the
        later stages were trained from that stage."""
        from opd_bench.baselines.cascade import stage_dir, write_cascade_metrics
        from opd_bench.io import CorruptFileError
        from opd_bench.training import retrain_hint

        run_dir = self.method_dir("cascade", seed)
        stages = self.plan.cascade.stages
        if not all((stage_dir(run_dir, k, task) / "DONE").exists() for k, (task, _) in enumerate(stages)):
            return False
        try:
            write_cascade_metrics(run_dir, stages)
        except (OSError, ValueError, IndexError, KeyError) as error:
            raise CorruptFileError(f"the cascade in {run_dir} has a stage log that cannot be read ({error}); "
                                   f"{retrain_hint(run_dir)}") from None
        return True

    def finished_cells(self) -> dict[str, dict[int, Path]]:
        """The (method, seed) cells finished in this folder, by this run or earlier ones."""
        found: dict[str, dict[int, Path]] = {}
        for method in METHODS:
            for folder in sorted((self.out / "methods" / method).glob("seed*")):
                if not folder.name[4:].isdigit():
                    continue
                seed = int(folder.name[4:])
                if self.trained(method, seed):
                    found.setdefault(method, {})[seed] = self.final_adapter(method, seed)
        return found

    def train_method(self, method: str, seed: int, teachers: dict[str, Path]) -> Path:
        """Train (or resume, or skip) one (method, seed) cell; returns its adapter folder."""
        from opd_bench.baselines.cascade import CascadeTrainer
        from opd_bench.baselines.multi_reward import MultiRewardTrainer
        from opd_bench.trainers.opd import OPDTrainer

        self._check_cleared()
        run_dir = self.method_dir(method, seed)
        adapter = f"{method}-s{seed}"
        if self.trained(method, seed):
            return self.final_adapter(method, seed)
        evaluate = self.evaluator(self.plan.train_eval_limit, 1)
        common = dict(policy=self.policy, run_dir=run_dir, adapter=adapter, evaluate=evaluate)
        if method in ("opd", "opd-ppo"):
            config = replace(self.plan.opd if method == "opd" else self.plan.opd_ppo, seed=seed)
            trainer = OPDTrainer(
                config, prompts=self.prompts("train"), teachers={t: d / "final" for t, d in teachers.items()},
                rewards=self.train_rewards(), **common,
            )
        elif method == "multi-reward":
            trainer = MultiRewardTrainer(replace(self.plan.multi_reward, seed=seed), prompts=self.prompts("train"), rewards=self.train_rewards(), **common)
        else:
            config = replace(self.plan.cascade, grpo=replace(self.plan.cascade.grpo, seed=seed))
            trainer = CascadeTrainer(config, prompts=self.prompts("train"), rewards=self.train_rewards(), **common)
        return trainer.train(progress=self.progress)

    def models_to_evaluate(self, trained: dict[str, dict[int, Path]], teachers: dict[str, Path]):
        """(methods, seeds, {model name: {seed: adapter folder or None}}) of the final evaluation.

        Base and teachers are evaluated once, with the smallest seed of the folder's student runs (of
        the command's seeds where there are none).
        """
        methods = [m for m in METHODS if m in trained]
        # the seeds of the trained cells (a --method teachers run asks for seeds it trains none of)
        seeds = sorted(set().union(*trained.values())) or sorted(self.seeds)[:1]
        models: dict[str, dict[int, Path | None]] = {"base": {seeds[0]: None}}
        for task, folder in teachers.items():
            models[f"teacher/{task}"] = {seeds[0]: folder / "final"}
        for method in methods:
            models[method] = dict(sorted(trained[method].items()))
        return methods, seeds, models

    def _loaded(self, name: str, adapter_dir: Path | None, seed: int) -> str | None:
        """The adapter name under which model ``name`` (seed ``seed``) is loaded; None = base."""
        if adapter_dir is None:
            return None
        adapter = f"eval_{name.replace('/', '_')}_s{seed}"
        if adapter not in self.policy.adapters:
            self.policy.load_adapter(adapter, adapter_dir)
        return adapter

    def _evaluation_path(self, name: str, seed: int) -> Path:
        return self.out / "evals" / f"{name.replace('/', '_')}-seed{seed}.json"

    def _parts_dir(self, name: str, seed: int) -> Path:
        """Where a model's evaluation waits, one file per benchmark, until every part is in."""
        return self.out / "evals" / "parts" / f"{name.replace('/', '_')}-seed{seed}"

    def _saved_record(self, path: Path, adapter_dir: Path | None) -> dict | None:
        """The record at ``path`` (an evaluation, one of its parts, the variance experiment) if it was
        made with the weights now in ``adapter_dir``; None if missing, or made before a cell was
        deleted and trained again. Records of versions before the hash was kept are trusted, as before."""
        record = read_json(path) if path.exists() else None
        if record is None or "weights_sha256" not in record:
            return record
        return record if record["weights_sha256"] == _weights_hash(adapter_dir) else None

    def _finished_evaluation(self, name: str, seed: int, adapter_dir: Path | None) -> dict | None:
        """The saved final evaluation of a model, or None; records of older versions lack per-image
        scores, and those are evaluated again."""
        record = self._saved_record(self._evaluation_path(name, seed), adapter_dir)
        return record if record is not None and "per_image" in record else None

    def evaluation_finished(self, name: str, seed: int, adapter_dir: Path | None, task: str | None = None) -> bool:
        """Whether the model's final evaluation (or, with ``task``, that benchmark's part of it) is saved."""
        if self._finished_evaluation(name, seed, adapter_dir) is not None:
            return True
        return task is not None and self._saved_record(self._parts_dir(name, seed) / f"{task}.json", adapter_dir) is not None

    def evaluate_cell(self, name: str, adapter_dir: Path | None, seed: int, task: str | None = None) -> dict:
        """Final evaluation of one model (base: ``adapter_dir=None``), cached in ``evals/``.

        It is made of one part per benchmark, each saved as it finishes (a parallel run makes each
        part a cell of its own; with ``task`` only that part is made and returned). A benchmark's
        images and scores do not depend on the others', so the parts join into the same record.
        """
        self._check_cleared()
        record = self._finished_evaluation(name, seed, adapter_dir)
        if record is not None:
            return record
        tasks = [task] if task is not None else list(self.suite.tasks)
        parts = [self._evaluation_part(name, adapter_dir, seed, t) for t in tasks]
        if task is not None:
            return parts[0]
        record = {"seed": parts[0]["seed"], "eval_seed": parts[0]["eval_seed"], "weights_sha256": _weights_hash(adapter_dir)}
        for key in ("scores", "per_tag", "per_image"):
            record[key] = {k: v for part in parts for k, v in part[key].items()}
        record["seconds"] = round(sum(part["seconds"] for part in parts), 2)  # benchmarks/bench_run_memory.py reads it
        atomic_write_json(self._evaluation_path(name, seed), record, compact_lists=True)
        shutil.rmtree(self._parts_dir(name, seed), ignore_errors=True)
        with contextlib.suppress(OSError):
            self._parts_dir(name, seed).parent.rmdir()  # evals/parts/, once no model has parts left
        return record

    def _evaluation_part(self, name: str, adapter_dir: Path | None, seed: int, task: str) -> dict:
        from opd_bench.evaluate import SamplerSettings, evaluate_suite, policy_source

        path = self._parts_dir(name, seed) / f"{task}.json"
        part = self._saved_record(path, adapter_dir)
        if part is not None:
            return part
        adapter = self._loaded(name, adapter_dir, seed)
        settings = SamplerSettings.of_suite(self.suite)
        noise_seed = eval_noise_seed(self.plan.eval_seed, seed)
        started = time.perf_counter()
        with self.policy.use(adapter):
            result = evaluate_suite(
                self.suite, policy_source(self.policy, settings), tasks=[task], seed=noise_seed, limit=self.plan.eval_limit,
                images_per_prompt=self.plan.eval_images_per_prompt, progress=self.progress,
            )
        per_image = {bench: [_score(v) for v in values] for bench, values in result["per_image"].items()}
        part = {"seed": seed, "eval_seed": noise_seed, "weights_sha256": _weights_hash(adapter_dir), "scores": result["scores"], "per_tag": result["per_tag"], "per_image": per_image,
                "seconds": round(time.perf_counter() - started, 2)}
        atomic_write_json(path, part, compact_lists=True)
        return part

    @property
    def variance_path(self) -> Path:
        return self.out / "variance.json"

    def _variance_task(self) -> str:
        # the preference teacher: a continuous reward always has spread, so it always moved from the base
        return "pref" if "pref" in self.suite.tasks else self.suite.tasks[0]

    def finished_variance(self, teachers: dict[str, Path]) -> dict | None:
        """The saved variance experiment, if it ran on the teacher now in its folder."""
        return self._saved_record(self.variance_path, teachers[self._variance_task()] / "final")

    def variance(self, teachers: dict[str, Path]) -> dict:
        from opd_bench.trainers.variance import variance_experiment

        self._check_cleared()
        record = self.finished_variance(teachers)
        if record is not None:
            return record
        task = self._variance_task()
        if "variance_teacher" not in self.policy.adapters:
            self.policy.load_adapter("variance_teacher", teachers[task] / "final")
            self.policy.add_adapter("variance_student", rank=self.plan.opd.lora_rank, alpha=self.plan.opd.lora_alpha, seed=0)
        rows = variance_experiment(
            self.policy, "variance_student", "variance_teacher", self.prompts("train")[task],
            batch_sizes=self.plan.variance_batches, noise_levels=self.plan.variance_noise_levels,
            repeats=self.plan.variance_repeats, num_steps=self.plan.opd.num_steps,
            guidance_scale=self.plan.opd.guidance_scale,
            teacher_guidance=self.plan.opd.teacher_guidance.get(task, self.plan.opd.guidance_scale), seed=0,
            micro_batch=self.plan.opd.micro_batch,
        )
        batch, noise = self.plan.variance_reference
        reference = [r for r in rows if r["batch"] == batch and r["noise_level"] == noise]
        record = {
            "teacher_task": task, "weights_sha256": _weights_hash(teachers[task] / "final"), "rows": rows,
            "reference": {"batch": batch, "noise_level": noise},
            "ratio_ppo_over_analytic": reference[0]["ratio_ppo_over_analytic"] if reference else math.nan,
        }
        atomic_write_json(self.variance_path, record)
        return record

    def samples_path(self, name: str, seed: int, adapter_dir: Path | None) -> Path:
        """The grid of model ``name``'s training seed ``seed``, drawn with the adapter now in
        ``adapter_dir``: named by all three, so a later run that adds a smaller seed, or trains a
        deleted cell again, draws its own grid instead of showing another one under its name."""
        weights = _weights_hash(adapter_dir)
        return self.out / "samples" / (f"{name.replace('/', '_')}-seed{seed}" + (f"-{weights[:8]}" if weights else "") + ".png")

    def samples(self, models: dict[str, tuple[int, Path | None]]) -> dict:
        """One image grid per model on the same prompts and seeds (rows = prompts)."""
        from opd_bench.io import save_grid
        from opd_bench.rewards.base import png_values
        from opd_bench.rollout import rollout

        self._check_cleared()
        test = self.prompts("test")
        prompts = [p for task in self.suite.tasks for p in test[task][: self.plan.sample_prompts_per_task]]
        grids = {}
        for name, (seed, adapter_dir) in models.items():
            path = self.samples_path(name, seed, adapter_dir)
            if not path.exists():
                with self.policy.use(self._loaded(name, adapter_dir, seed)):
                    t = rollout(
                        self.policy, prompts, images_per_prompt=4, num_steps=self.suite.num_steps,
                        noise_level=self.suite.noise_level, guidance_scale=self.suite.evaluation_guidance(), seed=0, keep={"images"},
                    )
                save_grid(png_values(t.images), path, columns=4)  # a diverged image as it was scored: NaN black
            grids[name] = str(path.relative_to(self.out))
        return {"prompts": [p.text for p in prompts], "grids": grids, "images_per_prompt": 4, "noise_seed": 0,
                "seeds": {name: seed for name, (seed, _) in models.items()}}  # the training seed each grid shows

    # ------------------------------------------------------------------------------ run
    def run(self, jobs: int = 1, threads: int | None = None) -> dict | None:
        """Every cell, then ``results.json``. ``jobs > 1`` (CPU only) first runs the unfinished cells
        side by side in that many processes of ``threads`` torch threads each (default: the cores
        shared out); the one-process pass below then finds them done."""
        from opd_bench import parallel
        from opd_bench.policy import check_pipeline
        from opd_bench.suites import resolve_model
        from opd_bench.training import return_freed_memory

        start = time.time()
        if jobs < 1 or (threads is not None and threads < 1):
            raise ValueError(f"--jobs {jobs} / --threads {threads}: both must be at least 1")
        # a model that cannot load fails here, in one line, not in the first cells of every worker
        check_pipeline(resolve_model(self.model), drop_t5=self.model_options["drop_t5"])
        for task in self.suite.tasks:  # so do a configurable suite's prompt files, reward options and weights
            spec = self.suite.benchmark(task)
            spec.path("train")  # building the spec checks the rest
            spec.locate_weights(train=True)
        self._check_split(distributed.current().world_size)
        if jobs > 1 and distributed.current().distributed:
            raise ValueError(f"--jobs {jobs} runs cells side by side on one machine; under torchrun or accelerate "
                             "every process already shares each cell, so drop --jobs")
        if jobs > 1 and not str(self.device).startswith("cpu"):
            raise ValueError(f"--jobs {jobs} runs cells side by side on the CPU; with --device {self.device} use --jobs 1")
        if self.start_over:  # the input is checked: now --force may delete the old run
            distributed.current().run_on_main(self._clear_folder)
            self.start_over = False
        if jobs > 1:
            threads = threads or max(1, parallel.available_cores() // jobs)
            parallel.run_cells(self, jobs, threads, progress=self.progress)
        elif threads is not None:
            torch.set_num_threads(threads)
        self.cell_threads, self.jobs = threads or torch.get_num_threads(), jobs  # recorded in results.json
        teachers = self.teachers()
        return_freed_memory()
        for method in self.methods:
            for seed in self.seeds:
                if not self.trained(method, seed):
                    self.train_method(method, seed, teachers)
                    return_freed_memory()  # else RSS creeps up cell by cell (glibc keeps freed buffers)
        if not distributed.current().is_main:
            return None  # training is shared; rank 0 alone evaluates (the others wait at exit) and writes results.json
        # Every finished cell of this folder is reported, also those of earlier runs with other
        # --method or --seeds: a partial rerun adds to the results instead of replacing them.
        trained = self.finished_cells()
        methods, seeds, models = self.models_to_evaluate(trained, teachers)
        evals: dict[str, dict[int, dict]] = {}
        for name, per_seed in models.items():
            evals[name] = {}
            for seed, folder in per_seed.items():
                evals[name][seed] = self._finished_evaluation(name, seed, folder)
                if evals[name][seed] is None:
                    evals[name][seed] = self.evaluate_cell(name, folder, seed)
                    return_freed_memory()  # a full collection costs ~0.2 s: not for a record only read
        variance = self.variance(teachers) if any(m.startswith("opd") for m in methods) else None
        samples = self.samples({name: (min(per_seed), per_seed[min(per_seed)]) for name, per_seed in models.items()})
        results = self.assemble(teachers, models, evals, variance, samples, time.time() - start, methods, seeds)
        previous = self._written_results()
        self.results_unchanged = previous is not None and _same_outcome(previous, results)
        if self.results_unchanged:
            return previous  # a rerun with nothing new keeps the file, and the wall time of the command that made it
        atomic_write_json(self.out / "results.json", results, compact_lists=True)
        return results

    def _written_results(self) -> dict | None:
        """The results.json an earlier command wrote; None where there is none or it cannot be read
        (it is rebuilt from the cells whole, so a damaged one is just replaced)."""
        path = self.out / "results.json"
        try:
            return read_json(path) if path.is_file() else None
        except CorruptFileError:
            return None

    def assemble(self, teachers, models, evals, variance, samples, seconds, methods, seeds) -> dict:
        from opd_bench.training import read_metrics
        from opd_bench.verify import adapter_sha256

        benchmarks = list(self.suite.tasks) + [k for t in self.suite.tasks for k in self.suite.benchmark(t).extra_rewards]
        results, per_tag = {}, {}
        for name, per_seed in evals.items():
            results[name] = {}
            for bench in benchmarks:
                values = [per_seed[s]["scores"][bench] for s in sorted(per_seed)]
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
                results[name][bench] = {"mean": mean, "std": std, "per_seed": values, "seeds": sorted(per_seed)}
            tags = [per_seed[s]["per_tag"].get("geneval", {}) for s in sorted(per_seed)]
            if tags and tags[0]:
                per_tag[name] = {"geneval": {tag: sum(t[tag] for t in tags) / len(tags) for tag in tags[0]}}
        curves, gradient_variance, compute = {}, {}, {}
        metric_files = {f"teacher/{t}": {seeds[0]: d / "metrics.jsonl"} for t, d in teachers.items()}
        for method in methods:
            metric_files[method] = {s: self.method_dir(method, s) / "metrics.jsonl" for s in models[method]}
        for name, files in metric_files.items():
            curves[name], gradient_variance[name] = {}, {}
            totals = []
            for seed, path in files.items():
                records = read_metrics(path)
                curves[name][str(seed)] = [r for r in records if any(k.startswith("eval/") for k in r)]
                gradient_variance[name][str(seed)] = [
                    {k: r[k] for k in ("step", "grad/variance", "grad/variance_rel")} for r in records if "grad/variance" in r
                ]
                totals.append(records[-1])
            compute[name] = {
                key: sum(t.get(key, 0) for t in totals) / len(totals)
                for key in (*FORWARD_KEYS, "images", "wall_seconds")
            }
            compute[name]["optimizer_steps"] = max(t["step"] for t in totals)
        cascade_stages, end = [], 0
        for k, (task, steps) in enumerate(self.plan.cascade.stages):
            end += steps
            cascade_stages.append({"stage": k, "task": task, "end_step": end})
        return {
            "schema_version": SCHEMA_VERSION, "package_version": __version__, "git_commit": _git_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": self.command,
            "suite": self.suite.name, "suite_version": self.suite.version, "suite_settings": self.suite_settings,
            "prompt_hashes": {t: {s: self.suite.benchmark(t).file_hash(s) for s in ("test", "train")} for t in self.suite.tasks},
            "model": self.model, "model_sha256": self.identity.get("model_sha256"), "preset": self.preset,
            "seeds": seeds, "methods": methods,
            "benchmarks": benchmarks, "headline": list(self.suite.headline),
            "config": {
                "teachers": asdict(self.plan.teacher), "opd": asdict(self.plan.opd), "opd-ppo": asdict(self.plan.opd_ppo),
                "multi-reward": asdict(self.plan.multi_reward), "cascade": asdict(self.plan.cascade),
                "eval": {"limit": self.plan.eval_limit, "images_per_prompt": self.plan.eval_images_per_prompt,
                         "seed": self.plan.eval_seed,
                         "num_steps": self.suite.num_steps, "guidance_scale": self.suite.evaluation_guidance(),
                         "noise_level": self.suite.noise_level, "resolution": self.resolution},
                # how the model was loaded; `opd-bench verify` regenerates images the same way
                "model": self.model_options,
                "overrides": self.overrides,  # --set changes to the preset (a listed run has none)
            },
            # the evaluation behind the curves (every trainer's eval_every steps; not in "config", whose
            # hash ranks a run on the leaderboard and which runs before this key shared)
            "curve_evaluation": {"limit": self.plan.train_eval_limit, "images_per_prompt": 1},
            "results": results, "per_tag": per_tag, "curves": curves, "gradient_variance": gradient_variance,
            "compute": compute, "variance": variance, "cascade_stages": cascade_stages if "cascade" in methods else [],
            # what `opd-bench verify` needs: every image's score (image i of a benchmark shows test prompt
            # i // images_per_prompt, generated with noise seed config['eval']['seed'], or the cell's own
            # seed where that is null) and the adapters that made them
            "per_image": {name: {str(seed): evals[name][seed]["per_image"] for seed in per_seed} for name, per_seed in evals.items()},
            "artifacts": {
                name: {str(seed): {"path": folder.relative_to(self.out).as_posix(), "sha256": adapter_sha256(folder)}
                       for seed, folder in per_seed.items()}
                for name, per_seed in models.items() if name != "base"
            },
            "samples": samples, "seconds": seconds,
            "environment": {**environment(self.device, threads=self.cell_threads, jobs=self.jobs),
                            "processes": distributed.current().world_size, **self.memory},
        }
