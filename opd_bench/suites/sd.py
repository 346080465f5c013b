"""The ``sd`` suite: GenEval, OCR and PickScore for real SD3 / SD3.5 pipelines.

Same benchmark names as ``tiny`` (``geneval``, ``ocr``, ``pref``); prompt files and weights are
the user's, named in one small JSON configuration, one section per benchmark::

    {
      "device": "cuda",
      "geneval": {"test": "geneval/prompts/evaluation_metadata.jsonl",
                  "model_path": "/weights/owlv2", "clip_model_path": "/weights/clip-vit-l-14"},
      "ocr":     {"test": "flow_grpo/dataset/ocr/test.txt"},
      "pref":    {"test": "flow_grpo/dataset/pickscore/test.txt",
                  "pickscore": {"model_path": "/weights/PickScore_v1", "processor_path": "/weights/CLIP-ViT-H-14"}}
    }

In a section, ``test`` / ``train`` are prompt files (relative to the config file, as are relative
weight paths that exist there), ``reward`` / ``train_reward`` replace the default reward (a name
or ``[name, {options}]``, e.g. ``["remote", {"url": ...}]``), and every other key is an option of
the default reward (``pref``: one options dict per reward name; ``pickscore`` is scored, ``hpsv2``
/ ``clipscore`` / ``imagereward`` are reported beside it when given). Where ``reward`` replaces the
default, those keys serve the default rewards left (geneval's training reward, pref's extras); a
key that none is left to read is refused. ``device`` is added to the options of the geneval and
pref rewards. An optional top-level ``resolution`` (pixels) replaces the suite's 512 px image side,
e.g. for small test pipelines; leave it out for comparable numbers. An optional ``guidance_scale``
replaces the evaluation sampler's 4.5 (FLUX.1-dev's distilled guidance is usually 3.5).

Give it with ``OPD_SD_CONFIG=/path/sd.json`` (read when a benchmark is first needed, so the CLI
works unchanged) or ``opd_bench.suites.configure("sd", path_or_dict, **sections)``. See
``docs/sd_suite.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from opd_bench.benchmarks import (
    BenchmarkSpec, Prompt, PromptFileError, check_geneval_records, read_prompts, read_text_lines, select_prompts,
)
from opd_bench.registry import UnknownNameError, did_you_mean
from opd_bench.suites import Suite

CONFIG_ENV = "OPD_SD_CONFIG"
TOP_KEYS = ("device", "resolution", "guidance_scale")
VERSION = "sd-v1"
TASKS = ("geneval", "ocr", "pref")
PREF_EXTRAS = ("hpsv2", "clipscore", "imagereward")
FILE_KEYS = ("test", "train")
SPEC_KEYS = FILE_KEYS + ("reward", "train_reward")
WHERE = {
    "geneval": "GenEval's prompts/evaluation_metadata.jsonl (553 prompts) from https://github.com/djghosh13/geneval",
    "ocr": "a prompt file with the text in double quotes, e.g. Flow-GRPO's dataset/ocr/test.txt (https://github.com/yifan123/flow_grpo)",
    "pref": "a prompt file, e.g. Flow-GRPO's dataset/pickscore/test.txt (https://github.com/yifan123/flow_grpo)",
}


WHERE_TRAIN = {
    "geneval": "GenEval-style metadata lines, e.g. Flow-GRPO's dataset/geneval/train_metadata.jsonl (https://github.com/yifan123/flow_grpo)",
    "ocr": "a prompt file with the text in double quotes, e.g. Flow-GRPO's dataset/ocr/train.txt (https://github.com/yifan123/flow_grpo)",
    "pref": "a prompt file, e.g. Flow-GRPO's dataset/pickscore/train.txt (https://github.com/yifan123/flow_grpo)",
}


def _where(task: str, split: str) -> str:
    return (WHERE if split == "test" else WHERE_TRAIN)[task]


class SuiteConfigError(ValueError):
    """A missing or malformed entry of the sd suite's configuration; the message says what to give."""


# ---------------------------------------------------------------------------------------------
# configuration

_CONFIG: dict[str, Any] | None = None  # None: read OPD_SD_CONFIG when first needed


def load_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """A configuration from a dict or a JSON file; prompt files of a file are made relative to it."""
    base = Path.cwd()
    if not isinstance(source, dict):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SuiteConfigError(f"sd suite config {str(path)!r} does not exist (given as {CONFIG_ENV} or to configure())")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise SuiteConfigError(f"sd suite config {path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(source, dict):
            raise SuiteConfigError(f"sd suite config {path}: expected a JSON object with sections {list(TASKS)}")
        base = path.resolve().parent
    unknown = sorted(set(source) - set(TASKS) - set(TOP_KEYS))
    if unknown:
        raise SuiteConfigError(f"sd suite config: unknown key(s) {unknown}.{did_you_mean(unknown[0], [*TASKS, *TOP_KEYS])} "
                               f"Expected {', '.join(map(repr, TOP_KEYS))} and sections {list(TASKS)}")
    guidance = source.get("guidance_scale")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 < guidance < math.inf):
        raise SuiteConfigError(f"sd suite config: guidance_scale must be a positive number, e.g. 3.5 for FLUX.1-dev, got {guidance!r}")
    resolution = source.get("resolution")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0
                                   or resolution % 8):
        raise SuiteConfigError(f"sd suite config: resolution must be an image side in pixels, a multiple of 8 (16 for "
                               f"SD3.5 and FLUX), e.g. 512, got {resolution!r}")
    device = source.get("device")
    if device is not None:
        import torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise SuiteConfigError(f"sd suite config: device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    config: dict[str, Any] = {"device": device, "resolution": resolution, "guidance_scale": guidance}
    for task in TASKS:
        if not isinstance(source.get(task) or {}, dict):
            raise SuiteConfigError(f"sd suite config: section {task!r} must be an object like {{\"test\": FILE, ...}}")
        section = _weights_next_to(dict(source.get(task) or {}), base)
        for key in FILE_KEYS:
            if section.get(key) is not None and not isinstance(section[key], str):
                raise SuiteConfigError(f"sd suite config: {task}.{key} must be a prompt file's path (a string), "
                                       f"got {section[key]!r}; get {_where(task, key)}")
            if section.get(key):
                section[key] = str(base / Path(section[key]).expanduser())
        config[task] = section
    return config


def _weights_next_to(options: dict, base: Path) -> dict:
    """Relative weight paths (``*_path`` options) as a config file's prompt files are: next to
    the file, when it or its folder is there (a missing folder is then named where it was looked
    for). Another is kept as given (the working directory's, or a hub id such as ``org/name``)."""
    resolved = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = _weights_next_to(value, base)
        elif key.endswith("_path") and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            candidate = base / Path(value).expanduser()
            value = str(candidate) if candidate.exists() or (candidate.parent != base and candidate.parent.is_dir()) else value
        resolved[key] = value
    return resolved


def configure(config: str | os.PathLike | dict | None = None, **sections: Any) -> None:
    """Set the whole sd configuration: a dict or JSON file, then ``sections`` (``geneval={...}``)
    replacing those sections. ``configure()`` with nothing clears it (the env var is then ignored)."""
    global _CONFIG
    loaded = load_config({} if config is None else config)
    loaded.update({key: value for key, value in load_config(sections).items() if key in sections})
    _CONFIG = loaded


def current_config() -> dict[str, Any]:
    global _CONFIG
    if _CONFIG is None:
        path = os.environ.get(CONFIG_ENV)
        _CONFIG = load_config(path) if path else load_config({})
    return _CONFIG


def _reward_spec(value: Any, where: str) -> tuple[str, dict]:
    """``"name"`` or ``[name, {options}]`` -> (name, options)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
        return value[0], dict(value[1])
    raise SuiteConfigError(f"sd suite config: {where} must be a reward name or [name, {{options}}], got {value!r}")


def _with_device(options: dict, config: dict) -> dict:
    if config.get("device") and "device" not in options:
        options = {**options, "device": config["device"]}
    return options


def _pref_options(config: dict, name: str) -> dict | None:
    options = config["pref"].get(name)
    if options is None:
        return None
    if not isinstance(options, dict):
        raise SuiteConfigError(f"sd suite config: pref.{name} must be the options of the {name!r} reward, e.g. {{\"model_path\": DIR}}")
    return _with_device(options, config)


# ---------------------------------------------------------------------------------------------
# specs


def read_text_prompts(path: str | Path, *, task: str = "") -> list[Prompt]:
    """One prompt per non-empty line (Flow-GRPO's ``.txt`` prompt files)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist; check the path in the sd suite config")
    lines = [line.strip() for line in read_text_lines(path)]
    prompts = [Prompt(line, task, {"prompt": line, "task": task}) for line in lines if line]
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} has no prompts")
    return prompts


@dataclass(frozen=True)
class FileBenchmarkSpec(BenchmarkSpec):
    """A spec whose prompt files are JSON lines (``.jsonl`` / ``.json``) or plain text, one prompt a line."""

    quoted_text: bool = False  # every prompt must quote the text to render (OCR)

    def path(self, split: str = "test") -> Path:
        """The file of ``split``; training reads the train file, so an evaluation does without one."""
        if split == "train" and self.train_file is None:
            raise SuiteConfigError(f"benchmark sd/{self.name} has no train prompt file, which training needs: set "
                                   f"{self.name}.train in the sd suite config; get {_where(self.name, split)}")
        path = super().path(split)
        if not path.is_file():
            raise PromptFileError(f"sd/{self.name} {split} prompt file {str(path)!r} does not exist; get {_where(self.name, split)}")
        return path

    def prompts(self, split: str = "test", limit: int | None = None) -> list[Prompt]:
        path = self.path(split)
        if path.suffix in (".jsonl", ".json"):
            prompts = read_prompts(path, task=self.name, required=self.required_fields)
        elif set(self.required_fields) - {"prompt"}:  # a plain line has the prompt alone
            raise PromptFileError(f"{path}: sd/{self.name} needs JSON lines with the fields {list(self.required_fields)} "
                                  f"(a .jsonl file), not one prompt a line; get {_where(self.name, split)}")
        else:
            prompts = read_text_prompts(path, task=self.name)
        if self.name == "geneval":
            check_geneval_records(path, prompts)
        if self.quoted_text:
            from opd_bench.rewards.ocr import target_text

            for p in prompts:
                if p.metadata.get("text") is None and target_text(p.text) is None:
                    raise PromptFileError(f"{path}: prompt {p.text!r} has no text in double quotes; OCR prompts quote the text to render")
        return select_prompts(prompts, limit)  # stratified by tag, as BenchmarkSpec


def _files(task: str, section: dict) -> dict:
    if not section.get("test"):
        raise SuiteConfigError(
            f"benchmark sd/{task} needs its prompt file: set {task}.test in the sd suite config "
            f"(--suite-config FILE.json, {CONFIG_ENV}=FILE.json or suites.configure('sd', ...)); get {WHERE[task]}"
        )
    return {"test_file": section["test"], "train_file": section.get("train")}  # checked by FileBenchmarkSpec.path


# Reward options a run does not record: where the reward runs, and a remote reward's secret.
UNRECORDED_OPTIONS = ("device", "token")


def build_spec(task: str, config: dict) -> FileBenchmarkSpec:
    section = config[task]
    common = dict(name=task, suite="sd", version=VERSION, **_files(task, section))
    options = {k: v for k, v in section.items() if k not in SPEC_KEYS}
    if task == "geneval":
        reward, reward_options = "sd/geneval", _with_device(options, config)
        train_reward, train_options = "sd/geneval-partial", reward_options
        spec = dict(metric="geneval", images_per_prompt=4, required_fields=("prompt", "tag", "include"),
                    description="GenEval's 553 prompts and rules (detector backend: see the reward options)")
    elif task == "ocr":
        # whole 512 px images, as Flow-GRPO passes them to PaddleOCR (the tiny suite upscales 64 px ones)
        reward, reward_options = "ocr", {"upscale": 1, "pad": 0, **options}
        train_reward, train_options = None, None
        spec = dict(images_per_prompt=1, quoted_text=True, description="quoted-text prompts read by an OCR engine")
    else:
        extra = sorted(set(options) - {"pickscore", *PREF_EXTRAS})
        if extra:
            raise SuiteConfigError(f"sd suite config: pref has unknown key(s) {extra}."
                                   f"{did_you_mean(extra[0], ['pickscore', *PREF_EXTRAS])} Expected test, train, reward, "
                                   f"train_reward, pickscore, {', '.join(PREF_EXTRAS)}")
        reward, reward_options = "pickscore", _pref_options(config, "pickscore")
        if reward_options is None and "reward" not in section:
            raise SuiteConfigError("benchmark sd/pref needs PickScore's weights: set pref.pickscore to "
                                   "{\"model_path\": ..., \"processor_path\": ...} in the sd suite config")
        train_reward, train_options = None, None
        spec = dict(images_per_prompt=1, description="PickScore (HPSv2, CLIPScore, ImageReward beside it when configured)",
                    extra_rewards={name: f"sd/{name}" for name in PREF_EXTRAS if config["pref"].get(name) is not None})
    # every reward's options checked before anything loads
    if "reward" in section:
        reward, reward_options = _reward_spec(section["reward"], f"{task}.reward")
        _check_options(reward, reward_options, where=f"{task}.reward.")
    if "train_reward" in section:
        train_reward, train_options = _reward_spec(section["train_reward"], f"{task}.train_reward")
        _check_options(train_reward, train_options, where=f"{task}.train_reward.")
    _check_default_options(task, section, options, config)
    built = FileBenchmarkSpec(reward=reward, reward_options=reward_options or {}, train_reward=train_reward,
                              train_reward_options=train_options, **common, **spec)
    built.path("test")  # the test file exists (the train file is checked when training reads it)
    return built


# The default rewards that read a section's other keys, each with the section key that replaces it.
DEFAULT_READERS = {"geneval": (("sd/geneval", "reward"), ("sd/geneval-partial", "train_reward")),
                   "ocr": (("ocr", "reward"),), "pref": (("pickscore", "reward"),)}


def _check_default_options(task: str, section: dict, options: dict, config: dict) -> None:
    """A section's other keys (``options``) checked against the default rewards left to read them.
    A reward named in ``reward`` takes its options inside it (``[name, {options}]``): a key that
    no default reward reads any more is refused rather than dropped without a word."""
    readers = [name for name, replaced_by in DEFAULT_READERS[task] if replaced_by not in section]
    unread = [] if readers else sorted({"pickscore"} & set(options) if task == "pref" else options)
    if unread:
        replaced = " and ".join(f"{task}.{key}" for key in ("reward", "train_reward") if key in section)
        name = _reward_spec(section["reward"], f"{task}.reward")[0]
        fix = (f"drop it, or name PickScore with its options: \"reward\": [\"pickscore\", {{...}}]" if task == "pref" else
               f"give a reward its options inside it, e.g. \"reward\": [\"{name}\", {{\"{unread[0]}\": ...}}]")
        raise SuiteConfigError(f"sd suite config: {task}.{unread[0]} is an option of the section's default reward, replaced "
                               f"here by {replaced}; {fix}")
    if task == "pref":  # one options object per reward; HPSv2, CLIPScore and ImageReward are scored whatever replaces PickScore
        for name in (*readers, *PREF_EXTRAS):
            if (given := _pref_options(config, name)) is not None:
                _check_options(name, given, where=f"pref.{name}.")
    else:
        for reward in readers:
            _check_options(reward, options, where=f"{task}.", section_keys=SPEC_KEYS)


def _check_options(reward: str, options: dict, *, where: str, section_keys: tuple[str, ...] = ()) -> None:
    """A key (at ``where``) that is neither one of ``section_keys`` nor an option of ``reward``, in one line."""
    from opd_bench import rewards
    from opd_bench.registry import did_you_mean, option_names, required_options

    factory = rewards.REGISTRY.resolve(reward)
    accepted = option_names(factory)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        own = f"; the section's own keys: {', '.join(section_keys)}" if section_keys else ""
        raise SuiteConfigError(f"sd suite config: {where}{unknown[0]} is not an option of the {reward!r} reward."
                               f"{did_you_mean(unknown[0], [*section_keys, *accepted])} Its options: {', '.join(accepted)}{own}")
    missing = [name for name in required_options(factory) if name not in options]
    if missing:  # e.g. ["remote", {}]: a TypeError when the reward was first built, after the model loaded
        raise SuiteConfigError(f"sd suite config: {where}{missing[0]} is missing; the {reward!r} reward needs it")
    if reward in ("sd/geneval", "sd/geneval-partial"):
        _check_geneval_values(options, where)


def _check_geneval_values(options: dict, where: str) -> None:
    """GenEval's rule options and partial form, by value: a string "0.3" or a misspelt form fails here, not mid-scoring."""
    from opd_bench import geneval

    rules = {f.name: options[f.name] for f in fields(geneval.Rules) if f.name in options}
    try:
        geneval.Rules(**rules)
    except ValueError as error:
        raise SuiteConfigError(f"sd suite config: {where}{error}") from None
    if options.get("partial", geneval.DEFAULT_PARTIAL_FORM) not in geneval.PARTIAL_FORMS:
        raise SuiteConfigError(f"sd suite config: {where}partial must be one of {', '.join(geneval.PARTIAL_FORMS)}, "
                               f"got {options['partial']!r}")


def _configured(name: str):
    """A reward factory for ``extra_rewards`` (built without options): ``name`` with the pref section's options."""
    def configured(options: dict[str, Any]) -> dict[str, Any]:
        return {**(_pref_options(current_config(), name) or {}), **options}

    def build(**options: Any):
        from opd_bench import rewards

        return rewards.get(name, **configured(options))

    def locate_weights(**options: Any) -> None:
        from opd_bench import rewards

        rewards.locate_weights(name, configured(options))

    build.__name__ = build.__qualname__ = f"{name}_reward"
    build.locate_weights = locate_weights
    return build


hpsv2_reward = _configured("hpsv2")
clipscore_reward = _configured("clipscore")
imagereward_reward = _configured("imagereward")


# ---------------------------------------------------------------------------------------------
# the suite


@dataclass(frozen=True)
class SDSuite(Suite):
    """A suite whose specs are built from the current configuration, on request; so is its image
    side: the configuration's ``resolution`` (e.g. 64 for a tiny test pipeline) replaces the default."""

    def image_side(self) -> int | None:
        return current_config().get("resolution") or self.resolution

    def evaluation_guidance(self) -> float:
        guidance = current_config().get("guidance_scale")
        return self.guidance_scale if guidance is None else float(guidance)

    def benchmark(self, task: str) -> FileBenchmarkSpec:
        if task not in self.tasks:
            raise UnknownNameError(f"unknown benchmark 'sd/{task}'. Known benchmarks of suite sd: {', '.join(self.tasks)}.")
        return build_spec(task, current_config())

    def configure(self, config: str | os.PathLike | dict | None = None, **sections: Any) -> None:
        configure(config, **sections)

    def settings(self) -> dict:
        """Each section with its prompt files by content (sha256; a moved file is the same file) and
        its reward options as given, without ``device`` or a remote reward's ``token`` (where a reward
        runs changes no score; a secret must not reach results.json): a run or evaluation records
        them, and one whose files or rewards changed is another experiment."""
        from opd_bench.benchmarks import sha256_file

        def unrecorded_removed(value: Any) -> Any:  # at any depth: inside reward specs ["remote", {...}] too
            if isinstance(value, dict):
                return {k: unrecorded_removed(v) for k, v in sorted(value.items()) if k not in UNRECORDED_OPTIONS}
            return [unrecorded_removed(v) for v in value] if isinstance(value, list) else value

        def recorded(key: str, value: Any) -> Any:
            if key not in FILE_KEYS:
                return value
            return sha256_file(value) if Path(value).is_file() else f"missing: {value}"

        config = current_config()
        sections = {task: {key: recorded(key, value) for key, value in unrecorded_removed(config[task]).items()} for task in self.tasks}
        # the evaluation's guidance, where the file sets one (the resolution is a part of every run's identity)
        return sections if config.get("guidance_scale") is None else {**sections, "guidance_scale": config["guidance_scale"]}


SUITE = SDSuite(
    name="sd", version=VERSION, tasks=TASKS, default_model="stabilityai/stable-diffusion-3.5-medium",
    # DiffusionOPD / Flow-GRPO evaluation sampler (PAPER.md section 1): 40 steps, CFG 4.5, 512 px, ODE
    num_steps=40, guidance_scale=4.5, noise_level=0.0, resolution=512,
    headline=("geneval", "ocr"),  # PickScore is not in [0, 1]
    description="real SD3 / SD3.5 models: GenEval, OCR and PickScore from user-given files (docs/sd_suite.md)",
)
