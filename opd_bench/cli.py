"""The ``opd-bench`` command line. Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import click

from opd_bench.result_schema import MODEL_DTYPES

# Errors that mean "bad input": shown as one line, no traceback.
_USER_ERRORS = ("ModelLoadError", "PromptFileError", "UnknownNameError", "FileExistsError", "FileNotFoundError", "SubmissionError",
                "MissingWeightsError", "MissingPackageError", "RemoteRewardError", "TrackerUnavailableError", "FloatingPointError", "WorkerDiedError")


def _friendly(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a known user error
            if type(error).__name__ in _USER_ERRORS or isinstance(error, ValueError):
                raise click.ClickException(str(error).splitlines()[0]) from None
            if isinstance(error, OSError) and error.filename is not None:  # a path that cannot be written or read
                raise click.ClickException(f"{error.strerror or error}: {error.filename}; check that path (a file where a "
                                           "folder is needed, no permission, a full disk) and rerun") from None
            raise

    return wrapper


def _writable(ctx, param, value):
    """An output path whose nearest existing folder can be written: refused now, before any model
    loads or trains, rather than when the results are written."""
    if value is None:
        return value
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise click.BadParameter(f"{value}: {existing} is a file, not a folder; name a path under a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise click.BadParameter(f"{value}: {existing} is not writable; name a folder you can write to")
    return value


def typed_command(argv: list[str]) -> str | None:
    """The command as typed, through the script or ``python -m opd_bench`` (as torchrun and
    accelerate launch run it), quoted to paste back; None when called from Python."""
    script = Path(argv[0]) if argv else Path()
    if script.name == "opd-bench" or (script.name == "__main__.py" and script.parent.name == "opd_bench"):
        return shlex.join(["opd-bench", *argv[1:]])
    return None


def _known_suite(ctx, param, value):
    from opd_bench import suites
    from opd_bench.registry import UnknownNameError

    try:
        suites.get(value)
    except UnknownNameError as error:
        raise click.BadParameter(str(error).splitlines()[0]) from None
    return value


def _suite_option(command):
    # eager: parsed before --suite-config, which configures the suite it names
    return click.option("--suite", "suite_name", default="tiny", show_default=True, is_eager=True, callback=_known_suite)(command)


def _suite_config_option(command):
    """``--suite-config FILE``: files and weights of a configurable suite (sd), applied before use."""

    def apply(ctx, param, value):
        if value is not None:
            from opd_bench import suites

            name = ctx.params.get("suite_name", "sd")  # run and eval name it (parsed first); verify and submit read the run's
            try:
                suites.configure(name, str(value))
            except (ValueError, OSError, KeyError) as error:
                hint = "; the configurable suite is sd: add --suite sd" if name == "tiny" else ""
                raise click.BadParameter(str(error).splitlines()[0] + hint, param_hint="--suite-config") from None
        return value

    return click.option(
        "--suite-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        callback=apply, expose_value=False, is_eager=False,
        help="JSON file with a configurable suite's prompt files and reward weights (docs/sd_suite.md); "
        "OPD_SD_CONFIG works too.",
    )(command)


def _device_option(command=None, *, help: str | None = None):
    """``--device``, checked before anything loads: a name torch knows, on hardware this machine has."""

    def check(ctx, param, value):
        if value == "cpu":  # always there; no need to import torch to say so
            return value
        from opd_bench.policy import check_device

        try:
            check_device(value)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--device") from None
        return value

    def decorate(command):
        return click.option("--device", default="cpu", show_default=True, callback=check, help=help)(command)

    return decorate if command is None else decorate(command)


def _finite(ctx, param, value):
    """A float option that must be a number, not nan or inf (click's FloatRange lets nan through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param_hint=f"--{param.name.replace('_', '-')}")
    return value


def _finite_at_least_0(ctx, param, value):
    value = _finite(ctx, param, value)
    if value is not None and value < 0:
        raise click.BadParameter(f"{value} is negative; give 0 or more", param_hint=f"--{param.name.replace('_', '-')}")
    return value


def _dtype_option(command):
    return click.option(
        "--dtype", default="auto", show_default=True, type=click.Choice(["auto", *MODEL_DTYPES]),
        help="Weight precision: auto is bfloat16 on a GPU (as Flow-GRPO trains), float32 on the CPU. "
             "Trained adapters stay float32 either way.",
    )(command)


def _adapter_option(command):
    return click.option(
        "--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
        help="A trained adapter on top of --model (the model it was trained from): a run's "
             "methods/<method>/seed<k>/final (cascade: methods/cascade/seed<k>/stage<N>-<task>/final) or "
             "teachers/<task>-<hash>/final folder.",
    )(command)


@contextlib.contextmanager
def _resumable(kept: str):
    """Ctrl-C says what survives and how to go on, not just click's "Aborted!"."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {kept}; rerun the same command to resume", err=True)
        raise click.Abort() from None


def _with_adapter(policy, folder: Path | None, model: str):
    """``policy.use`` of the adapter in ``folder`` (loaded now), or of the base where there is none.
    An adapter of a run trained on another base than ``model`` is said so: one of the same shape
    loads without complaint, and its scores would be another model's."""
    if folder is None:
        return policy.use(None)
    trained_on = _run_model(folder)
    if trained_on is not None and trained_on[1] != model:
        click.echo(f"note: {folder} was trained on {trained_on[1]!r} ({trained_on[0] / 'run.json'}); "
                   f"it is applied to {model!r} here", err=True)
    policy.load_adapter("evaluated", folder)
    return policy.use("evaluated")


def _run_model(folder: Path) -> tuple[Path, str] | None:
    """The run folder above an adapter and the base model that run trained (None: not a run's)."""
    for parent in Path(folder).resolve().parents:
        if (parent / "run.json").is_file():
            try:
                model = json.loads((parent / "run.json").read_text())["model"]
            except (ValueError, KeyError, TypeError):
                return None
            return (parent, model) if isinstance(model, str) else None
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opd-bench")
def main() -> None:
    """Compare DiffusionOPD with multi-reward and cascade RL on text-to-image flow models."""


@main.command("list")
@click.argument("what", type=click.Choice(["rewards", "benchmarks"]))
def list_(what: str) -> None:
    """List the registered rewards or benchmarks."""
    if what == "rewards":
        from opd_bench.rewards import REGISTRY
    else:
        import opd_bench.suites  # noqa: F401 - importing the suites registers their benchmarks
        from opd_bench.benchmarks import REGISTRY
    for name in REGISTRY.names():
        click.echo(f"{name:28s} {REGISTRY.help(name)}")
    if what == "benchmarks":  # the sd suite's are built from its config when used (docs/sd_suite.md)
        click.echo(f"{'sd/geneval, sd/ocr, sd/pref':28s} real SD3 / SD3.5 models; prompt files and weights from --suite-config")


@main.command("build-tiny")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), callback=_writable)
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--force", is_flag=True, help="Overwrite an existing folder.")
@_friendly
def build_tiny(out: Path, seed: int, force: bool) -> None:
    """Save a random-init miniature SD3 pipeline (a diffusers folder) to OUT."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass --force")
        if not (out / "model_index.json").is_file():  # --force replaces a pipeline, never other files
            raise FileExistsError(f"{out} holds no pipeline (no model_index.json); --force overwrites only a pipeline folder, "
                                  "choose an empty or new folder")
    from opd_bench.tiny import save_tiny

    save_tiny(out, seed=seed)
    click.echo(f"saved a random tiny SD3 pipeline to {out}: it draws 64 px images, so an sd suite config for it "
               "needs \"resolution\": 64")


@main.command("run")
@click.option("--method", default="all", show_default=True, type=click.Choice(["all", "teachers", "opd", "opd-ppo", "multi-reward", "cascade"]))
@_suite_option
@click.option("--model", default=None, help="Base model: a shipped alias ('tiny'), a pipeline folder or hub id. Default: the suite's.")
@click.option("--preset", default="standard", show_default=True, type=click.Choice(["smoke", "standard", "paper"]),
              help="smoke: about two minutes (one seed by default); standard: the embedded suite on a CPU; paper: PAPER.md's SD3.5-M settings, for GPUs.")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Change one field of the preset, VALUE parsed as JSON; repeat for several. NAME is a trainer's field "
                   "(teacher.lr=1e-4, teacher.pref.kl_beta=0.01 for one task's teacher, opd.steps=100, opd-ppo.clip_range=0.1, "
                   "multi-reward.lora_rank=16, cascade.stages='[[\"pref\",20],[\"ocr\",20]]', cascade.grpo.lr=1e-4) or a run field "
                   "(eval_limit=64). A changed preset is another experiment: its own --out, not listed on the leaderboard.")
@click.option("--set-file", "set_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A file of --set changes, one NAME=VALUE a line ('#' starts a comment line); applied before "
                   "the command line's --set, and recorded as if each line had been given as --set.")
@click.option("--seeds", default=None, help="Comma-separated seeds of the student runs.  [default: 0,1,2; with --preset smoke: 0]")
@click.option("--out", default="runs/default", show_default=True, type=click.Path(file_okay=False, path_type=Path), callback=_writable)
@_device_option
@click.option("--report/--no-report", default=True, show_default=True, help="Write reports/<run>/ at the end.")
@click.option("--force", is_flag=True, help="Delete the run in --out and start over (only a folder holding a run; never the working directory or its parents).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Cells (teachers, training runs, evaluations) run side by side in this many processes.  "
                   "[default: the CPU cores, at most 4, with --device cpu; 1 on a GPU or under torchrun / accelerate]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per cell; a cell's numbers depend on them.  [default: the cores divided among the jobs]")
@_dtype_option
@click.option("--drop-t5", is_flag=True, help="SD3 without its T5 text encoder (about 10 GB less for SD3.5); another experiment.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less memory, same numbers.")
@click.option("--offload-text-encoders", is_flag=True, help="Keep the text encoders on the CPU between prompts: less GPU memory, same numbers.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Forward (2N transformer inputs with guidance) and decode at most N samples at once in rollouts and "
                   "evaluations (a paper-preset teacher's rollout is 384 images): less GPU memory, the same samples up to "
                   "float rounding, which training amplifies, so keep it fixed within a run.  [default: no limit]")
@click.option("--log-to", default="", metavar="NAMES",
              help="Mirror every training cell's metrics to experiment trackers, comma-separated: tensorboard "
                   "(RUN/tensorboard), wandb (one W&B run per cell, $WANDB_PROJECT). Changes no number.")
@click.option("--dry-run", is_flag=True, help="Print the plan (the preset with every --set applied) as JSON and exit; nothing is written.")
@_suite_config_option
@_friendly
def run_command(method, suite_name, model, preset, overrides, set_file, seeds, out, device, report, force, jobs, threads, dtype, drop_t5,
                gradient_checkpointing, offload_text_encoders, max_batch, log_to, dry_run) -> None:
    """Train teachers, DiffusionOPD and the baselines; evaluate all; write OUT/results.json.

    Rerunning the same command skips finished work and resumes unfinished training; a rerun with
    other --method or --seeds adds its cells to OUT/results.json.
    """
    if set_file is not None:
        from opd_bench.presets import read_set_file

        overrides = (*read_set_file(set_file), *overrides)
    # smoke is the quick check: one seed unless asked for more (three take about two minutes too).
    seeds = seeds if seeds is not None else ("0" if preset == "smoke" else "0,1,2")
    items = seeds.split(",")
    if any(item.strip() for item in items) and not all(item.strip() for item in items):  # "0,,1", "0,": one left out?
        raise click.ClickException(f"--seeds {seeds!r} has an empty item; give the seeds separated by single commas, e.g. 0,1,2")
    try:
        seed_list = [int(s) for s in items if s.strip()]
    except ValueError:
        raise click.ClickException(f"--seeds {seeds!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    negative = [seed for seed in seed_list if seed < 0]
    if negative:  # numpy's seed sequences take none, and the run would fail after its teachers
        raise click.ClickException(f"--seeds {seeds!r}: seed {negative[0]} is negative; seeds are integers >= 0, e.g. 0,1,2")
    repeated = sorted({seed for seed in seed_list if seed_list.count(seed) > 1})
    if repeated or not seed_list:
        what = f"seed {repeated[0]} is given twice" if repeated else "no seed is given"
        raise click.ClickException(f"--seeds {seeds!r}: {what}; give each seed once, e.g. 0,1,2")
    trackers = [name.strip() for name in log_to.split(",") if name.strip()]
    if dry_run:
        from opd_bench import suites
        from opd_bench.harness import methods_for
        from opd_bench.presets import apply_overrides, plan
        from opd_bench.trackers import TRACKERS

        suite = suites.get(suite_name)
        resolved = apply_overrides(plan(preset), overrides, tasks=list(suite.tasks))
        for name in trackers:
            TRACKERS.resolve(name)  # a misspelt tracker, as the run itself would refuse it
        click.echo(json.dumps({"suite": suite_name, "model": suites.canonical_model(model or suite.default_model), "preset": preset,
                               "overrides": list(overrides), "methods": methods_for(method), "seeds": seed_list,
                               "plan": resolved.to_dict()}, indent=2))
        return
    from opd_bench.harness import Harness

    command = typed_command(sys.argv) or (  # called from Python (tests): the options that decide the results
        f"opd-bench run --method {method} --suite {suite_name}" + (f" --model {shlex.quote(model)}" if model else "")
        + f" --preset {preset} --seeds {seeds} --out {shlex.quote(str(out))}"
        + "".join(f" --set {shlex.quote(pair)}" for pair in overrides))
    from opd_bench.distributed import leave_alone_on_error
    from opd_bench.parallel import default_jobs

    with leave_alone_on_error():  # one rank of several that fails ends the job at once
        harness = Harness(out, suite=suite_name, model=model, preset=preset, overrides=overrides, seeds=seed_list, method=method,
                          device=device, force=force, command=command, dtype=dtype, drop_t5=drop_t5,
                          gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
                          max_batch=max_batch, log_to=trackers)
        with _resumable(f"the finished cells are kept in {out}"):
            results = harness.run(jobs=jobs or default_jobs(device), threads=threads)
    if results is None:  # another process of a multi-process run: rank 0 prints and writes the report
        return
    click.echo(f"{out / 'results.json'}: nothing new since it was written; kept as it was" if harness.results_unchanged
               else f"wrote {out / 'results.json'}")
    for name, scores in results["results"].items():
        click.echo(f"{name:18s} " + "  ".join(f"{b} {v['mean']:.3f}" for b, v in scores.items()))
    _echo_findings(results)
    if report:
        from opd_bench.report import build_report, report_of_another_run, unusable_report_folder

        target = Path("reports") / out.resolve().name  # as `opd-bench report` names it (`--out .` too)
        other = report_of_another_run(out, target)
        unusable = unusable_report_folder(out, target)
        if other is not None or unusable is not None:  # the run is saved; only its report waits for a folder of its own
            why = unusable or f"{target} holds the report of another run ({other})"
            click.echo(f"report: not written, {why.split('; ')[0]}; "
                       f"write this one with `opd-bench report {out} --out reports/OTHER_NAME`")
            return
        build_report(out, target)
        click.echo(f"report: {target / 'index.html'}")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: reports/<run name>.", callback=_writable)
@click.option("--force", is_flag=True, help="Overwrite the report of another run in --out's folder.")
@_friendly
def report_command(run_dir: Path, out: Path | None, force: bool) -> None:
    """Generate report.md and a self-contained index.html from RUN_DIR/results.json."""
    _check_finished_run(run_dir)
    from opd_bench.report import build_report, report_of_another_run, unusable_report_folder

    target = out or Path("reports") / run_dir.resolve().name
    unusable = unusable_report_folder(run_dir, target)
    if unusable is not None:
        raise FileExistsError(unusable)
    other = None if force else report_of_another_run(run_dir, target)
    if other is not None:
        raise FileExistsError(f"{target} holds the report of another run ({other}); choose another --out or pass --force")
    build_report(run_dir, target)
    from opd_bench.report import load_results

    _echo_findings(load_results(run_dir))
    click.echo(f"wrote {target / 'report.md'} and {target / 'index.html'}")


def _check_finished_run(run_dir: Path) -> None:
    """A one-line error unless ``run_dir`` holds a finished run (its results.json): an unfinished one
    is told the command that finishes it, a folder that holds no run what to pass instead."""
    if (run_dir / "results.json").is_file():
        return
    from opd_bench.harness import holds_run
    from opd_bench.io import read_json

    if not holds_run(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no opd-bench run; pass the --out folder of an `opd-bench run`")
    identity = run_dir / "run.json"  # an unfinished run: the preset it was started with finishes it
    recorded = read_json(identity) if identity.is_file() else {}
    recorded = recorded if isinstance(recorded, dict) else {}
    options = [f"--{name} {shlex.quote(str(recorded[name]))}" for name in ("suite", "model", "preset", "dtype") if name in recorded]
    raise FileNotFoundError(f"{run_dir} holds an unfinished run (no results.json yet); finish it first: "
                            f"`opd-bench run {' '.join(options or ['--preset standard'])} --out {shlex.quote(str(run_dir))}` "
                            "(with its --method, --set and --suite-config, if any)")


def _echo_findings(results: dict) -> None:
    """The paper's claims against this result file, as the report opens with them."""
    from opd_bench.findings import findings_lines
    from opd_bench.results_view import ResultView

    click.echo("findings:")
    for line in findings_lines(ResultView(results)):
        click.echo(f"- {line}")


@main.command("verify")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompts", default=8, show_default=True, type=click.IntRange(min=0), help="Test prompts re-checked per benchmark (0: all).")
@click.option("--salt", default="", help="Any string: draws another sample than the default one, which anyone can compute.")
@click.option("--model", "models", multiple=True, help="Check only this model, e.g. opd or teacher/ocr (repeat for several; default: all).")
@_device_option
@_suite_config_option
@_friendly
def verify_command(run_dir: Path, prompts: int, salt: str, models: tuple[str, ...], device: str) -> None:
    """Regenerate and re-score a sample of RUN_DIR's final evaluations from its adapters; exit 1 unless they match."""
    from opd_bench.verify import verify_run

    _check_finished_run(run_dir)
    report = verify_run(run_dir, prompts=prompts, salt=salt, device=device, models=models or None, progress=True)
    if not report["ok"]:
        first = report["mismatches"][0]
        raise click.ClickException(
            f"{run_dir} does not verify: {len(report['mismatches'])} of {report['images_checked']} scores of re-generated "
            f"images (each reward of each image) differ from the recorded ones, e.g. {first['model']} seed {first['seed']} {first['benchmark']} image {first['image']}: "
            f"recorded {first['recorded']}, now {first['recomputed']:.6g} (tolerated: a difference of "
            f"{report['tolerance']['atol']:g}, and one flipped detection or OCR decision per model, seed and benchmark "
            f"among {report['tolerance']['flips_need_images']} images or more)"
        )
    flips = report["flips"]
    flipped = (f"; {len(flips)} flipped a detection or OCR decision, as float rounding can (at most "
               f"{report['tolerance']['flips_allowed_per_model_seed_benchmark']} per model, seed and benchmark), e.g. "
               f"{flips[0]['model']} seed {flips[0]['seed']} {flips[0]['benchmark']} image {flips[0]['image']}") if flips else ""
    click.echo(f"verified {run_dir}: {report['images_checked'] - len(flips)} of {report['images_checked']} scores of re-generated "
               "images (each reward of each image) match the recorded ones "
               f"(largest difference {report['max_difference_within_tolerance']:.2g}{flipped}; {report['seconds']} s)")


@main.command("submit")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Submission name: letters, digits, '.', '_', '-'.")
@click.option("--root", default="leaderboard", show_default=True, type=click.Path(file_okay=False, path_type=Path), callback=_writable)
@click.option("--unverified", is_flag=True, help="Skip verification; the entry goes to the separate, unranked unverified table.")
@_device_option(help="Device for the verification.")
@_suite_config_option
@_friendly
def submit_command(run_dir: Path, name: str, root: Path, unverified: bool, device: str) -> None:
    """Validate and verify RUN_DIR/results.json and add it to the leaderboard directory."""
    from opd_bench.leaderboard import rebuild, submit
    from opd_bench.verify import verify_run

    _check_finished_run(run_dir)
    new_board = not (root / "submissions").is_dir()
    path = submit(run_dir, name, root=root, unverified=unverified,
                  verify=lambda folder, salt: verify_run(folder, salt=salt, device=device, progress=True))
    rebuild(root)
    click.echo(f"submitted {path}{' (unverified)' if unverified else ' (verified)'}; regenerated {root / 'README.md'}")
    if new_board:  # from outside the repository, the default --root starts a board of one entry
        click.echo(f"note: {root.resolve()} had no submissions/ folder, so this started a new leaderboard there; "
                   "to add to the project's, run from its checkout or pass --root PATH/leaderboard", err=True)


@main.command("leaderboard")
@click.option("--root", default="leaderboard", show_default=True, type=click.Path(file_okay=False, path_type=Path), callback=_writable)
@_friendly
def leaderboard_command(root: Path) -> None:
    """Regenerate leaderboard/README.md and leaderboard.csv from the submissions."""
    from opd_bench.leaderboard import rebuild

    readme, csv = rebuild(root)
    click.echo(f"wrote {readme} and {csv}")


@main.command("eval")
@_suite_option
@click.option("--model", default=None, help="'tiny' (shipped base), a pipeline folder or hub id, or 'renderer'. Default: the suite's.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for results.json.", callback=_writable)
@click.option("--benchmarks", "tasks", default=None, help="Comma-separated subset, e.g. geneval,ocr.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate N prompts per benchmark, spread over the tags (every GenEval tag when N >= 6), evenly spaced within each.")
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=None, help="Default: each benchmark's.")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps (default: the suite's).")
@click.option("--guidance", type=float, default=None, callback=_finite, help="CFG scale (default: the suite's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@_device_option
@click.option("--force", is_flag=True, help="Overwrite an existing results.json.")
@_adapter_option
@_dtype_option
@_suite_config_option
@_friendly
def eval_command(suite_name, model, out, tasks, limit, images_per_prompt, seed, steps, guidance, batch_size, device, force,
                 adapter, dtype):
    """Evaluate a model on a suite's test prompts; writes OUT/results.json and prints a table."""
    from opd_bench.harness import holds_run

    if holds_run(out):  # with or without --force: a run's results are not an evaluation's to replace
        raise FileExistsError(f"{out} holds an opd-bench run; eval writes a results.json of its own, choose another --out")
    results_path = out / "results.json"
    if results_path.exists() and not force:
        raise FileExistsError(f"{results_path} exists; choose another --out or pass --force")
    import time

    from opd_bench import suites
    from opd_bench.evaluate import SamplerSettings, evaluate_suite, policy_source, renderer_source, select_tasks
    from opd_bench.io import CorruptFileError, atomic_write_json, json_differences, read_json
    from opd_bench.policy import DTYPES, Policy, resolve_dtype

    suite = suites.get(suite_name)
    tasks = select_tasks(suite, [t.strip() for t in tasks.split(",")] if tasks is not None else None)  # before the model loads
    for task in tasks:  # and every benchmark's prompt file, reward options and weights, not when its turn comes
        suite.benchmark(task).prompts("test")
        suite.benchmark(task).locate_weights()
    model = suites.canonical_model(model or suite.default_model)
    settings = SamplerSettings(steps or suite.num_steps, suite.evaluation_guidance() if guidance is None else guidance, suite.noise_level)
    dtype = resolve_dtype(dtype, device)
    if model == "renderer":
        if suite.name != "tiny":
            raise click.UsageError(f"--model renderer draws the tiny world's own images; suite {suite.name!r} has no renderer")
        if adapter is not None:
            raise click.UsageError("--adapter applies to a model; the renderer draws the world's own images")
        source, active = renderer_source(), contextlib.nullcontext()
    else:
        policy = Policy.from_pretrained(suites.resolve_model(model), device=device, resolution=suite.image_side(), dtype=DTYPES[dtype])
        source, active = policy_source(policy, settings), _with_adapter(policy, adapter, model)
    from opd_bench.verify import adapter_sha256

    adapter_record = None if adapter is None else {"path": str(adapter), "sha256": adapter_sha256(adapter)}
    if adapter is not None and (trained_on := _run_model(adapter)) is not None:  # a run's adapter: the base it was trained on
        adapter_record["trained_on"] = trained_on[1]
    sampler = vars(settings) if model != "renderer" else None
    used_dtype = dtype if model != "renderer" else None
    # A killed evaluation resumes: each benchmark is saved in OUT/parts as it ends, with what its
    # scores depend on (of a configurable suite's settings, its own section's), and reused only
    # by an evaluation with the same.
    suite_settings = suite.settings()
    model_sha256 = None if model == "renderer" else suites.model_fingerprint(model)  # a rebuilt folder is another model

    def depends_on(task: str) -> dict:
        own = None if suite_settings is None else {k: v for k, v in suite_settings.items() if k in (task, "guidance_scale")}
        return json.loads(json.dumps({
            "suite": suite.name, "suite_version": suite.version, "suite_settings": own, "model": model,
            "model_sha256": model_sha256, "seed": seed,
            # an sd config's resolution; absent at the suite's own side, so parts saved before it was recorded resume
            **({"resolution": suite.image_side()} if suite.image_side() is not None else {}),
            "limit": limit, "adapter": adapter_record and adapter_record["sha256"], "images_per_prompt": images_per_prompt,
            "sampler": sampler, "dtype": used_dtype, "batch_size": batch_size, "device": device,
        }))

    parts = out / "parts"
    if force:
        shutil.rmtree(parts, ignore_errors=True)
    finished = {}
    for path in sorted(parts.glob("*.json")):
        fix = "delete it to evaluate that benchmark again, or pass --force to start over"
        saved = read_json(path, fix=fix)
        if not isinstance(saved, dict) or not {"depends_on", "result"} <= saved.keys():
            raise CorruptFileError(f"{path} is not a finished benchmark's record (depends_on and result); {fix}")
        if saved.get("depends_on") != depends_on(path.stem):
            raise FileExistsError(f"{parts} holds an unfinished evaluation with other settings "
                                  f"({json_differences(saved.get('depends_on'), depends_on(path.stem))}); rerun it with those, "
                                  "pass --force to start over, or choose another --out")
        finished[path.stem] = saved["result"]
    if finished:
        click.echo(f"resuming: {', '.join(finished)} already evaluated ({parts})")

    def save(task: str, result: dict) -> None:
        atomic_write_json(parts / f"{task}.json", {"depends_on": depends_on(task), "result": result})

    start = time.time()
    with active, _resumable(f"the finished benchmarks are kept in {parts}"):
        result = evaluate_suite(
            suite, source, tasks=tasks, seed=seed, limit=limit,
            images_per_prompt=images_per_prompt, batch_size=batch_size, finished=finished, on_benchmark=save,
        )
    record = {
        "suite": suite.name, "suite_version": suite.version, "suite_settings": suite_settings, "model": model,
        "model_sha256": model_sha256, "seed": seed, "adapter": adapter_record, "sampler": sampler, "dtype": used_dtype, "resolution": suite.image_side(), "limit": limit,
        "num_images": sum(b["num_images"] for b in result["benchmarks"].values()),
        "seconds": time.time() - start, **result,
    }
    atomic_write_json(results_path, record)
    shutil.rmtree(parts, ignore_errors=True)
    click.echo(f"{'benchmark':14s} score")
    for name, score in record["scores"].items():
        click.echo(f"{name:14s} {score:.4f}")
    for task, tags in record["per_tag"].items():
        click.echo(f"{task} per tag: " + ", ".join(f"{tag} {value:.3f}" for tag, value in tags.items()))
    click.echo(f"wrote {results_path}")


@main.group()
def pretrain() -> None:
    """Reproduce the tiny suite's shipped models (base pipeline, preference model)."""


def _check_pretrain_out(out: Path, marker: str, what: str, force: bool, leftovers: str | None = None) -> None:
    """--out of a pretrain command: new, empty, or a folder of the same kind (replaced with --force);
    never a run folder or another model's (``leftovers``: a killed build's files, which --force replaces)."""
    holds = (out / marker).exists()
    if holds and not force:
        raise FileExistsError(f"{out} already holds a {what}; choose another folder or pass --force")
    if out.is_dir() and any(out.iterdir()) and not holds and not (leftovers and any(out.glob(leftovers))):
        raise FileExistsError(f"{out} holds files but no {what}; --force overwrites only a {what} folder, "
                              "choose an empty or new folder")


@pretrain.command("base")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the pipeline.", callback=_writable)
@click.option("--seed", default=0, show_default=True)
@click.option("--num-images", type=int, default=None, help="Rendered training images [default: PretrainConfig's].")
@click.option("--vae-steps", type=int, default=None, help="[default: PretrainConfig's]")
@click.option("--steps", type=int, default=None, help="Denoiser steps (upper bound with --max-minutes) [default: PretrainConfig's].")
@click.option("--batch", type=int, default=None, help="Denoiser batch [default: PretrainConfig's].")
@click.option("--layers", type=int, default=None, help="Transformer depth [default: the shipped base's, 4].")
@click.option("--heads", type=int, default=None, help="Transformer width in heads of 32 channels [default: 3].")
@click.option("--max-minutes", type=float, default=None, help="Time budget of the denoiser phase.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Any other PretrainConfig field, VALUE parsed as JSON (e.g. --set latent_channels=4 --set vae_channels=[8,32]). Repeat for several.")
@_device_option
@click.option("--force", is_flag=True, help="Overwrite an existing pipeline folder.")
@_friendly
def pretrain_base_command(out, seed, num_images, vae_steps, steps, batch, layers, heads, max_minutes, overrides, device, force) -> None:
    """Train the tiny base model from scratch on rendered scenes with web-like captions (not resumable:
    a killed one starts over)."""
    _check_pretrain_out(out, "model_index.json", "pipeline", force, leftovers="pretrain_log.jsonl*")
    from opd_bench.presets import set_fields
    from opd_bench.tiny.pretrain import PretrainConfig, pretrain_base

    given = {"num_images": num_images, "vae_steps": vae_steps, "steps": steps, "batch": batch,
             "num_layers": layers, "num_heads": heads}
    config = PretrainConfig(
        seed=seed, max_minutes=max_minutes, device=device, **{k: v for k, v in given.items() if v is not None}
    )
    options = {"device": "--device", "seed": "--seed"}  # checked there (the device before anything renders)
    for name in (pair.partition("=")[0].strip() for pair in overrides):
        if name in options:
            raise click.BadParameter(f"--set {name}: use {options[name]} instead", param_hint="--set")
    config = set_fields(config, overrides)
    summary = pretrain_base(out, config)
    click.echo(
        f"saved the base pipeline to {out} ({summary['denoiser_steps']} denoiser steps, "
        f"{summary['total_seconds'] / 60:.1f} min)"
    )


@pretrain.command("pref")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the weights.", callback=_writable)
@click.option("--seed", default=0, show_default=True)
@click.option("--num-pairs", default=20_000, show_default=True, type=click.IntRange(min=1), help="Bradley-Terry training pairs.")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(min=1), help="3 for the shipped model (tiny-v2).")
@click.option("--force", is_flag=True, help="Overwrite existing weights.")
@_friendly
def pretrain_pref_command(out, seed, num_pairs, epochs, force) -> None:
    """Train the tiny suite's preference model on oracle-labelled pairs with label noise."""
    _check_pretrain_out(out, "model.safetensors", "preference model", force)
    from opd_bench.world.pref_train import pretrain_pref

    metrics = pretrain_pref(out, seed=seed, num_pairs=num_pairs, epochs=epochs)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    click.echo(f"saved the preference model to {out}: "
               + ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in list(shown.items())[:6]))


@main.command()
@click.option("--model", required=True, help="'tiny' (shipped base), a pipeline folder or hub id (SD3 family or FLUX.1).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for several.")
@click.option("--images-per-prompt", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance", default=4.5, show_default=True, callback=_finite, help="Classifier-free guidance scale.")
@click.option("--noise-level", default=0.0, show_default=True, callback=_finite_at_least_0, help="0 = ODE (Euler); >0 = Flow-GRPO SDE.")
@click.option("--seed", default=0, show_default=True)
@_device_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), callback=_writable,
              help="Image grid to write: .png (or .jpg / .webp, in that format).")
@click.option("--resolution", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Image side in pixels [default: the pipeline's own; the sd suite trains and evaluates at 512].")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@_adapter_option
@_dtype_option
@_friendly
def sample(model, prompts, images_per_prompt, steps, guidance, noise_level, seed, device, out, resolution, force, adapter, dtype) -> None:
    """Sample images with the shared rollout and save them as one grid (rows = prompts)."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another path or pass --force")
    from opd_bench.io import GRID_FORMATS, save_grid

    if out.suffix.lower() not in GRID_FORMATS:
        raise click.BadParameter(f"{out}: give the grid a .png, .jpg or .webp name", param_hint="--out")
    if model == "renderer":
        raise click.UsageError("--model renderer (the world's own images) is for `opd-bench eval`; sample draws a pipeline")
    from opd_bench.policy import DTYPES, Policy, resolve_dtype
    from opd_bench.rollout import rollout
    from opd_bench.suites import canonical_model, resolve_model

    # resolve: checks the weights first
    policy = Policy.from_pretrained(resolve_model(model), device=device, dtype=DTYPES[resolve_dtype(dtype, device)],
                                    resolution=resolution)
    with _with_adapter(policy, adapter, canonical_model(model)):
        trajectory = rollout(
            policy,
            list(prompts),
            images_per_prompt=images_per_prompt,
            num_steps=steps,
            noise_level=noise_level,
            guidance_scale=guidance,
            seed=seed,
            keep={"images"},
        )
    save_grid(trajectory.images, out, columns=images_per_prompt)
    click.echo(f"wrote {len(trajectory)} images to {out}")


@main.command("serve-reward")
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all; set a token then).")
@click.option("--port", default=8700, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on (0: any free port).")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE", help="Reward option; VALUE is parsed as JSON when it can be, else a string. Repeat for several.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Images per reward call; larger requests are scored in chunks.")
@click.option("--max-request-mb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True), callback=_finite, help="Largest request body in MiB (larger: HTTP 413).")
@click.option("--max-image-pixels", default=2048 * 2048, show_default=True, type=click.IntRange(min=1), help="Largest image, width x height, read from the PNG header before decoding (larger: HTTP 413).")
@click.option("--max-request-pixels", default=8 * 1024 * 1024, show_default=True, type=click.IntRange(min=1), help="Most pixels per request, summed over its images (more: HTTP 413).")
@click.option("--token", envvar="OPD_REWARD_TOKEN", default=None, show_envvar=True, help="Shared token every request must carry (the remote reward's token=...); prefer the environment variable, a command line is visible to other users.")
@_friendly
def serve_reward_command(name, host, port, option_pairs, max_batch, max_request_mb, max_image_pixels, max_request_pixels, token) -> None:
    """Serve the reward NAME over HTTP for `rewards.get("remote", url=...)` (docs/reward_server.md)."""
    import logging

    from opd_bench.serve import parse_options, serve_reward

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve_reward(
        name, parse_options(option_pairs), host, port, max_batch=max_batch,
        max_request_bytes=int(max_request_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels, token=token or None,
        on_ready=lambda server: click.echo(f"serving reward {name} at {server.url} (Ctrl-C to stop)"),
    )


if __name__ == "__main__":
    sys.exit(main())
