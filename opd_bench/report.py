"""Turn a run directory (``results.json`` + sample grids) into ``report.md`` and a self-contained ``index.html``.

``build_report(run_dir, out_dir)`` reads only the run directory (and, for the standard error of a
GenEval gain, which test prompt has which tag, from the installed suite when it is the run's). Every section is optional: a run
with only some methods (or without curves, variance experiment, cascade or samples) gets a note
where a section has nothing to show, never a crash. Plots are drawn with matplotlib's Agg canvas
(no pyplot, no global backend switch) and seaborn; they are written next to the report and
embedded in the HTML as base64 PNGs, so ``index.html`` can be mailed or archived on its own.
Heavy imports (matplotlib, seaborn, pandas) happen inside functions.

The parts: ``results_view`` reads the file, ``findings`` checks the paper's claims against it,
``report_doc`` renders the blocks to Markdown and HTML; this module lays out the sections and plots.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

from opd_bench.findings import findings_lines
from opd_bench.io import atomic_write_bytes
from opd_bench.result_schema import EVAL_NOT_RUN, is_eval_result, paired_evaluation, schema_problem, total_forwards
from opd_bench.report_doc import Cell, Doc, render_html, render_markdown, safe_name
from opd_bench.results_view import (
    ResultView, as_dict, as_list, counted, fmt, fmt_g, fmt_int, is_student, mean_sd, method_key, num, spread_text,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXED_COLOURS = {
    "base": "#7f7f7f",
    "teacher/geneval": "#8c564b",
    "teacher/ocr": "#e377c2",
    "teacher/pref": "#bcbd22",
    "opd": "#1f77b4",
    "opd-ppo": "#ff7f0e",
    "multi-reward": "#2ca02c",
    "cascade": "#d62728",
}
SPARE_COLOURS = ("#9467bd", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
DPI = 110
# The PNGs a report writes: these plots, one curves_<benchmark> plot per headline benchmark and one
# samples_<method> grid per method. A rebuild removes those of them it no longer writes, no other file.
FIXED_PLOTS = ("gradient_variance.png", "variance_ratio.png", "cascade_forgetting.png")
SECTION_TITLES = {
    "findings": "Findings",
    "scores": "Final scores",
    "curves": "Convergence",
    "grad": "Gradient variance during training",
    "variance": "Variance experiment: PPO-style vs analytic gradient",
    "cascade": "Cascade forgetting",
    "samples": "Samples",
    "compute": "Compute",
    "details": "Run details",
}


def palette(methods: Iterable[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * 10)
    for method in sorted(set(methods), key=method_key):
        colours[method] = FIXED_COLOURS.get(method) or next(spare)
    return colours


# --------------------------------------------------------------------------------------------
# Plot helpers


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _seed_label(n_seeds: int) -> str:
    return "band: ±1 sd over seeds" if n_seeds > 1 else "single seed, no band"


def _seed_counts(counts: dict[str, int], n_seeds: int) -> str:
    """'; multi-reward: 1 seed, no band' for each method whose lines are over another number of seeds
    than ``n_seeds`` (the one the label beside it speaks of); nothing where every method has it."""
    return "".join(f"; {m}: {counted(n, 'seed')}" + (", no band" if n == 1 else "")
                   for m, n in counts.items() if n != n_seeds)


def _is_report_png(name: str) -> bool:
    return name in FIXED_PLOTS or (name.endswith(".png") and name.startswith(("curves_", "samples_")))


# --------------------------------------------------------------------------------------------
# The report


def _reference_levels(frame, bench: str, teacher: str | None) -> tuple[float | None, float | None]:
    """On the curves' own prompts and noise: the teacher's score at its last curve evaluation (mean
    over its seeds) and the base's, which is every run's step-0 evaluation (a fresh adapter adds
    zeros). Not the final table's scores, which come from a larger evaluation."""
    if frame.empty or bench not in frame:
        return None, None
    scored = frame[frame[bench].notna()]
    start = scored[scored["step"] == 0][bench]
    own = scored[scored["method"] == teacher] if teacher else scored.iloc[:0]
    last = own[own["step"] == own.groupby("seed")["step"].transform("max")][bench]
    return (float(last.mean()) if len(last) else None), (float(start.mean()) if len(start) else None)


class _Report(ResultView):
    def __init__(self, run_dir: Path, out_dir: Path, results: dict) -> None:
        super().__init__(results)
        self.run_dir = run_dir
        self.out_dir = out_dir
        self.doc = Doc()
        self.files: dict[str, bytes] = {}  # name (relative to out_dir) -> content
        every = set(self.methods) | set(as_dict(results.get("curves"))) | set(as_dict(results.get("compute")))
        every |= set(as_dict(results.get("gradient_variance"))) | set(as_dict(as_dict(results.get("samples")).get("grids")))
        self.colours = palette(every)

    def curve_size(self) -> str:
        """How many test prompts the curves score, where the file says."""
        size, final = self.curve_evaluation(), self.final_size()
        if size is None:
            return "The curves' evaluation uses fewer test prompts than the final one"
        return (f"The curves score {counted(size[0], 'test prompt')} x {counted(size[1], 'image')} per "
                "benchmark" + ("" if final is None else f" (the final evaluation: {final})"))

    def section(self, key: str, builder) -> None:
        self.doc.h(2, SECTION_TITLES[key])
        try:
            builder()
        except Exception as error:  # a malformed part must not sink the whole report
            self.doc.note(f"This section could not be built ({type(error).__name__}: {error}).")

    def add_plot(self, name: str, fig, caption: str) -> None:
        png = _png(fig)
        self.files[name] = png
        self.doc.img(name, png, caption)

    # -- sections --
    def findings(self) -> None:
        self.doc.p("The paper's claims checked against this run's result file (± is the sd over seeds where a line "
                   "does not say otherwise).")
        self.doc.list(findings_lines(self))

    def header(self) -> None:
        r = self.r
        self.doc.h(1, report_title(self.run_dir.name))
        seeds = ", ".join(str(s) for s in as_list(r.get("seeds"))) or "n/a"
        self.doc.list([
            f"suite: {r.get('suite', 'n/a')} ({r.get('suite_version', 'n/a')}), model: {r.get('model', 'n/a')}, "
            f"preset: {r.get('preset', 'n/a')}" + "".join(f", --set {o}" for o in as_list(as_dict(r.get("config")).get("overrides"))),
            f"seeds: {seeds}" + (" (of every student method; the base and each teacher are one model each)"
                                 if any(m.startswith("teacher/") for m in self.methods) else ""),
            f"date: {r.get('date', 'n/a')}, opd-bench {r.get('package_version', 'n/a')}, "
            f"commit: {r.get('git_commit') or 'n/a'}",
            f"benchmarks: {', '.join(self.benchmarks) or 'n/a'}; overall = mean of {', '.join(self.headline) or 'n/a'}"
            + "".join(f"; {line}" for line in self.benchmark_descriptions()),
            self.evaluation_line(),
            *self.time_line(),
        ])

    def benchmark_descriptions(self) -> list[str]:
        """What each benchmark is, from the installed suite where it is the run's (none otherwise)."""
        from opd_bench import rewards, suites

        try:
            suite = suites.get(str(self.r.get("suite")))
            if suite.version != self.r.get("suite_version"):
                return []
            lines = []
            for task in suite.tasks:
                spec = suite.benchmark(task)
                lines.append(f"{task}: {spec.description}")
                lines += [f"{name}: {rewards.REGISTRY.help(reward)}" for name, reward in spec.extra_rewards.items()]
            return [line for line in lines if not line.endswith(": ")]
        except Exception:  # another or an unconfigured suite: the names alone
            return []

    def time_line(self) -> list[str]:
        """The wall time of the command that wrote the file, and on what (none where not recorded)."""
        seconds, env = num(self.r.get("seconds")), as_dict(self.r.get("environment"))
        if seconds is None:
            return []
        jobs, threads, processes = num(env.get("jobs")), num(env.get("threads")), num(env.get("processes"))
        on = "" if jobs is None or threads is None else (
            f", {round(jobs)} job{'s' if jobs != 1 else ''} x {round(threads)} thread{'s' if threads != 1 else ''}")
        on += f", {round(processes)} processes (data-parallel)" if processes is not None and processes > 1 else ""
        return [f"wall time: {seconds / 60:.1f} min ({env.get('device', 'n/a')}{on}; the command that wrote "
                "this file: a resumed run's earlier invocations are not in it)"]

    def final_size(self) -> str | None:
        """'160 test prompts x 2 images' per benchmark of the final evaluation, as the file's config records it."""
        record = as_dict(as_dict(self.r.get("config")).get("eval"))
        if not record:
            return None
        limit, images = record.get("limit"), record.get("images_per_prompt")
        prompts = "every test prompt" if limit is None else counted(limit, "test prompt")
        per_prompt = "each benchmark's own images" if images is None else counted(images, "image")
        return f"{prompts} x {per_prompt}"

    def evaluation_line(self) -> str:
        """How the final scores were sampled: prompts, images and the noise seed."""
        size = self.final_size()
        if size is None:
            return "final evaluation: settings not recorded"
        record = as_dict(as_dict(self.r.get("config")).get("eval"))
        noise = (f"noise seed {record['seed']} for every model, so all are scored on the same starting noise"
                 if paired_evaluation(self.r) else "each cell's training seed as noise seed")
        return f"final evaluation: {size} per benchmark, {noise}"

    def scores(self) -> None:
        if not self.methods:
            self.doc.note("results.json has no final scores.")
            return
        self.doc.p(
            "Final evaluation on the test prompts: mean ± standard deviation over seeds (no ± where a "
            "method has a single value). Bold marks the best row in each column among all rows, "
            "teachers and base included; ★ marks the best student method (DiffusionOPD, its PPO-style "
            "variant, multi-reward or cascade RL) in each column. "
            f"'overall' is the mean of the headline benchmarks ({', '.join(self.headline)}), each in [0, 1]; "
            "pref is a preference model's score, unbounded, higher is better (the tiny suite's learned "
            "preference model, PickScore on real models)."
        )
        columns = self.benchmarks + ["overall"]
        cells = {m: {c: self.score_cell(m, c) for c in columns} for m in self.methods}  # (mean, sd, seeds)
        # a student cell over another number of seeds than the most any student cell has says how many
        # (the base and the teachers are one model each, as the header says)
        most = max((n for m in self.methods if is_student(m) for _, _, n in cells[m].values()), default=0)
        odd = {(m, c) for m in self.methods if is_student(m) for c in columns if 0 < cells[m][c][2] != most}
        if odd:
            self.doc.p(f"A student method's cell over fewer seeds than the others' {most} says how many "
                       "(one seed: no ±).")

        def printed(method: str, column: str) -> float | None:  # best and ★ are judged on the value as printed: ties alike
            mean = num(cells[method][column][0])  # None for a missing or non-finite mean, which fmt prints as n/a
            return None if mean is None else float(fmt(mean))

        best_all, best_student = {}, {}
        for column in columns:
            finite = [(printed(m, column), m) for m in self.methods if printed(m, column) is not None]
            if finite:
                best_all[column] = max(v for v, _ in finite)
            students = [v for v, m in finite if is_student(m)]
            if students:
                best_student[column] = max(students)
        rows = []
        for m in self.methods:
            row: list[Any] = [Cell(m)]
            for column in columns:
                mean, sd, n = cells[m][column]
                text = spread_text(mean, sd, n if (m, column) in odd else None)
                value = printed(m, column)
                if value is not None and is_student(m) and value == best_student.get(column):
                    text += " ★"
                row.append(Cell(text, bold=value is not None and value == best_all.get(column)))
            rows.append(row)
        self.doc.table(["method"] + columns, rows)

        per_tag = as_dict(self.r.get("per_tag"))
        tags = sorted({t for m in per_tag for t in as_dict(as_dict(per_tag[m]).get("geneval"))})
        if tags:
            self.doc.h(3, "GenEval accuracy per tag")
            self.doc.p("Accuracy per GenEval tag in the final evaluation: a student method's is the mean over its "
                       "seeds, no spread shown; the base and the teachers are one model each.")
            rows = []
            for m in sorted(per_tag, key=method_key):
                by_tag = as_dict(as_dict(per_tag[m]).get("geneval"))
                rows.append([m] + [fmt(by_tag.get(t)) for t in tags])
            self.doc.table(["method"] + tags, rows)


    def curves(self) -> None:
        import seaborn as sns

        curves = as_dict(self.r.get("curves"))
        methods = sorted((m for m in curves if is_student(m) and as_dict(curves[m])), key=method_key)
        if not methods:
            self.doc.note("No training curves in results.json (no student method logged periodic evaluations).")
            return
        # every logged curve (teachers' too, for their reference lines), built once; the plotted lines are the students'
        every = self.curves_frame(sorted(curves, key=method_key))
        frame = every[every["method"].isin(methods)] if not every.empty else every
        n_seeds = max(len(as_dict(curves[m])) for m in methods)
        self.doc.p(
            "Score on the test prompts during training, per headline benchmark, against student optimizer "
            "steps (left) and against transformer forward passes, student plus teacher plus the frozen reference "
            "of a KL penalty (right); the second axis charges DiffusionOPD and its PPO-style variant for querying "
            "the teachers and GRPO methods for their KL reference, but not for the teachers' own training, which "
            "DiffusionOPD needs first (see Compute). Lines are the mean "
            f"over seeds ({_seed_label(n_seeds)}{_seed_counts({m: len(as_dict(curves[m])) for m in methods}, n_seeds)}). "
            f"{self.curve_size()}, so their scores, and even which model is "
            "above another, can differ from the final table's; the reference lines are on the curves' own prompts "
            "and noise: dashed, the teacher of that benchmark's task at the end of its training (for an evaluation-only "
            "score such as pref_oracle, the teacher of the task it belongs to, trained on that task's reward); dotted "
            "grey, the base model (every run's step 0)."
        )
        drawn = 0
        for bench in self.headline:
            if frame.empty or bench not in frame or frame[bench].notna().sum() == 0:
                self.doc.note(f"No curve values for {bench}.")
                continue
            data = frame[frame[bench].notna()].copy()
            # The forwards axis takes only rows with forward counts (a row without has no x there), aligned
            # across seeds: per (method, step), the mean forward count.
            counted_rows = data[data["forwards"].notna()].copy()
            counted_rows["forwards_mean"] = counted_rows.groupby(["method", "step"])["forwards"].transform("mean")
            present = sorted(data["method"].unique(), key=method_key)
            teacher_name = self.teacher_for(bench)
            teacher, base = _reference_levels(every, bench, teacher_name)
            fig, axes = _figure(12.5, 4.6, ncols=2)
            for ax, part, x, xlabel in ((axes[0], data, "step", "student optimizer steps"),
                                        (axes[1], counted_rows, "forwards_mean",
                                         "transformer forward passes (student + teacher + reference)")):
                shown = [m for m in present if m in set(part["method"])]
                if shown:
                    sns.lineplot(data=part, x=x, y=bench, hue="method", hue_order=shown,
                                 palette={m: self.colours[m] for m in shown}, errorbar="sd",
                                 marker="o", markersize=4, ax=ax)
                if teacher is not None:
                    ax.axhline(teacher, ls="--", lw=1.4, color=self.colours[teacher_name],
                               label=f"{teacher_name} (end of training)")
                if base is not None:
                    ax.axhline(base, ls=":", lw=1.2, color=self.colours.get("base", "#777"), label="base")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("score (0-1)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, loc="best")
            axes[0].set_title(f"{bench}: score vs optimizer steps")
            axes[1].set_title(f"{bench}: score vs forward passes")
            self.add_plot(f"curves_{safe_name(bench, self.headline)}.png", fig,
                          self._curve_caption(bench, curves, methods, data, n_seeds))
            drawn += 1
        if not drawn:
            self.doc.note("The curves carry no headline benchmark values.")

    def _curve_caption(self, bench: str, curves: dict, methods: list[str], data, n_seeds: int) -> str:
        """A convergence plot's caption; it names what the mean over seeds leaves out on this benchmark: a
        student method or a seed without values on it, a method over fewer seeds, rows without forward counts."""
        seeds = {m: [str(s) for s in as_dict(curves[m])] for m in methods}  # the seeds each method logged
        valued = {m: [s for s in seeds[m] if s in set(data[data["method"] == m]["seed"])] for m in methods}
        counts = {m: len(valued[m]) for m in methods if valued[m]}
        caption = f"{bench}: convergence (mean over seeds; {_seed_label(n_seeds)}{_seed_counts(counts, n_seeds)})"
        absent = [m for m in methods if not valued[m]]
        absent += [f"{m} seed {s}" for m in counts for s in seeds[m] if s not in valued[m]]
        if absent:
            caption += f". No {bench} values from {', '.join(absent)}"
        for m in counts:
            missing = data[data["method"] == m]["forwards"].isna()
            if missing.all():
                caption += f". {m} has no forward counts: not on the forward-pass panel"
            elif missing.any():
                caption += f". {m} lacks forward counts at some evaluations, left out of the forward-pass panel there"
        return caption

    def grad(self) -> None:
        import pandas as pd
        import seaborn as sns

        source = as_dict(self.r.get("gradient_variance"))
        records = []
        for method in sorted(source, key=method_key):
            for seed, rows in as_dict(source[method]).items():
                for row in as_list(rows):
                    row = as_dict(row)
                    step = num(row.get("step"))
                    for key in ("grad/variance", "grad/variance_rel"):
                        value = num(row.get(key))
                        if step is not None and value is not None and value > 0:
                            records.append({"method": method, "seed": str(seed), "step": step,
                                            "metric": key, "value": value})
        if not records:
            self.doc.note("No gradient-variance logs in results.json.")
            return
        frame = pd.DataFrame.from_records(records)
        self.doc.p(
            "Variance of the gradient estimate within each optimizer step, logged during training (log scale): "
            "the trace of the covariance of the step's micro-batch gradients, each rescaled to a whole-batch "
            "estimate. Left: total variance; right: relative to the squared norm of the step's mean gradient. "
            "A step whose gradient is all noise gives a relative value near the number of micro-batches it pools, "
            "one with a consistent direction less; DiffusionOPD's micro-batches are its tasks' batches, so its "
            "value also measures how far the tasks' gradients disagree. Line: mean over seeds; band: min-max over seeds."
            + self._unlogged_note(frame)
        )
        present = sorted(frame["method"].unique(), key=method_key)
        fig, axes = _figure(12.5, 4.4, ncols=2)
        titles = {"grad/variance": ("gradient variance", "variance (log scale)"),
                  "grad/variance_rel": ("relative gradient variance", "variance / ||mean gradient||² (log scale)")}
        for ax, key in zip(axes, ("grad/variance", "grad/variance_rel")):
            part = frame[frame["metric"] == key]
            if part.empty:
                ax.set_axis_off()
                ax.set_title(f"{titles[key][0]}: not logged")
                continue
            sns.lineplot(data=part, x="step", y="value", hue="method", hue_order=[m for m in present if m in set(part["method"])],
                         palette=self.colours, errorbar=("pi", 100), ax=ax)
            ax.set_yscale("log")
            ax.set_xlabel("student optimizer steps")
            ax.set_ylabel(titles[key][1])
            ax.set_title(f"{titles[key][0]} during training")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        self.add_plot("gradient_variance.png", fig, "Gradient variance over training, per method (log y)")

    def _unlogged_note(self, frame) -> str:
        """The student methods the plot leaves out (a step of one micro-batch has no variance to log)."""
        missing = [m for m in self.methods if is_student(m) and m not in set(frame["method"])]
        return (f" Not drawn: {', '.join(missing)} (no within-step variance in the file: a method whose every "
                "step is one micro-batch, as multi-reward and cascade RL in the standard presets, has none to log)."
                if missing else "")

    def variance(self) -> None:
        import pandas as pd
        import seaborn as sns

        variance = as_dict(self.r.get("variance"))
        rows = [as_dict(r) for r in as_list(variance.get("rows"))]
        if not rows:
            self.doc.note("No variance experiment in results.json.")
            return
        reference = as_dict(variance.get("reference"))
        ratio = num(variance.get("ratio_ppo_over_analytic"))
        self.doc.p(
            "Same student, teacher and states; the gradient of the per-step KL is estimated either "
            "analytically (DiffusionOPD's mean matching) or with the PPO-style sampled log-ratio reward. "
            "The student is a fresh adapter (the base model), the prompts the teacher task's training prompts, "
            "one seed; each setting draws `repeats` independent batches. The ratio is the PPO-style estimator's "
            "variance over the analytic one's (above 1: the analytic gradient is less noisy); 'rel. var' is an "
            "estimator's variance over the squared norm of its mean gradient (near `repeats` or above: its mean "
            "is not resolved from noise), and 'cosine of means' the cosine between the two estimators' mean "
            "gradients (near 1 where both are resolved and estimate the same gradient)."
            + (f" Teacher: the {variance['teacher_task']} teacher." if isinstance(variance.get("teacher_task"), str) else "")
            + (f" At the reference setting (batch {reference.get('batch', 'n/a')}, noise level "
               f"{reference.get('noise_level', 'n/a')}) the ratio is {fmt_g(ratio)}." if ratio is not None else "")
        )
        records = []
        for row in rows:
            batch, level, value = num(row.get("batch")), num(row.get("noise_level")), num(row.get("ratio_ppo_over_analytic"))
            if batch is not None and level is not None and value is not None and value > 0:
                records.append({"batch": batch, "noise level": f"{level:g}", "ratio": value})
        if records:
            frame = pd.DataFrame.from_records(records)
            levels = sorted(frame["noise level"].unique(), key=float)
            fig, (ax,) = _figure(7.5, 4.6)
            sns.lineplot(data=frame, x="batch", y="ratio", hue="noise level", hue_order=levels,
                         marker="o", errorbar=None, ax=ax)
            ax.axhline(1.0, ls="--", lw=1, color="#555", label="equal variance")
            ax.set_yscale("log")
            if frame["batch"].min() > 0 and frame["batch"].nunique() > 1:
                from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_locator(FixedLocator(sorted(frame["batch"].unique())))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("batch size (samples per gradient estimate)")
            ax.set_ylabel("variance ratio PPO-style / analytic (log scale)")
            ax.set_title("Gradient variance: PPO-style over analytic, per SDE noise level")
            ax.grid(alpha=0.3, which="both")
            ax.legend(title="noise level", fontsize=8)
            self.add_plot("variance_ratio.png", fig, "Variance ratio PPO-style / analytic vs batch size (log y)")
        else:
            self.doc.note("No finite positive ratios to plot (e.g. only deterministic steps, where the PPO-style estimator is undefined).")
        table = []
        for row in sorted(rows, key=lambda r: (num(r.get("noise_level")) or 0.0, num(r.get("batch")) or 0.0)):
            table.append([fmt_int(row.get("batch")), fmt_g(row.get("noise_level")), fmt_int(row.get("repeats")),
                          fmt_g(row.get("var_analytic")), fmt_g(row.get("var_ppo")),
                          fmt_g(row.get("ratio_ppo_over_analytic")), fmt_g(row.get("rel_var_analytic")),
                          fmt_g(row.get("rel_var_ppo")), fmt(row.get("cosine_of_means"))])
        self.doc.table(["batch", "noise level", "repeats", "var analytic", "var PPO", "ratio PPO/analytic",
                        "rel. var analytic", "rel. var PPO", "cosine of means"], table)

    def cascade(self) -> None:
        import seaborn as sns

        curves = as_dict(as_dict(self.r.get("curves")).get("cascade"))
        if not curves:
            self.doc.note("No cascade RL curves in results.json (cascade not run).")
            return
        frame = self.curves_frame(["cascade"])
        benches = [b for b in self.headline if b in frame and frame[b].notna().any()]
        if frame.empty or not benches:
            self.doc.note("The cascade curves carry no headline benchmark values.")
            return
        long = frame.melt(id_vars=["seed", "step"], value_vars=benches, var_name="benchmark", value_name="score")
        long = long[long["score"].notna()]
        stages = self.cascade_stages(frame)
        band = _seed_label(len(curves))  # seaborn's errorbar="sd" below: the sample sd over the seeds at each step
        self.doc.p(
            "Cascade RL trains one task after another, each stage starting from the previous stage's weights. "
            f"Each line is one task's test score across the cascade's optimizer steps (mean over seeds; {band}); "
            "shaded spans and vertical lines mark the stages. A score that drops after its own stage is forgetting."
        )
        fig, (ax,) = _figure(10, 4.8)
        sns.lineplot(data=long, x="step", y="score", hue="benchmark", hue_order=benches, errorbar="sd",
                     marker="o", markersize=4, ax=ax)
        start = 0.0
        for i, stage in enumerate(stages):
            end = num(stage.get("end_step"))
            if end is None:
                continue
            if i % 2 == 0:
                ax.axvspan(start, end, color="#000", alpha=0.05, lw=0)
            if i < len(stages) - 1:
                ax.axvline(end, color="#444", ls="--", lw=1)
            ax.text((start + end) / 2, 1.01, f"stage {stage.get('stage', i)}: {stage.get('task', '?')}",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
            start = end
        ax.set_xlabel("student optimizer steps (cascade, all stages)")
        ax.set_ylabel("score (0-1)")
        ax.set_title("Cascade RL: each task's score across stages", pad=18)
        ax.grid(alpha=0.3)
        ax.legend(title="benchmark", fontsize=8)
        self.add_plot("cascade_forgetting.png", fig,
                      f"Cascade RL: per-task score across stages (stage boundaries dashed; mean over seeds, {band})")
        rows = self.stage_scores(frame)
        if not rows:
            return

        def spread(values: list[float], signed: bool = False) -> str:
            mean, sd = mean_sd([v for v in values if v == v])  # NaN: no evaluation before the stage
            if mean is None:
                return "n/a"
            return (f"{mean:+.3f}" if signed else fmt(mean)) + ("" if sd is None else f" ± {sd:.3f}")

        def differences(a: list[float], b: list[float]) -> list[float]:
            return [x - y for x, y in zip(a, b)]

        self.doc.p(
            "Each stage's own task on the curves, on the score it trains on (for pref the learned preference "
            "model, which the plot above leaves out for its unbounded scale), mean ± sd over seeds: before the "
            "stage, at its end and after the last stage. Forgetting is the drop from the stage's end to the final "
            "score; the findings call it forgetting where that drop is above 2 seed-sd after a gain in the stage "
            "above 2 seed-sd (a stage that gained nothing has nothing to forget). Curves use the training-time "
            "evaluation (fewer prompts than the final one), so a difference of a few hundredths can be its noise."
        )
        table = []
        for row in rows:
            last = row["last"]
            table.append([f"{row['stage']}: {row['task']}", row["bench"], fmt_int(row["end_step"]), spread(row["before"]),
                          spread(row["end"]), spread(row["final"]), spread(differences(row["end"], row["before"]), signed=True),
                          "n/a (last stage)" if last else spread(differences(row["end"], row["final"]), signed=True)])
        self.doc.table(["stage", "benchmark", "ends at step", "before the stage", "at its end", "final",
                        "gain in its stage", "forgetting (end - final)"], table)

    def samples(self) -> None:
        samples = as_dict(self.r.get("samples"))
        grids = as_dict(samples.get("grids"))
        if not grids:
            self.doc.note("No sample grids in results.json.")
            return
        prompts = [str(p) for p in as_list(samples.get("prompts"))]
        images, noise = num(samples.get("images_per_prompt")), num(samples.get("noise_seed"))
        seeds = as_dict(samples.get("seeds"))
        shown = sorted({str(v) for m, v in seeds.items() if is_student(m)})
        self.doc.p(
            "Every grid uses the same prompts and the same starting noise; one row per prompt"
            + ("" if images is None else f", {counted(round(images), 'image')} per row (columns: independent noise draws"
               + ("" if noise is None else f" of noise seed {round(noise)}") + ")")
            + (f"; the student methods' grids show their training seed {', '.join(shown)}" if shown else "")
            + ". The prompts, in row order:"
        )
        if prompts:
            self.doc.list(prompts, ordered=True)
        root = self.run_dir.resolve()
        for method in sorted(grids, key=method_key):
            rel = grids[method]
            path = (self.run_dir / str(rel)).resolve() if isinstance(rel, str) else None
            if path is None or Path(str(rel)).is_absolute() or not path.is_relative_to(root):
                self.doc.note(f"{method}: grid path {rel!r} is not inside the run directory; skipped.")
                continue
            if not path.is_file():
                self.doc.note(f"{method}: grid {rel} is missing.")
                continue
            data = path.read_bytes()
            if not data.startswith(PNG_MAGIC):
                self.doc.note(f"{method}: {rel} is not a PNG; skipped.")
                continue
            name = f"samples_{safe_name(method, grids)}.png"
            self.files[name] = data
            self.doc.img(name, data, f"{method}: one row per prompt (same prompts and seeds for every method)")

    def compute(self) -> None:
        compute = as_dict(self.r.get("compute"))
        if not compute:
            self.doc.note("No compute accounting in results.json.")
            return
        self.doc.p(
            "Training cost of one run of each method (mean over seeds). Teachers' rows are their own RL runs; "
            "DiffusionOPD's rows count only the distillation: add the teachers' rows for its full cost. "
            "Forward passes are per-sample transformer evaluations as counted by the policy (a classifier-free-"
            "guided call counts 2). Reference forwards are the frozen base's, for GRPO's KL penalty; every "
            "comparison at equal forward passes charges all three kinds. Wall seconds are the cell's whole run, the "
            "test evaluations behind its curves included (the cascade's later stages each add one at their start)."
        )
        rows = []
        for method in sorted(compute, key=method_key):
            c = as_dict(compute[method])
            wall = num(c.get("wall_seconds"))
            rows.append([method, fmt_int(c.get("optimizer_steps")), fmt_int(c.get("student_forwards")),
                         fmt_int(c.get("teacher_forwards")), fmt_int(c.get("reference_forwards", 0)),
                         fmt_int(total_forwards(c)), fmt_int(c.get("images")),
                         "n/a" if wall is None else f"{wall:,.1f} ({wall / 60:.1f} min)"])
        self.doc.table(["method", "optimizer steps", "student forwards", "teacher forwards", "reference forwards", "total forwards",
                        "images", "wall seconds"], rows)

    def details(self) -> None:
        self.doc.h(3, "Command")
        self.doc.code(str(self.r.get("command") or "n/a"))
        self.doc.h(3, "Configuration")
        config = self.r.get("config")
        if isinstance(config, dict) and config:
            self.doc.details("config (click to expand)", json.dumps(config, indent=2, sort_keys=True, default=str))
        else:
            self.doc.note("No configuration recorded.")
        self.doc.h(3, "Environment")
        env = as_dict(self.r.get("environment"))
        if env:
            self.doc.table(["key", "value"], [[k, str(env[k])] for k in sorted(env)])
        else:
            self.doc.note("No environment recorded.")
        hashes = as_dict(self.r.get("prompt_hashes"))
        if hashes:
            self.doc.h(3, "Prompt files (sha256)")
            self.doc.table(["benchmark", "test", "train"],
                           [[t, str(as_dict(hashes[t]).get("test", "n/a")), str(as_dict(hashes[t]).get("train", "n/a"))]
                            for t in sorted(hashes)])

    def build(self) -> None:
        self.header()
        self.section("findings", self.findings)
        self.section("scores", self.scores)
        self.section("curves", self.curves)
        self.section("grad", self.grad)
        self.section("variance", self.variance)
        self.section("cascade", self.cascade)
        self.section("samples", self.samples)
        self.section("compute", self.compute)
        self.section("details", self.details)


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by `opd-bench run`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); re-run or repair it") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); re-run or repair it") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(results).__name__}")
    if is_eval_result(results):
        raise ValueError(f"{path}: {EVAL_NOT_RUN}")
    problem = schema_problem(results.get("schema_version"))
    if problem:  # a newer file's sections may mean something else: no report that misreads them
        raise ValueError(f"{path}: {problem}")
    return results


SOURCE_FILE = ".source"  # in a report folder: the run folder it was built from
# In a report folder: a copy of the result file it was built from, so that a report kept without
# its run folder (a committed one) can still be checked against its numbers. Not "results.json":
# a folder holding that is a run folder.
RESULTS_COPY = "run_results.json"


def report_title(run_name: str) -> str:
    """A report's title (report.md's first heading, index.html's title): what tells a report's run apart."""
    return f"opd-bench report: {run_name}"


def report_of_another_run(run_dir: str | Path, out_dir: str | Path) -> str | None:
    """The run folder whose report ``out_dir`` holds, where that is not ``run_dir``; else None."""
    source = Path(out_dir) / SOURCE_FILE
    if not source.is_file():
        return _unsourced_report_of_another_run(Path(run_dir), Path(out_dir))
    built_from = source.read_text().strip()
    return None if built_from == str(Path(run_dir).resolve()) else built_from


def _unsourced_report_of_another_run(run_dir: Path, out_dir: Path) -> str | None:
    """A report without its source file (a committed report: the file names a folder of the machine
    that built it, so it is not committed) is this run's if its title and date are this run's."""
    markdown = out_dir / "report.md"
    if not markdown.is_file():
        return None
    head = markdown.read_text(errors="replace").splitlines()[:8]
    try:
        date = json.loads((run_dir / "results.json").read_text()).get("date")
    except (OSError, ValueError, AttributeError):
        date = None
    titles = {f"# {report_title(name)}" for name in (run_dir.name, run_dir.resolve().name)}
    if head and head[0] in titles and date is not None and any(line.startswith(f"- date: {date},") for line in head):
        return None
    title = head[0].removeprefix(f"# {report_title('')}") if head else "?"
    return f"{title}, as its report.md says; no {SOURCE_FILE} file names its run folder"


def unusable_report_folder(run_dir: str | Path, out_dir: str | Path) -> str | None:
    """Why ``out_dir`` cannot take ``run_dir``'s report whatever --force says, or None: it is a run
    folder (the report's files would mix with the run's), or it holds files but no report."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(run_dir).resolve() or (out_dir / "results.json").exists():
        return f"{out_dir} is a run folder; write the report elsewhere, e.g. --out reports/{Path(run_dir).resolve().name}"
    is_report = (out_dir / SOURCE_FILE).is_file() or all((out_dir / name).is_file() for name in ("report.md", "index.html"))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_report:
        return f"{out_dir} holds files that are not a report (its report.md and plots would replace them); choose another --out"
    return None


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, a self-contained ``index.html`` and the plot PNGs for one run.

    ``out_dir`` defaults to ``run_dir/report``. Returns ``{file name: path}`` for every file written
    (``"report.md"``, ``"index.html"``, the plots, the copied sample grids and ``RESULTS_COPY``, the
    result file's bytes).
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    results = load_results(run_dir)
    report = _Report(run_dir, out_dir, results)
    report.build()
    # the source first: a report killed midway is still a report folder, rebuilt by the next command
    atomic_write_bytes(out_dir / SOURCE_FILE, f"{run_dir.resolve()}\n".encode())
    written: dict[str, Path] = {RESULTS_COPY: out_dir / RESULTS_COPY}
    atomic_write_bytes(out_dir / RESULTS_COPY, (run_dir / "results.json").read_bytes())
    for name, data in report.files.items():
        atomic_write_bytes(out_dir / name, data)
        written[name] = out_dir / name
    # An earlier build's plots and grids that this one no longer makes (a variance experiment since
    # dropped) would sit beside a report that does not show them: remove those, never another file.
    for stale in sorted(out_dir.glob("*.png")):
        if stale.name not in written and _is_report_png(stale.name) and stale.is_file():
            stale.unlink()
    atomic_write_bytes(out_dir / "report.md", render_markdown(report.doc).encode("utf-8"))
    written["report.md"] = out_dir / "report.md"
    atomic_write_bytes(out_dir / "index.html", render_html(report.doc, report_title(run_dir.name)).encode("utf-8"))
    written["index.html"] = out_dir / "index.html"
    return written