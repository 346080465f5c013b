"""A leaderboard of submitted ``results.json`` files.

Layout under ``root`` (default ``leaderboard/``)::

    submissions/<suite>/<name>.json   one validated results.json each, plus a "submission" block
    README.md                         the ranked tables (``rebuild``)
    leaderboard.csv                   the same rows, machine-readable (``rebuild``)

``check_results`` (``opd_bench.result_schema``) checks that a file is well-formed and consistent;
``validate`` adds what a listing needs: the current schema, a listed preset (never ``smoke``) and
the preset's settings as installed (stored entries made under older settings keep their own
table). ``submit`` also re-evaluates a sample of the run from its adapters (``opd_bench.verify``)
and refuses what does not reproduce, unless told to list it as unverified; it refuses anything
invalid, oversized, unsafe names and duplicates without touching the directory. ``rebuild``
regenerates README.md and leaderboard.csv deterministically: verified entries ranked per suite,
preset and configuration (the preset's settings when the run was made), unverified and schema-1
("legacy") entries in a separate table without ranks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from opd_bench.io import LATER_SETTINGS, atomic_write_bytes, json_text, without_later_settings
from opd_bench.result_schema import (
    SCHEMA_VERSION, STUDENT_METHODS, SubmissionError, check_results, dig, is_finite_number, is_string_list, model_loading, total_forwards,
)
from opd_bench.results_view import counted, mean_sd

MAX_FILE_BYTES = 2 * 1024 * 1024  # results.json and every stored submission; the standard tiny run is ~0.2 MB
LISTED_PRESETS = ("standard", "paper")  # smoke runs check the pipeline; their scores are not results
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Names Windows reserves for devices (with any extension): such a file cannot be checked out there.
WINDOWS_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)
METHOD_ORDER = ("opd", "opd-ppo", "multi-reward", "cascade", "base")


def _model_label(results: dict) -> str:
    """The model, with its precision where it was not float32 (another experiment, e.g. ``sd35m (bfloat16)``)."""
    dtype = model_loading(results)["dtype"]
    return str(results["model"]) + (f" ({dtype})" if dtype != "float32" else "")


# Settings that change no score (what is logged and how often a run checkpoints), left out of the
# configuration a ranking groups by: v12's standard run (monitoring off) scores as v11's to the bit.
BOOKKEEPING = ("monitor_rewards", "checkpoint_every")
# Parts of the recorded config that are not the preset's: how the model was loaded (shown in the
# model column, with its precision) and the --set changes (a listed run has none).
NOT_THE_PRESET = ("model", "overrides")


def preset_settings(results: dict) -> dict:
    """The preset's settings the run recorded, less bookkeeping and model loading."""
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    return _strip_bookkeeping({k: v for k, v in config.items() if k not in NOT_THE_PRESET})


def configuration_id(results: dict) -> str:
    """A short hash of ``preset_settings``: runs of one preset name made before and after the preset
    changed are other experiments (another evaluation size, learning rate, ...), so they are ranked apart."""
    text = json.dumps(preset_settings(results), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _strip_bookkeeping(value: Any) -> Any:
    """``value`` less bookkeeping, and less settings added later at the value earlier runs had (the
    committed runs stay runs of the installed preset)."""
    def strip(inner: Any) -> Any:
        if isinstance(inner, dict):
            return {k: strip(v) for k, v in inner.items() if k not in BOOKKEEPING}
        return [strip(v) for v in inner] if isinstance(inner, list) else inner

    return strip(without_later_settings(value))


def installed_preset_settings(preset: str) -> dict:
    """What a run of ``preset`` made with the installed opd-bench records (the sections ``preset_settings``
    reads; of the evaluation, what the preset sets, not what the suite and model do)."""
    from dataclasses import asdict

    from opd_bench.presets import plan

    planned = plan(preset)
    sections = {"teachers": asdict(planned.teacher), "opd": asdict(planned.opd), "opd-ppo": asdict(planned.opd_ppo),
                "multi-reward": asdict(planned.multi_reward), "cascade": asdict(planned.cascade),
                "eval": {"limit": planned.eval_limit, "images_per_prompt": planned.eval_images_per_prompt,
                         "seed": planned.eval_seed}}
    return _strip_bookkeeping(json.loads(json.dumps(sections)))  # through JSON, as results.json holds it


def preset_differences(results: dict) -> str:
    """The settings of ``results`` that are not the installed preset's, e.g. 'opd.lr 0.003 (now 0.001)';
    '' when it is a run of the preset as installed."""
    expected = installed_preset_settings(results["preset"])
    recorded = preset_settings(results)
    recorded = {section: ({k: v for k, v in recorded[section].items() if k in fields}
                          if section == "eval" and isinstance(recorded.get(section), dict) else recorded.get(section))
                for section, fields in expected.items()}
    return settings_changed(_flat(recorded), _flat(expected))


def _flat(value: Any, prefix: str = "") -> dict[str, str]:
    """{'opd.lr': '0.001', ...}: every leaf setting under its dotted name, as JSON."""
    if isinstance(value, dict) and value:
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(value)}


def settings_changed(old: dict[str, str], new: dict[str, str], most: int = 6) -> str:
    """'eval.limit 32 (now 160), teachers.kl_beta 0 (now 0.04) and 3 more': what ``old`` (flat
    settings) has that ``new`` has not."""
    def value(settings: dict[str, str], name: str) -> str:  # a setting left out at its earlier value shows it
        later = LATER_SETTINGS.get(name.rpartition(".")[2])
        return settings.get(name, "unset" if later is None else json.dumps(later))

    names = sorted(set(old) | set(new), key=lambda n: (n.count("."), n))
    changed = [f"{n} {value(old, n)} (now {value(new, n)})" for n in names if old.get(n) != new.get(n)]
    return ", ".join(changed[:most]) + (f" and {len(changed) - most} more" if len(changed) > most else "")


def _evaluation(results: dict) -> str:
    """'160 test prompts x 2 images' (or 'every test prompt x each benchmark's images')."""
    evaluation = dig(results, "config", "eval")
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    limit, images = evaluation.get("limit"), evaluation.get("images_per_prompt")
    prompts = counted(limit, "test prompt") if is_finite_number(limit) else "every test prompt"
    if not is_finite_number(images):
        return f"{prompts} x each benchmark's images"
    return f"{prompts} x {counted(images, 'image')}"


def _budget(config: dict, method: str) -> Any:
    """A student method's configured optimizer steps (cascade: its stages' sum), or None."""
    section = config.get(method) if isinstance(config, dict) else None
    if not isinstance(section, dict):
        return None
    if method == "cascade":
        stages = section.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, list) and len(s) == 2 and is_finite_number(s[1]) for s in stages):
            return None
        return sum(s[1] for s in stages)
    return section.get("steps")


def check_listable(results: dict) -> None:
    """What a listing needs beyond a consistent file: a listed, unmodified preset, every student
    method finished, and their budgets matched. Checked against the run's own recorded settings,
    so that an entry made before the preset changed keeps its own table (``validate`` adds that a
    new submission is the installed preset's)."""
    preset = results.get("preset")
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    overrides = config.get("overrides")
    if overrides is not None and not is_string_list(overrides):
        raise SubmissionError(f"config['overrides'] is {overrides!r}; it must be the list of --set changes "
                              "`opd-bench run` records (empty for a listed run)")
    if overrides:
        raise SubmissionError(f"the run changed its {preset} preset with --set {' '.join(overrides)}; "
                              "the leaderboard ranks unmodified presets, rerun without --set to submit")
    if preset not in LISTED_PRESETS:
        raise SubmissionError(f"preset is {preset!r}; only {' or '.join(LISTED_PRESETS)} runs are listed (smoke runs "
                              "check the pipeline, their scores are not results), submit a --preset standard run (paper for real models)")
    compute = results.get("compute") if isinstance(results.get("compute"), dict) else {}
    budgets = {}
    for method in (m for m in STUDENT_METHODS if m in results["results"]):
        configured = _budget(config, method)
        steps = compute.get(method, {}).get("optimizer_steps") if isinstance(compute.get(method), dict) else None
        if not is_finite_number(configured) or steps != configured:
            raise SubmissionError(f"compute[{method!r}]['optimizer_steps'] is {steps!r} but config[{method!r}] trains {configured!r}; "
                                  f"submit a finished, unmodified --preset {preset} run (rerunning its command finishes it)")
        budgets[method] = configured
    if len(set(budgets.values())) > 1:
        listed = ", ".join(f"{method} {steps}" for method, steps in budgets.items())
        raise SubmissionError(f"the student methods train unmatched budgets ({listed} optimizer steps); the leaderboard "
                              f"compares matched budgets, submit an unmodified --preset {preset} run")


def validate(results: dict) -> None:
    """Raise ``SubmissionError`` (one line: the problem and the fix) unless ``results`` can be submitted:
    a consistent file of the current schema, of a listed preset with that preset's settings as installed."""
    check_results(results)
    if results["schema_version"] != SCHEMA_VERSION:
        raise SubmissionError(f"schema_version is {results['schema_version']!r}; submissions need version {SCHEMA_VERSION} "
                              "(per-image scores, adapter hashes and one evaluation noise seed, so they can be verified), re-run with this opd-bench")
    check_listable(results)
    changed = preset_differences(results)
    if changed:  # a hand-relabelled smoke run, or one made with another release (its entries keep their own table)
        raise SubmissionError(f"the run's settings are not the installed {results['preset']} preset's: {changed}; "
                              f"submit an unmodified --preset {results['preset']} run made with this opd-bench")


# --------------------------------------------------------------------------------------------
# Submitting


def check_name(name: Any) -> str:
    if isinstance(name, str) and name.lower().endswith(".json"):
        raise SubmissionError(f"submission name {name!r} ends in .json, which the stored file adds; "
                              f"pass --name {name[:-5] or 'NAME'}")
    if (not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name
            or "/" in name or "\\" in name or os.sep in name or WINDOWS_DEVICE.fullmatch(name)):
        raise SubmissionError(
            f"submission name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit, without '..' or path separators (e.g. --name opd-lr3e-4)"
        )
    return name


def _student_adapters(results: dict) -> set[str]:
    """The sha256 of every trained student adapter a result file names."""
    artifacts = results.get("artifacts") if isinstance(results.get("artifacts"), dict) else {}
    return {record["sha256"] for method in STUDENT_METHODS if isinstance(artifacts.get(method), dict)
            for record in artifacts[method].values() if isinstance(record, dict) and isinstance(record.get("sha256"), str)}


def _listed_as(folder: Path, results: dict) -> Path | None:
    """The stored submission in ``folder`` with the same per-image scores as ``results``, or a trained
    student adapter of it (its scores edited within verify's tolerance is still the same run), if any."""
    if not folder.is_dir():
        return None
    adapters = _student_adapters(results)
    for path in sorted(folder.glob("*.json")):
        try:
            stored = _load(path)
            if stored.get("per_image") == results.get("per_image") or adapters & _student_adapters(stored):
                return path
        except (SubmissionError, ValueError, OSError, AttributeError):  # an unreadable entry is listed as such by rebuild
            continue
    return None


def read_results(path: str | Path) -> dict:
    """Parse a result file, refusing it before reading when it is over ``MAX_FILE_BYTES``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise SubmissionError(f"cannot read {path} ({error.strerror}); pass a run directory with a results.json") from None
    if size > MAX_FILE_BYTES:
        raise SubmissionError(f"{path} is {size / 2**20:.1f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB cap for result "
                              "files that submit and verify read (a run with fewer seeds or a smaller eval_limit fits)")
    return _load(path)


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SubmissionError(f"cannot read {path} ({error.strerror}); pass a run directory with a results.json") from None
    except UnicodeDecodeError as error:
        raise SubmissionError(f"{path} is not UTF-8 text (byte {error.start}); "
                              "submit the results.json written by `opd-bench run`") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SubmissionError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); "
                              "submit the results.json written by `opd-bench run`") from None
    except RecursionError:
        raise SubmissionError(f"{path} nests too deeply to be a result file; "
                              "submit the results.json written by `opd-bench run`") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise SubmissionError(f"{path} holds a value Python cannot read ({str(error).splitlines()[0]}); "
                              "submit the results.json written by `opd-bench run`") from None


def _results_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".json" and run_dir.is_file() else run_dir / "results.json"


def submit(run_dir: str | Path, name: str, root: str | Path = "leaderboard", *, unverified: bool = False,
           verify: Callable[[Path], dict] | None = None) -> Path:
    """Validate and verify ``run_dir/results.json`` and store it as ``root/submissions/<suite>/<name>.json``.

    ``run_dir`` may also be the results file itself (its folder must hold the run's adapters).
    ``verify(run_dir) -> report`` re-evaluates a sample from the adapters (default:
    ``opd_bench.verify.verify_run``); a run whose report is not ``ok`` is refused, unless
    ``unverified``, which stores it without verifying for the separate, unranked unverified table.
    Nothing under ``root`` changes on a refusal. Run ``rebuild(root)`` (``opd-bench leaderboard``)
    afterwards to regenerate the tables.
    """
    check_name(name)
    path = _results_path(run_dir)
    if not path.is_file():
        raise SubmissionError(f"{path} does not exist; pass the run directory written by `opd-bench run --out`")
    results = read_results(path)
    validate(results)
    folder = Path(root) / "submissions" / results["suite"]
    target = folder / f"{name}.json"
    if folder.is_dir() and any(p.name.lower() == target.name.lower() for p in folder.iterdir()):
        raise SubmissionError(f"a submission named {name!r} already exists for suite {results['suite']!r} "
                              f"({target}); choose another --name")
    listed = _listed_as(folder, results)
    if listed is not None:
        raise SubmissionError(f"these results are already submitted as {listed.stem!r} ({listed}); a run is listed once "
                              f"(if the table lacks it, `opd-bench leaderboard` rebuilds the table; to replace that entry, "
                              f"e.g. an unverified one by a verified one, delete its file first)")
    verified = None
    if not unverified:
        if verify is None:
            from opd_bench.verify import verify_run as verify
        # a random salt: the unsalted sample is public and can be steered by changing adapter files
        report = verify(path.parent, salt=secrets.token_hex(8))
        if not report["ok"]:
            first = report["mismatches"][0]
            raise SubmissionError(
                f"{path.parent} does not verify: {len(report['mismatches'])} of {report.get('images_checked', '?')} scores of "
                "re-generated images differ from the recorded ones, e.g. "
                f"{first['model']} seed {first['seed']} {first['benchmark']} image {first['image']}: recorded "
                f"{first['recorded']}, now {first['recomputed']:.6g}; submit an unedited run, or pass --unverified "
                "to list it in the unverified table"
            )
        verified = {key: report.get(key) for key in ("prompts_per_benchmark", "images_checked", "tolerance", "salt")}
        verified["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {key: value for key, value in results.items() if key != "submission"}
    record["submission"] = {"name": name, "submitted": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "verified": verified}
    data = json_text(record, compact_lists=True).encode("utf-8")
    if len(data) > MAX_FILE_BYTES:
        raise SubmissionError(f"the stored submission would be {len(data) / 2**20:.1f} MiB, over the "
                              f"{MAX_FILE_BYTES / 2**20:.0f} MiB cap; submit the results.json written by `opd-bench run`")
    folder.mkdir(parents=True, exist_ok=True)
    # Publish without ever overwriting: write a temporary file, then hard-link it to the final name
    # (fails if the name appeared meanwhile); fall back to a checked rename where links are unsupported.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise SubmissionError(f"a submission named {name!r} already exists ({target}); choose another --name") from None
        except OSError:
            if target.exists():
                raise SubmissionError(f"a submission named {name!r} already exists ({target}); choose another --name") from None
            os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# Rebuilding the tables


def _method_key(method: str) -> tuple:
    if method in METHOD_ORDER:
        return (0, METHOD_ORDER.index(method), method)
    return (1, 0, method)


def _f(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if is_finite_number(value) else ""


def _status(results: dict) -> str:
    """verified (re-evaluated by `submit`), unverified (submitted with --unverified) or legacy (schema 1)."""
    if results["schema_version"] < 2:
        return "legacy"
    submission = results.get("submission")
    return "verified" if isinstance(submission, dict) and isinstance(submission.get("verified"), dict) else "unverified"


def _rows(root: Path) -> tuple[list[dict], list[str], dict[str, list[str]]]:
    """Rows for every valid submission, the benchmark columns per suite, and skipped files with reasons."""
    rows: list[dict] = []
    skipped: list[str] = []
    bench_by_suite: dict[str, list[str]] = {}
    entries = sorted((root / "submissions").glob("*/*.json"))
    for path in sorted(p for p in (root / "submissions").rglob("*") if p.is_file() and p not in entries):
        if not path.name.startswith("."):  # a file in the wrong place would be left out without a word
            skipped.append(f"{path.relative_to(root).as_posix()}: not an entry; entries are submissions/<suite>/<name>.json")
    for path in entries:
        where = path.relative_to(root).as_posix()
        try:
            results = read_results(path)
            check_results(results)
            check_listable(results)
            if results["suite"] != path.parent.name:
                raise SubmissionError(f"suite {results['suite']!r} does not match its folder {path.parent.name!r}")
        except SubmissionError as error:
            skipped.append(f"{where}: {error}")
            continue
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
            # a file no validation foresaw must not stop the rebuild of every other entry
            skipped.append(f"{where}: does not validate ({type(error).__name__}: {error})")
            continue
        name = path.stem
        benches = list(results["benchmarks"])
        columns = bench_by_suite.setdefault(results["suite"], [])
        columns += [b for b in benches if b not in columns]
        compute = results.get("compute") if isinstance(results.get("compute"), dict) else {}
        current = not preset_differences(results)  # made with the installed preset
        for method in sorted(results["results"], key=_method_key):
            scores = results["results"][method]
            budget = compute.get(method, {})
            forwards = total_forwards(budget)
            first = scores[benches[0]]
            seeds = first.get("seeds") or (results["seeds"] if len(first["per_seed"]) == len(results["seeds"]) else results["seeds"][:1])
            rows.append({
                "submission": name,
                "method": method,
                "kind": "student" if method in STUDENT_METHODS else "reference",
                "status": _status(results),
                "preset": results["preset"],
                "configuration": configuration_id(results),
                "settings": _flat(preset_settings(results)),
                "evaluation": _evaluation(results),
                "model": _model_label(results),
                "suite": results["suite"],
                "overall": sum(scores[b]["mean"] for b in results["headline"]) / len(results["headline"]),
                "overall_std": _overall_sd([scores[b]["per_seed"] for b in results["headline"]]),
                "scores": {b: (scores[b]["mean"], scores[b]["std"]) for b in benches if b in scores},
                "optimizer_steps": budget.get("optimizer_steps") if is_finite_number(budget.get("optimizer_steps")) else None,
                "forward_passes": forwards,
                "seeds": " ".join(str(s) for s in seeds),
                "date": str(results.get("date") or ""),
                "current": current,
            })
    # Sort: verified first, suite, preset, the configuration, overall descending (rounded, so ties
    # are exact and stable), submission, method. The installed preset's configuration comes first,
    # then the others by their latest run (a run made later with an older release does not take the
    # top table). Only verified student rows are ranked, within their suite, preset and configuration.
    latest: dict[tuple, tuple[bool, str]] = {}
    for r in rows:
        latest[_group(r)] = max(latest.get(_group(r), (False, "")), (r["current"], r["date"]))
    newest_first = {group: i for i, group in enumerate(sorted(latest, key=lambda g: (latest[g], g), reverse=True))}
    rows.sort(key=lambda r: (r["status"] != "verified", r["suite"], r["preset"], newest_first[_group(r)],
                             -round(r["overall"], 9), r["submission"], _method_key(r["method"])))
    _rank(rows)
    return rows, skipped, bench_by_suite


def _rank(rows: list[dict]) -> None:
    """Set ``rank`` on the verified student rows (sorted: overall descending within a group): one
    more than the rows clearly above, and never above a row scored higher (a wide seed spread low
    in the table would otherwise jump it)."""
    ranked = [r for r in rows if r["status"] == "verified" and r["kind"] == "student"]
    last: dict[tuple, int] = {}
    for r in ranked:
        clearly = 1 + sum(1 for o in ranked if _group(o) == _group(r) and _clearly_above(o, r))
        r["rank"] = last[_group(r)] = max(clearly, last.get(_group(r), 1))


def _overall_sd(per_seed: list[list[float]]) -> float | None:
    """The sd over seeds of the per-seed overall score (None for one seed)."""
    return mean_sd([sum(values) / len(values) for values in zip(*per_seed)])[1]


def _clearly_above(a: dict, b: dict) -> bool:
    """``a``'s overall above ``b``'s by more than the larger of their seed sds: a smaller difference
    is one the seeds cannot tell, and the two share a rank (without seeds, any difference counts)."""
    spread = max((v for v in (a["overall_std"], b["overall_std"]) if v is not None), default=0.0)
    return round(a["overall"] - b["overall"], 9) > round(spread, 9)


def _group(row: dict) -> tuple[str, str, str, str]:
    """What a rank is within: scores compare only inside one suite, preset, configuration and base
    model (with its precision): another base is another experiment."""
    return row["suite"], row["preset"], row["configuration"], row["model"]


def _csv(rows: list[dict], bench_by_suite: dict[str, list[str]]) -> bytes:
    benches: list[str] = []
    for columns in bench_by_suite.values():
        benches += [b for b in columns if b not in benches]
    header = ["rank", "status", "submission", "method", "kind", "model", "suite", "preset", "configuration", "overall"]
    for b in benches:
        header += [f"{b}_mean", f"{b}_std"]
    header += ["optimizer_steps", "forward_passes", "seeds", "date", "overall_std"]  # added last: columns keep their places
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [r.get("rank", ""), r["status"], r["submission"], r["method"], r["kind"], r["model"], r["suite"],
                r["preset"], r["configuration"], _f(r["overall"])]
        for b in benches:
            mean, std = r["scores"].get(b, (None, None))
            line += [_f(mean), _f(std)]
        line += ["" if r["optimizer_steps"] is None else str(int(r["optimizer_steps"])),
                 "" if r["forward_passes"] is None else str(int(round(r["forward_passes"]))), r["seeds"], r["date"],
                 _f(r["overall_std"])]
        writer.writerow(line)
    return buffer.getvalue().encode("utf-8")


HEADER = """# opd-bench leaderboard

DiffusionOPD (`opd`), its PPO-style variant (`opd-ppo`), multi-reward RL and cascade RL, trained by
`opd-bench run --method all` and evaluated on the suite's held-out test prompts.

**How entries are made.** Run the benchmark (preset `standard`, or `paper` for real models; smoke
runs are refused), then submit its run directory and regenerate this page:

```bash
opd-bench run --method all --out runs/NAME
opd-bench submit runs/NAME --name NAME
opd-bench leaderboard
```

**How entries are checked.** `submit` accepts a `results.json` (schema version 3, at most 2 MiB)
only if its suite and suite version are installed, the sha256 of every prompt file (test and train)
matches the installed suite, a run of a shipped base (`tiny`) used the installed base's weights (its
recorded fingerprint: a new release's base makes older entries no longer valid), every method
reports every benchmark of the suite, every score is finite and in range ([0, 1], except the
unbounded learned `pref` score), every per-seed score is the suite's aggregate of the recorded
per-image scores and every mean and std those of the per-seed scores, and the run's recorded
settings are those of the installed `standard` or `paper` preset (a run made with another release,
or relabelled, is refused). It then **verifies** the run (`opd-bench
verify RUN_DIR`): it checks the sha256 of every trained adapter in the run folder, regenerates 8
test prompts per benchmark (chosen by a hash of the run's identity and adapter hashes) for every
model and seed with the recorded seeds and sampler settings, scores them and compares every image
with its recorded score (within 1e-3, plus 1e-3 of the score for the unbounded preference score; among 8 or more images of a model,
seed and benchmark scored through detections or OCR reads, one may differ by a decision flipped
by float rounding, for strict GenEval only from 0 to 1 or back). Runs that do not verify are refused; `submit
--unverified` lists them, unranked, in the separate unverified table. Names are 1-64 letters,
digits, `.`, `_` or `-`, starting with a letter or digit, without `..`; an existing name is never
overwritten, and a run already listed (the same per-image scores, or a trained student adapter
of it) is refused under another name. Files under `submissions/` that no longer validate (e.g.
after a suite update) or cannot be read are listed at the end instead.

**What verification does not prove.** The sample is drawn from the run's own adapters, so scores
cannot be edited without changing images that may be re-checked. `submit` draws it with a random
salt (recorded in the entry); without one anyone can compute the sample, and a submitter could
steer it by changing an adapter folder's files. The submitter's own salt can be drawn again until a
sample passes, so only a maintainer's salt is independent: a maintainer re-checks an entry with the
submitter's run folder and `opd-bench verify RUN_DIR --salt ANYTHING --prompts 32`, and the adapter
hashes in the entry tie it to those weights. On the benchmarks scored through detections or OCR
reads, one differing image per model, seed and benchmark is excused as a flipped decision. The training budget is checked against the preset's configuration, not
re-trained: compute beyond the declared budget cannot be detected, and the `forwards` column is
the run's own count, not re-counted. The seeds are the submitter's
(the `seeds` column lists them; the presets' default is 0, 1, 2): a run of one seed is ranked beside
runs of three.

**Columns.** `model` is the base model, with its precision where a run loaded it in another than
float32 (`--dtype`; the default on a GPU is bfloat16). `overall` is the mean of the suite's headline benchmarks (each in [0, 1]); benchmark
cells are mean ± std over seeds (the mean alone for a single seed); `steps` are student optimizer steps and `forwards` transformer
forward passes (student + teacher + the frozen reference of a KL penalty) of one run (mean over seeds; teachers' training is listed in the
teacher rows). Verified student methods are ranked by `overall` (± its sd over seeds) within their suite, preset, `model` and
**configuration**: a short hash of the settings the preset had when the run was made (bookkeeping
such as checkpoint frequency aside). A preset's settings change between releases (the evaluation's
size, a learning rate, a KL penalty), and runs made under other settings are other experiments,
so each configuration (and each base model) has a table of its own, the installed preset's first (then by their latest
run), and each other one says which settings differ from the first; `base` and
`teacher/*` rows are references (no rank). A rank counts the entries clearly above: one whose
`overall` is higher by more than the larger of the two seed sds; entries closer than that share a
rank, since their seeds cannot tell them apart (three seeds give a rough sd, so a shared rank is
"not shown different", not "equal"); no entry ranks above one with a higher `overall`. Machine-readable copy: [`leaderboard.csv`](leaderboard.csv).
"""


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict], benches: list[str], ranked: bool) -> str:
    header = (["rank"] if ranked else ["status"]) + ["submission", "method", "model", "preset", "overall"] + benches
    header += ["steps", "forwards", "seeds", "date"]
    text = ("submission", "method", "model", "preset", "seeds", "date", "status")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h in text else "---:" for h in header) + "|"]
    for r in rows:
        cells = [str(r.get("rank", "")) if ranked else r["status"], r["submission"],
                 r["method"] if r["kind"] == "student" else f"*{r['method']}*", r["model"], r["preset"],
                 f"{r['overall']:.3f}" + ("" if r["overall_std"] is None else f" ± {r['overall_std']:.3f}")]
        single = len(r["seeds"].split()) == 1  # one seed has no spread to show (base and teachers)
        for b in benches:
            mean, std = r["scores"].get(b, (None, None))
            cells.append("" if mean is None else f"{mean:.3f}" if single else f"{mean:.3f} ± {std:.3f}")
        cells += ["" if r["optimizer_steps"] is None else f"{int(r['optimizer_steps']):,}",
                  "" if r["forward_passes"] is None else f"{int(round(r['forward_passes'])):,}",
                  r["seeds"], r["date"][:10]]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _readme(rows: list[dict], skipped: list[str], bench_by_suite: dict[str, list[str]]) -> bytes:
    out = [HEADER]
    verified = [r for r in rows if r["status"] == "verified"]
    if not verified:
        out.append("No verified submissions yet.\n")
    newest: dict[tuple[str, str, str], dict] = {}
    for group in dict.fromkeys(_group(r) for r in verified):  # rows are sorted: newest configuration first
        suite, preset, configuration, model = group
        rows_of = [r for r in verified if _group(r) == group]
        dates = sorted(r["date"][:10] for r in rows_of)
        count = len({r["submission"] for r in rows_of})
        out.append(f"## Suite `{suite}`, preset `{preset}`, configuration `{configuration}`, model `{model}`\n")
        line = (f"Final evaluation: {rows_of[0]['evaluation']} per benchmark; {count} submission"
                f"{'s' if count > 1 else ''}, {dates[0]}" + ("" if dates[0] == dates[-1] else f" to {dates[-1]}") + ".")
        latest = newest.setdefault((suite, preset, model), rows_of[0])
        if latest is not rows_of[0]:
            line += (f" An older setting of the preset; against `{latest['configuration']}`: "
                     + settings_changed(rows_of[0]["settings"], latest["settings"]) + ".")
        out.append(line + "\n")
        out.append(_table(rows_of, bench_by_suite[suite], True))
    others = [r for r in rows if r["status"] != "verified"]
    if others:
        out.append("## Unverified (not ranked)\n")
        out.append("Scores as submitted, not re-evaluated: `unverified` entries were submitted with `--unverified`; "
                   "`legacy` entries are schema-1 result files from before verification existed (no per-image scores "
                   "or adapter hashes), kept until a new run replaces them.\n")
        for suite in sorted({r["suite"] for r in others}):
            out.append(f"### Suite `{suite}`\n")
            out.append(_table([r for r in others if r["suite"] == suite], bench_by_suite[suite], False))
    if skipped:
        out.append("## Not listed (no longer valid)\n")
        out.append("\n".join(f"- {_md(s)}" for s in skipped) + "\n")
    return "\n".join(out).encode("utf-8")


def rebuild(root: str | Path = "leaderboard") -> tuple[Path, Path]:
    """Regenerate ``root/README.md`` and ``root/leaderboard.csv`` from ``root/submissions``."""
    root = Path(root)
    if not (root / "submissions").is_dir():
        raise FileNotFoundError(f"{root} has no submissions/ folder; pass --root of a leaderboard directory "
                                "(`opd-bench submit` starts one)")
    rows, skipped, bench_by_suite = _rows(root)
    readme, table = root / "README.md", root / "leaderboard.csv"
    atomic_write_bytes(table, _csv(rows, bench_by_suite))
    atomic_write_bytes(readme, _readme(rows, skipped, bench_by_suite))
    return readme, table
