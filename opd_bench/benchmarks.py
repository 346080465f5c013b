"""Declarative, versioned benchmark specs and their registry, plus the prompt-file reader and the
``Prompt`` it reads into (torch-free, as listing suites and benchmarks must be).

A benchmark is data, not code: a name, a suite, a version, prompt files in JSON lines, the reward
that scores it, the metric that aggregates the scores, and how many images each prompt gets.
Specs are registered as ``"<suite>/<name>"`` (``opd_bench.benchmarks.get("tiny/geneval")``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from opd_bench.registry import Registry

PACKAGE_DIR = Path(__file__).resolve().parent
METRICS = ("mean", "geneval")


@dataclass
class Prompt:
    """A prompt's text, its task and its record (what the rewards read). Here, not in ``rollout``
    (which re-exports it): the specs that read prompt files are then imported without torch."""

    text: str
    task: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # rewards see metadata only: the per-task reward routes on metadata["task"], which prompt files carry
        if self.task and "task" not in self.metadata:
            self.metadata = {**self.metadata, "task": self.task}

    @classmethod
    def coerce(cls, value: "Prompt | str | dict") -> "Prompt":
        if isinstance(value, Prompt):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and "prompt" in value:
            return cls(value["prompt"], value.get("task", ""), dict(value))
        raise TypeError(f"a prompt must be a Prompt, a string or a record with 'prompt', got {value!r}")


class PromptFileError(ValueError):
    """A prompt file that is missing or has a bad line; the message names the file and line."""


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # the task name, shared across suites: "geneval", "ocr", "pref"
    suite: str
    version: str
    test_file: str  # JSON lines; relative paths are inside the package
    reward: str  # registered reward used for evaluation
    reward_options: dict[str, Any] = field(default_factory=dict)
    train_file: str | None = None
    train_reward: str | None = None  # e.g. a partial-credit reward; defaults to ``reward``
    train_reward_options: dict[str, Any] | None = None
    metric: str = "mean"  # "mean" of scores, or "geneval": mean of per-tag accuracies
    images_per_prompt: int = 4
    required_fields: tuple[str, ...] = ("prompt",)
    # Further evaluation-only scores reported beside the main one, e.g. {"pref_oracle": "tiny/pref-oracle"}.
    extra_rewards: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"benchmark {self.key}: metric must be one of {METRICS}, got {self.metric!r}")
        if self.images_per_prompt < 1:
            raise ValueError(f"benchmark {self.key}: images_per_prompt must be >= 1")

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"

    def path(self, split: str = "test") -> Path:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        file = self.test_file if split == "test" else self.train_file
        if file is None:
            raise PromptFileError(f"benchmark {self.key} has no {split} prompt file")
        path = Path(file)
        return path if path.is_absolute() else PACKAGE_DIR / path

    def prompts(self, split: str = "test", limit: int | None = None) -> list[Prompt]:
        """The prompts of ``split``; ``limit`` takes that many, spread over the tags (see
        ``select_prompts``), so a subset of GenEval's file covers every tag."""
        prompts = read_prompts(self.path(split), task=self.name, required=self.required_fields)
        if self.metric == "geneval":
            check_geneval_records(self.path(split), prompts)
        return select_prompts(prompts, limit)

    def file_hash(self, split: str = "test") -> str:
        return sha256_file(self.path(split))

    def reward_of(self, split: str = "test") -> tuple[str, dict[str, Any]]:
        """The registered name and options of the reward that scores ``split``'s prompts."""
        if split == "train" and self.train_reward:
            return self.train_reward, dict(self.train_reward_options or {})
        return self.reward, dict(self.reward_options)

    def build_reward(self, split: str = "test"):
        from opd_bench import rewards

        name, options = self.reward_of(split)
        return rewards.get(name, **options)

    def locate_weights(self, *, train: bool = False) -> None:
        """Find the weight files of the evaluation's rewards (the main score and the extra ones) and,
        with ``train``, of the training reward, without loading them: a missing file stops a run or
        evaluation before its first image."""
        from opd_bench import rewards

        used = [self.reward_of("test"), *((name, {}) for name in self.extra_rewards.values())]
        if train and self.reward_of("train") not in used:
            used.append(self.reward_of("train"))
        for name, options in used:
            rewards.locate_weights(name, options)


class PromptSubset:
    """A spec's view whose prompts are those ``keep`` accepts, e.g. one GenEval tag or one text length
    (the probes in ``benchmarks/``); everything else (reward, metric, name) is the spec's own.
    ``limit`` takes the first that many of the kept prompts, in file order."""

    def __init__(self, spec: BenchmarkSpec, keep: Callable[[Prompt], bool]):
        self.spec, self.keep = spec, keep

    def __getattr__(self, name: str):
        return getattr(self.spec, name)

    def prompts(self, split: str = "test", limit: int | None = None) -> list[Prompt]:
        kept = [p for p in self.spec.prompts(split) if self.keep(p)]
        return kept[:limit] if limit else kept


def select_prompts(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """``limit`` prompts stratified by their ``"tag"`` metadata, in file order (all when None).

    The tags take turns (in order of first appearance) until ``limit`` are chosen, so every tag
    is covered when ``limit`` >= the number of tags and the counts differ by at most one where
    every tag has enough prompts; within a tag the chosen prompts are evenly spaced. Prompts
    without tags form one group: evenly spaced over the file.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    groups: dict[Any, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.metadata.get("tag"), []).append(index)
    quota = dict.fromkeys(groups, 0)
    while sum(quota.values()) < limit:
        for tag, members in groups.items():
            if quota[tag] < len(members) and sum(quota.values()) < limit:
                quota[tag] += 1
    chosen = [members[i * len(members) // quota[tag]] for tag, members in groups.items() for i in range(quota[tag])]
    return [prompts[index] for index in sorted(chosen)]


def check_geneval_records(path: Path, prompts: Sequence[Prompt]) -> None:
    """Every GenEval record readable by the rules, before any image is drawn (a malformed one
    would fail while scoring, or score 0 on every image)."""
    from opd_bench.geneval import record_problem

    for prompt in prompts:
        problem = record_problem(prompt.metadata)
        if problem:
            raise PromptFileError(f"{path}: prompt {prompt.text!r}: {problem}")


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_prompts(
    path: str | Path,
    *,
    task: str = "",
    required: Sequence[str] = ("prompt",),
    limit: int | None = None,
) -> list[Prompt]:
    """Read a JSON-lines prompt file; every bad line is reported with its number and the fix."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist; check the path or the benchmark spec")
    lines = read_text_lines(path)
    if "".join(lines).lstrip().startswith("["):
        raise PromptFileError(f"{path} is a JSON array; a prompt file holds one JSON object per line (JSON lines): "
                              "write each element on a line of its own")
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(
                f"{path}:{number}: not valid JSON ({error.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise PromptFileError(f"{path}:{number}: missing field(s) {missing}; add them or fix the line")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise PromptFileError(f"{path}:{number}: 'prompt' must be a non-empty string")
        record.setdefault("task", task)
        if task and record["task"] != task:  # the per-task reward routes on it
            raise PromptFileError(f"{path}:{number}: 'task' is {record['task']!r} in a {task} prompt file; "
                                  f"drop the field or write {task!r}")
        for key in ("tag", "text"):  # read as strings (tags group prompts, OCR compares the text)
            if key in record and not isinstance(record[key], str):
                raise PromptFileError(f"{path}:{number}: {key!r} must be a string, got {record[key]!r}")
        prompts.append(Prompt(record["prompt"], record["task"], record))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def read_text_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file; a file in another encoding is a ``PromptFileError`` naming it."""
    path = Path(path)
    try:
        # split("\n"), not splitlines(): a JSON string may hold a raw U+2028, which splitlines breaks at.
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the first prompt
        return path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PromptFileError(
            f"{path}:{line}: not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "save the prompt file as UTF-8"
        ) from None


def aggregate(metric: str, scores: Sequence[float], metadata: Sequence[dict]) -> dict[str, Any]:
    """Aggregate per-image scores into ``{"score": x, ...}`` (NaN scores are skipped)."""
    pairs = [(float(s), m) for s, m in zip(scores, metadata) if not math.isnan(float(s))]
    if not pairs:
        return {"score": math.nan, "count": 0}
    if metric == "mean":
        return {"score": sum(s for s, _ in pairs) / len(pairs), "count": len(pairs)}
    if metric == "geneval":
        by_tag: dict[str, list[float]] = {}
        for score, meta in pairs:
            by_tag.setdefault(meta.get("tag", "untagged"), []).append(score)
        per_tag = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items())}
        return {"score": sum(per_tag.values()) / len(per_tag), "per_tag": per_tag, "count": len(pairs)}
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


REGISTRY = Registry("benchmark")


def register(spec: BenchmarkSpec) -> None:
    REGISTRY.register(spec.key, spec, spec.description)


def get(key: str) -> BenchmarkSpec:
    """The spec registered as ``"<suite>/<name>"``."""
    return REGISTRY.resolve(key)


def names(suite: str | None = None) -> list[str]:
    return [n for n in REGISTRY.names() if suite is None or n.startswith(f"{suite}/")]
