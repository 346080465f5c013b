"""Infrastructure shared by every trainer: metrics log, gradient variance, EMA, checkpoints.

A trainer owns its step; this module owns what happens around it, identically for all methods,
so curves, compute counts and resume behaviour are comparable across methods.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, get_args

import numpy as np
import torch

from opd_bench import distributed, trackers
from opd_bench.distributed import ProcessGroup
from opd_bench.io import (
    atomic_write_bytes, atomic_write_json, json_differences, parse_json_lines, read_json, read_json_lines, sync_folder,
    without_later_settings,
)


class MetricsLog:
    """JSON lines, one record per optimizer step (and per evaluation), flushed as written.

    On resume from step ``k`` the records after ``k`` (written after the last checkpoint, before
    the run died) are dropped, so the resumed run continues the same curve without duplicates.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, mirror=None):
        self.path = Path(path)
        self.mirror = mirror  # an experiment tracker (opd_bench.trackers) that sees every record too
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if lines and not _parses(lines[-1]):  # the record being written when the run was killed
                lines.pop()
            records = parse_json_lines(lines, self.path, fix=retrain_hint(self.path.parent))
            kept = [line for line, record in zip(lines, records) if record["step"] <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())  # a kill here keeps the old log
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self.mirror is not None:
            self.mirror.log(record)

    def sync(self) -> None:
        """Flush the records to the disk (before a checkpoint that resumes after them)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        mirror, self.mirror = self.mirror, None  # closed once, also when an error closes it again
        if mirror is not None:
            mirror.close()


def return_freed_memory() -> None:
    """Give memory that Python and torch have freed back to the operating system.

    Between the cells of a run, glibc keeps freed tensor buffers in its heap and RSS rises by about
    25 MB per training cell although live tensors grow by under 1 MB (measured in
    docs/benchmarks.md); ``malloc_trim`` returns them. A no-op where libc has no ``malloc_trim``.
    """
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None; looked up once (``find_library`` runs ``ldconfig``)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without it)
        return None


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def read_metrics(path: str | Path) -> list[dict]:
    """A training run's records; a damaged file names its run folder, which must be trained again."""
    return read_json_lines(path, fix=retrain_hint(Path(path).parent))


def retrain_hint(run_dir: str | Path) -> str:
    """The fix for a damaged file of a training run: train that run again (its files belong together)."""
    return f"delete {run_dir} and rerun the command to train that run again, or pass --force to start over"


class GradVariance:
    """Trace of the covariance of per-micro-batch gradients, from the accumulating ``.grad``.

    Call ``start()`` before the first backward of an optimizer step and ``record(weight)`` after
    each micro-batch's backward, ``weight`` being that micro-batch's share of its process's step
    loss (the usual accumulation: ``len(chunk) / len(pairs)``, times a task's scale). ``finish()``
    returns ``grad/variance`` and ``grad/variance_rel`` (that over the squared norm of the step's
    mean gradient). Each micro-batch's gradient divided by its weight is an estimate of the whole
    step's; their spread, each weighted by its share, is unbiased (for pairs drawn alike) for the
    covariance trace of an average-sized micro-batch's estimate (with equal shares: the plain
    unbiased trace), so a short last micro-batch does not count as if it were a full one.
    DiffusionOPD's micro-batches hold one task's pairs each, so its spread also measures how far
    the tasks' gradients disagree.

    With several processes the micro-batches of all ranks are pooled (so the statistic depends on
    how many micro-batches the step has in total, i.e. on ``micro_batch`` and the world size).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], ranks: ProcessGroup | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.ranks = ranks or distributed.current()
        # Running sums, not one gradient copy per micro-batch (a paper-preset teacher step has 216:
        # gigabytes on SD3.5, more with full_params). The sums are of d_i = e_i - e_1, each estimate
        # less this rank's first (sums of |e_i|^2 would cancel to nothing where the spread is small
        # beside the mean): with shares s_i and m = sum s_i e_i over every rank's micro-batches,
        # sum s_i |e_i - m|^2 = sum s_i |d_i|^2 - 2 (m - e_1) . sum s_i d_i + S |m - e_1|^2, S = sum s_i.
        self._start: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self._count, self._shares, self._weighted_squares = 0, 0.0, 0.0

    def _flat(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float() for p in self.params])

    def start(self) -> None:
        self._start = self._previous = self._flat()
        self._first = None
        self._count, self._shares, self._weighted_squares = 0, 0.0, 0.0

    def record(self, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"a micro-batch's weight is its share of the step loss, > 0; got {weight!r}")
        current = self._flat()
        estimate = (current - self._previous) / float(weight)  # this micro-batch's estimate of the step's gradient
        if self._first is None:
            self._first = estimate
        # Every rank's weights sum to 1 over its step, and the ranks' gradients are averaged: a
        # micro-batch's share of the global step is its weight / world size.
        share = float(weight) / self.ranks.world_size
        self._count += 1
        self._shares += share
        self._weighted_squares += share * float((estimate - self._first).pow(2).sum(dtype=torch.float64))
        self._previous = current

    def finish(self) -> dict[str, float]:
        ranks = self.ranks
        count = int(ranks.all_reduce_sum(torch.tensor(self._count)))
        if count < 2:
            return {}
        own = (self._previous - self._start) / ranks.world_size  # sum of s_i e_i over this rank's micro-batches
        mean = ranks.all_reduce_sum(own)
        first = self._first if self._first is not None else torch.zeros_like(own)
        away = (mean - first).double()
        local = (self._weighted_squares - 2 * float(away @ (own.double() - self._shares * first.double()))
                 + self._shares * float(away @ away))
        spread = max(float(ranks.all_reduce_sum(torch.tensor(local, dtype=torch.float64))), 0.0)
        squared_mean = float(mean.pow(2).sum(dtype=torch.float64))
        trace = spread * count / (count - 1)
        return {"grad/variance": trace, "grad/variance_rel": trace / max(squared_mean, 1e-30)}


def add_student(policy, adapter: str, config, *, reuse: bool = False) -> list[torch.nn.Parameter]:
    """Create the trained adapter (LoRA, or a full copy with ``config.full_params``); return its
    parameters. ``config`` has ``lora_rank``, ``lora_alpha``, ``full_params``, ``seed``. An adapter of
    that name already on ``policy`` is trained on only with ``reuse`` (the cascade's next stage):
    otherwise it is another trainer's, and a student would start from its weights."""
    if adapter in policy.adapters and not reuse:
        raise ValueError(f"the policy already has an adapter {adapter!r} (another trainer's on this policy?); "
                         "give this trainer another adapter=... or a fresh Policy")
    if adapter not in policy.adapters:
        if config.full_params:
            policy.add_full_copy(adapter)
        else:
            policy.add_adapter(adapter, rank=config.lora_rank, alpha=config.lora_alpha, seed=config.seed)
    return policy.parameters(adapter)


LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = get_args(LRSchedule)


def check_fields(kind: str, config, rules: dict[str, tuple[bool, str]]) -> None:
    """One ``ValueError`` naming every field of ``config`` whose rule fails, its value and what it
    needs: ``rules`` maps a field to (holds, "> 0")."""
    bad = [f"{name}={getattr(config, name)!r} (needs {need})" for name, (holds, need) in rules.items() if not holds]
    if bad:
        raise ValueError(f"invalid {kind} value(s): {', '.join(bad)}")


_NUMBER_TYPES = {"int": (int,), "float": (int, float), "int | None": (int, type(None)), "float | None": (int, float, type(None))}


@functools.lru_cache(maxsize=None)
def _choices(config_type: type) -> dict[str, tuple]:
    """The allowed values of ``config_type``'s ``Literal`` fields (``adv_std``, ``weighting``, ...)."""
    try:
        hints = typing.get_type_hints(config_type)
    except NameError:  # an annotation only a type checker resolves: check what can be resolved
        return {}
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is typing.Literal}


def check_field_types(kind: str, config) -> None:
    """One ``ValueError`` naming every field of the dataclass ``config`` holding another type or
    value: number fields (``lr="1e-3"`` failed inside a comparison; ``steps=2.5`` at the first
    step; ``lr=Infinity`` would reach the optimizer and ``run.json``) and ``Literal`` fields
    (``adv_std="grp"`` failed only at the first training step). Call it before the rules, which compare."""
    import dataclasses

    bad = []
    choices = _choices(type(config))
    for f in dataclasses.fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        allowed = _NUMBER_TYPES.get(annotation)
        value = getattr(config, f.name)
        if allowed is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
            bad.append(f"{f.name}={value!r} (needs {'a whole number' if annotation.startswith('int') else 'a number'})")
        elif allowed is not None and isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{f.name}={value!r} (needs a finite number)")
        elif f.name in choices and value not in choices[f.name]:
            bad.append(f"{f.name}={value!r} (needs one of {', '.join(repr(c) for c in choices[f.name])})")
    if bad:
        raise ValueError(f"invalid {kind} value(s): {', '.join(bad)}")


def check_reward_names(field_name: str, named: Mapping[str, Any], known: Iterable[str], what: str = "rewards") -> None:
    """A config's per-task mapping (``reward_weights``, ``teacher_guidance``) naming a task the
    trainer was not given: a misspelt key would be ignored without a word."""
    from opd_bench.registry import did_you_mean

    known = sorted(known)
    unknown = sorted(set(named) - set(known))
    if unknown:
        raise ValueError(f"{field_name} names {unknown[0]!r}, which is not one of the trainer's {what} "
                         f"({', '.join(known) or 'none'}).{did_you_mean(unknown[0], known)}")


def shared_rules(config) -> dict[str, tuple[bool, str]]:
    """The rules of the fields every trainer's config has (``check_fields``'s form)."""
    return {
        "lora_alpha": (config.lora_alpha > 0, "> 0: LoRA's update is scaled by alpha / rank"),
        "max_grad_norm": (config.max_grad_norm > 0, "> 0: a negative bound reverses the update"),
        "weight_decay": (config.weight_decay >= 0, ">= 0"), "guidance_scale": (config.guidance_scale >= 0, ">= 0"),
        "eval_every": (config.eval_every >= 0, ">= 0 (0: only the final evaluation)"), "checkpoint_every": (config.checkpoint_every >= 0, ">= 0 (0: never)"),
    }


def scheduled_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``.

    ``constant``: ``lr`` throughout. ``cosine``: half a cosine from ``lr`` at the first step towards
    0 after the last, so the final steps land with small updates instead of Adam's full-size noise.
    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose from {list(LR_SCHEDULES)}")


def student_optimizer(policy, adapter: str, config, *, reuse: bool = False) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, "EMA | None"]:
    """The trained parameters, their AdamW and (if ``config.ema``) their EMA, as every trainer uses them."""
    params = add_student(policy, adapter, config, reuse=reuse)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return params, optimizer, EMA(params, config.ema) if config.ema else None


class EMA:
    """Exponential moving average of trainable parameters, swapped in for evaluation."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for shadow, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(shadow)
            shadow.copy_(tmp)

    def state_dict(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.shadow]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        for shadow, value in zip(self.shadow, state):
            shadow.copy_(value)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(folder: str | Path, *, params: Sequence[torch.nn.Parameter], optimizer, ema: EMA | None, state: dict) -> None:
    """Write the trainable weights, optimizer, EMA, RNG and ``state`` (step, counters) atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "params": [p.detach().cpu().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
        },
        tmp / "training_state.pt",
    )
    atomic_write_json(tmp / "state.json", state)
    sync_folder(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder: str | Path) -> None:
    """Put back a checkpoint left aside by a kill between ``save_checkpoint``'s two renames.

    Then only ``.tmp`` (the newer one, complete once its ``state.json`` exists) and ``.old`` are
    there, and a resume would otherwise start again from step 0.
    """
    folder = Path(folder)
    if folder.exists():
        return
    for candidate in (folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        if (candidate / "state.json").exists() and (candidate / "training_state.pt").exists():
            os.replace(candidate, folder)
            return


def load_checkpoint(folder: str | Path, *, params: Sequence[torch.nn.Parameter], optimizer, ema: EMA | None) -> dict:
    folder = Path(folder)
    payload = torch.load(folder / "training_state.pt", weights_only=False)
    with torch.no_grad():
        for p, value in zip(params, payload["params"], strict=True):
            p.copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    if ema is not None and payload["ema"] is not None:
        ema.load_state_dict(payload["ema"])
    set_rng_state(payload["rng"])
    return read_json(folder / "state.json", fix=retrain_hint(folder.parent))


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, stream): resumed runs redraw the same."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def training_data(prompts: Sequence, rewards: Iterable[str] = ()) -> dict:
    """What a run trains on, for its saved config: the prompt pool's size and digest and the reward
    names, so that resuming a folder with other prompts or rewards is refused like another config."""
    text = json.dumps([[p.text, p.metadata] for p in prompts], sort_keys=True, default=str)
    return {"prompts": len(prompts), "prompts_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "rewards": sorted(rewards)}


def config_differences(saved: Any, config: dict) -> str | None:
    """How a run folder's saved ``config.json`` differs from the ``config`` a trainer would record
    now (None: the same run). A folder saved before configs recorded their ``data`` is compared
    without it, so runs made before the record resume as before."""
    current = without_later_settings(json.loads(json.dumps(config, default=str)))
    saved = without_later_settings(saved)
    if isinstance(saved, dict) and "data" not in saved:
        current.pop("data", None)
    return None if saved == current else json_differences(saved, current)


def _teachers_as_recorded_now(saved: Any, config: dict, run_dir: Path) -> Any:
    """A saved OPD config whose teachers were recorded as typed (before they were recorded relative to
    the run folder) compares by the folders they name, so such a run resumes as before."""
    if not (isinstance(saved, dict) and isinstance(saved.get("teachers"), dict) and isinstance(config.get("teachers"), dict)):
        return saved
    teachers = dict(saved["teachers"])
    for task, recorded in teachers.items():
        now = config["teachers"].get(task)
        if isinstance(recorded, str) and isinstance(now, str) and Path(recorded).resolve() == (run_dir / now).resolve():
            teachers[task] = now
    return {**saved, "teachers": teachers}


def sample_prompts(pool: Sequence, count: int, seed: int) -> list:
    """``count`` prompts drawn without replacement (with, if the pool is smaller), reproducibly."""
    rng = np.random.default_rng(seed)
    index = rng.choice(len(pool), size=count, replace=len(pool) < count)
    return [pool[int(i)] for i in index]


class Timer:
    def __init__(self, elapsed: float = 0.0):
        self._start = time.time() - elapsed

    @property
    def elapsed(self) -> float:
        return time.time() - self._start


class TrainingRun:
    """What happens around every trainer's step: resume, logging, compute, eval, checkpoints.

    ``run_dir`` holds ``config.json``, ``metrics.jsonl``, ``checkpoint/`` while it trains and, when
    done, ``final/`` (the trained adapter) and ``DONE`` instead of the checkpoint (nothing resumes a
    finished run). A finished run is never overwritten: the trainer
    refuses to start unless ``overwrite`` is set.

    With several processes (``opd_bench.distributed``) only rank 0 reads and writes ``run_dir``
    and evaluates; the other ranks get its decision (or its error) and its starting state by
    broadcast, so every rank starts from the same weights, optimizer state and step.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: dict,
        policy,
        adapter: str,
        params: Sequence[torch.nn.Parameter],
        optimizer,
        ema: EMA | None,
        teachers: Sequence[str] = (),
        evaluate=None,
        eval_every: int = 0,
        checkpoint_every: int = 0,
        overwrite: bool = False,
        ranks: ProcessGroup | None = None,
    ):
        self.dir = Path(run_dir)
        self.policy, self.adapter, self.params = policy, adapter, list(params)
        self.optimizer, self.ema, self.teachers = optimizer, ema, list(teachers)
        self.evaluate, self.eval_every, self.checkpoint_every = evaluate, eval_every, checkpoint_every
        self.ranks = ranks or distributed.current()
        self.log: MetricsLog | None = None  # rank 0's only
        setup = self.ranks.run_on_main(lambda: self._open(config, overwrite))
        self.start_step, self.counters = setup["step"], setup["counters"]
        if self.ranks.distributed:
            self._share_start(resumed=setup["resumed"])
        self.timer = Timer(setup["elapsed"])
        self._counts_seen = dict(policy.forward_counts)

    def _open(self, config: dict, overwrite: bool) -> dict:
        """Rank 0: check the folder, resume from its checkpoint or start it; returns the start."""
        if (self.dir / "DONE").exists() and not overwrite:
            raise FileExistsError(f"{self.dir} holds a finished run; use another folder or pass overwrite/--force")
        config_path = self.dir / "config.json"
        checkpoint = self.dir / "checkpoint"
        recover_checkpoint(checkpoint)
        if checkpoint.exists() and not overwrite:
            saved = read_json(config_path, fix=retrain_hint(self.dir)) if config_path.exists() else None
            differences = config_differences(_teachers_as_recorded_now(saved, config, self.dir), config)
            if differences:
                raise ValueError(f"{self.dir} holds a run with a different config ({differences}); "
                                 "use another folder or pass overwrite/--force")
            state = load_checkpoint(checkpoint, params=self.params, optimizer=self.optimizer, ema=self.ema)
            self._say_if_arithmetic_differs(state)
            self.log = MetricsLog(self.dir / "metrics.jsonl", resume_step=state["step"],
                                  mirror=trackers.open_for(self.dir, config, resume_step=state["step"]))
            return {"step": state["step"], "counters": state["counters"], "elapsed": state["elapsed"], "resumed": True}
        if overwrite:
            shutil.rmtree(checkpoint, ignore_errors=True)
            (self.dir / "DONE").unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, json.loads(json.dumps(config, default=str)))
        self.log = MetricsLog(self.dir / "metrics.jsonl", mirror=trackers.open_for(self.dir, config, resume_step=None))
        counters = {"student_forwards": 0, "teacher_forwards": 0, "reference_forwards": 0, "images": 0}
        return {"step": 0, "counters": counters, "elapsed": 0.0, "resumed": False}

    def _say_if_arithmetic_differs(self, state: dict) -> None:
        """A resume whose float arithmetic runs in another order than the checkpoint's goes on, saying
        that its numbers will not equal an uninterrupted run's to the bit, and what keeps them."""
        def say(now: str, then: str, keep: str) -> None:
            print(f"opd-bench: resuming {self.dir} {now} where it ran {then}: it goes on, but its numbers will not equal "
                  f"an uninterrupted run's to the bit ({keep} keeps them)", file=sys.stderr)

        threads = state.get("threads")
        # on a CPU the float sums run in another order (a GPU's kernels do not follow the thread count)
        if threads is not None and threads != torch.get_num_threads() and self.policy.device.type == "cpu":
            say(f"on {torch.get_num_threads()} torch threads", f"on {threads}", f"--threads {threads}")
        batch, now = state.get("max_batch"), getattr(self.policy, "max_batch", None)
        if "max_batch" in state and batch != now:  # chunked forwards round differently

            def shown(value):
                return "no --max-batch" if value is None else f"--max-batch {value}"

            say(f"with {shown(now)}", f"with {shown(batch)}", shown(batch))

    def _share_start(self, resumed: bool) -> None:
        """Give every rank rank 0's weights and, on resume, its optimizer, EMA and RNG state."""
        self.ranks.broadcast_parameters(self.params)
        if not resumed:
            if self.ema is not None:  # the EMA was created from the weights before the broadcast
                self.ema.load_state_dict([p.detach() for p in self.params])
            return
        state = None
        if self.ranks.is_main:
            state = _to_cpu({"optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict() if self.ema else None, "rng": rng_state()})
        state = self.ranks.broadcast_object(state)
        if not self.ranks.is_main:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            set_rng_state(state["rng"])

    def _absorb_counts(self, images: int = 0) -> None:
        """Add the forward passes (and ``images``) since the last call, summed over ranks, to the counters."""
        counts = self.policy.forward_counts
        delta = {"student_forwards": 0, "teacher_forwards": 0, "reference_forwards": 0, "images": images}
        for key, value in counts.items():
            change = value - self._counts_seen.get(key, 0)
            if key == self.adapter:
                delta["student_forwards"] += change
            elif key is None:
                delta["reference_forwards"] += change
            elif key in self.teachers:
                delta["teacher_forwards"] += change
        self._counts_seen = dict(counts)
        totals = self.ranks.all_reduce_sum(torch.tensor(list(delta.values()), dtype=torch.long)).tolist()
        for key, value in zip(delta, totals):
            self.counters[key] += value

    def train(
        self, step_fn, *, steps: int, max_grad_norm: float, grad_variance: GradVariance, desc: str,
        lr: float, lr_schedule: str = "constant", progress: bool = True,
    ) -> Path:
        """The loop every trainer shares around its ``step_fn(step) -> (metrics, images)``.

        ``step_fn`` accumulates gradients into ``.grad`` (recording micro-batches in
        ``grad_variance``) and returns metrics that are already global (equal on every rank) and
        the number of images this rank sampled; this averages the gradients over ranks, clips,
        steps the optimizer and the EMA, logs, evaluates and checkpoints, and finally saves the
        adapter.
        """
        try:
            return self._train(step_fn, steps=steps, max_grad_norm=max_grad_norm, grad_variance=grad_variance,
                               desc=desc, lr=lr, lr_schedule=lr_schedule, progress=progress)
        except BaseException:
            if self.log is not None:  # the trackers too: a W&B run left open would take the next cell's metrics
                self.log.close()
            raise

    def _train(self, step_fn, *, steps, max_grad_norm, grad_variance, desc, lr, lr_schedule, progress) -> Path:
        from tqdm import tqdm

        if self.start_step == 0 and self.evaluate is not None and self.eval_every:
            self.run_eval(0)
        # `with`: closed on an error too, so the error's message starts a line of its own
        with tqdm(total=steps, initial=self.start_step, desc=desc, disable=not progress or not self.ranks.is_main) as bar:
            for step in range(self.start_step, steps):
                self.optimizer.zero_grad(set_to_none=True)
                grad_variance.start()
                metrics, images = step_fn(step)
                self.ranks.average_gradients(self.params)  # identical updates keep the ranks' weights identical
                metrics.update(grad_variance.finish())
                metrics["grad/norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm))
                if not math.isfinite(metrics["grad/norm"]):  # stepping would write NaN into every weight and checkpoint
                    raise FloatingPointError(
                        f"step {step + 1}: the gradient is not finite (loss {metrics.get('loss', float('nan')):.4g}); nothing was "
                        f"stepped, and the checkpoint in {self.dir / 'checkpoint'} (if any) is intact; look for an infinite "
                        "or NaN reward or a learning rate too large")
                metrics["lr"] = scheduled_lr(lr, lr_schedule, step, steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = metrics["lr"]
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
                self.end_step(step + 1, metrics, images)
                bar.update()
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k == "kl" or k.endswith("/mean")})
        return self.finish(steps)

    def end_step(self, step: int, metrics: dict, images: int) -> None:
        """Record step ``step`` (1-based count of optimizer steps done), then eval / checkpoint."""
        self._absorb_counts(images)
        if self.log is not None:
            self.log.write({"step": step, "wall_seconds": round(self.timer.elapsed, 3), **self.counters, **metrics})
        if self.evaluate is not None and self.eval_every and step % self.eval_every == 0:
            self.run_eval(step)
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            self.checkpoint(step)

    def run_eval(self, step: int) -> dict | None:
        """Evaluate on rank 0 (the others go on and wait for it in the next collective)."""
        if not self.ranks.is_main:
            return None
        if self.ema is not None:
            self.ema.swap()
        try:
            with self.policy.use(self.adapter):
                scores = self.evaluate(self.policy)
        finally:
            if self.ema is not None:
                self.ema.swap()
        self._counts_seen = dict(self.policy.forward_counts)  # evaluation is not training compute
        self.log.write({"step": step, "wall_seconds": round(self.timer.elapsed, 3), **self.counters, **{f"eval/{k}": v for k, v in scores.items()}})
        return scores

    def checkpoint(self, step: int) -> None:
        if not self.ranks.is_main:
            return
        self.log.sync()  # the curve up to ``step`` must outlast an OS crash if the checkpoint does
        save_checkpoint(
            self.dir / "checkpoint", params=self.params, optimizer=self.optimizer, ema=self.ema,
            state={"step": step, "counters": self.counters, "elapsed": self.timer.elapsed, "threads": torch.get_num_threads(),
                   "max_batch": getattr(self.policy, "max_batch", None)},
        )

    def finish(self, step: int) -> Path:
        """Evaluate, checkpoint, save the final adapter (EMA weights if any), mark the run done.

        Rank 0 does all of it; every rank returns once the adapter and ``DONE`` are written, so
        that what comes next (a teacher loaded by OPD, the next cascade stage) finds them.
        """
        final = self.dir / "final"
        if self.ranks.is_main:
            scores = None
            if self.evaluate is not None:
                done = [r for r in read_metrics(self.dir / "metrics.jsonl") if r["step"] == step and any(k.startswith("eval/") for k in r)]
                scores = {k[5:]: v for k, v in done[-1].items() if k.startswith("eval/")} if done else self.run_eval(step)
            self.checkpoint(step)
            if self.ema is not None:
                self.ema.swap()
            final = self.policy.save_adapter(self.adapter, final)
            if self.ema is not None:
                self.ema.swap()
            sync_folder(final)
            atomic_write_json(
                self.dir / "DONE", {"step": step, "counters": self.counters, "wall_seconds": self.timer.elapsed, "scores": scores}
            )
            # nothing resumes a finished run: its optimizer state (several times the adapter, and
            # GBs per cell with full_params) would only fill the disk
            for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
                shutil.rmtree(self.dir / name, ignore_errors=True)
            self.log.close()
        self.ranks.barrier()
        return final


def _to_cpu(value):
    """``value`` with every tensor in it moved to the CPU (for broadcasting it as an object)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
