"""Turn a run directory (``results.json`` + sample grids) into ``report.md`` and a self-contained ``index.html``.

``build_report(run_dir, out_dir)`` reads only the run directory. Every section is optional: a run
with only some methods (or without curves, variance experiment, cascade or samples) gets a note
where a section has nothing to show, never a crash. Plots are drawn with matplotlib's Agg canvas
(no pyplot, no global backend switch) and seaborn; they are written next to the report and
embedded in the HTML as base64 PNGs, so ``index.html`` can be mailed or archived on its own.
Heavy imports (matplotlib, seaborn, pandas) happen inside functions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from opd_bench.io import atomic_write_bytes
from opd_bench.leaderboard import paired_evaluation, total_forwards

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REFERENCE_ORDER = ("base", "teacher/geneval", "teacher/ocr", "teacher/pref")
STUDENT_ORDER = ("opd", "opd-ppo", "multi-reward", "cascade")
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


# --------------------------------------------------------------------------------------------
# Small helpers


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, inf, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    value = _num(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_g(value: Any) -> str:
    value = _num(value)
    return "n/a" if value is None else f"{value:.3g}"


def _fmt_int(value: Any) -> str:
    value = _num(value)
    return "n/a" if value is None else f"{round(value):,}"


def method_key(method: str) -> tuple:
    """Sort order: base, teachers, then the student methods in a fixed order, then anything else."""
    if method in REFERENCE_ORDER:
        return (0, REFERENCE_ORDER.index(method), method)
    if method.startswith("teacher/"):
        return (1, 0, method)
    if method in STUDENT_ORDER:
        return (2, STUDENT_ORDER.index(method), method)
    return (3, 0, method)


def is_student(method: str) -> bool:
    return method != "base" and not method.startswith("teacher/")


def palette(methods: Iterable[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * 10)
    for method in sorted(set(methods), key=method_key):
        colours[method] = FIXED_COLOURS.get(method) or next(spare)
    return colours


def paired_gain(model: list[float], base: list[float]) -> tuple[float, float]:
    """Mean per-image difference ``model - base`` and its standard error, for two evaluations of
    the same prompts from the same starting noise (image ``i`` of one pairs with image ``i`` of the other)."""
    differences = [m - b for m, b in zip(model, base, strict=True)]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def _versus(mean: float, sd: float | None, rival: str, rival_mean: float, rival_sd: float | None) -> str:
    """``OPD ± sd vs rival ± sd (difference)``; a difference smaller than the larger seed sd is
    flagged, so that a reader does not take a tie for a win."""
    spreads = [v for v in (sd, rival_sd) if v is not None]
    tie = ", within the seed sd" if spreads and abs(mean - rival_mean) < max(spreads) else ""
    return (f"{_fmt(mean)}{'' if sd is None else f' ± {sd:.3f}'} vs {rival} "
            f"{_fmt(rival_mean)}{'' if rival_sd is None else f' ± {rival_sd:.3f}'} ({mean - rival_mean:+.3f}{tie})")


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# --------------------------------------------------------------------------------------------
# Document model: a list of blocks rendered to both Markdown and HTML


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Block:
    kind: str  # h1 h2 h3 p note list table img code details
    text: str = ""
    items: list = field(default_factory=list)  # list items / table rows
    headers: list = field(default_factory=list)
    png: bytes = b""  # img
    file: str = ""  # img: file name relative to out_dir


class Doc:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(Block(f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def list(self, items: list[str], ordered: bool = False) -> None:
        self.blocks.append(Block("list", "ol" if ordered else "ul", items=list(items)))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        rows = [[c if isinstance(c, Cell) else Cell(str(c)) for c in row] for row in rows]
        self.blocks.append(Block("table", headers=list(headers), items=rows))

    def img(self, file: str, png: bytes, caption: str) -> None:
        self.blocks.append(Block("img", caption, png=png, file=file))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(Block("details", summary, items=[text]))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return fence


def render_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "note":
            out.append(f"> {b.text}")
        elif b.kind == "list":
            out.append("\n".join(
                f"{i}. {item}" if b.text == "ol" else f"- {item}" for i, item in enumerate(b.items, start=1)
            ))
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                     "|" + "|".join("---" for _ in b.headers) + "|"]
            for row in b.items:
                cells = [f"**{_md_cell(c.text)}**" if c.bold else _md_cell(c.text) for c in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{_md_cell(b.text)}]({b.file})\n\n*{b.text}*")
        elif b.kind == "code":
            fence = _md_fence(b.text)
            out.append(f"{fence}\n{b.text}\n{fence}")
        elif b.kind == "details":
            fence = _md_fence(b.items[0])
            out.append(f"<details><summary>{html.escape(b.text)}</summary>\n\n{fence}json\n{b.items[0]}\n{fence}\n\n</details>")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{border-bottom:1px solid #eee;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
.note{color:#666;font-style:italic;border-left:3px solid #ddd;padding-left:.6em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
img.grid{image-rendering:pixelated;min-width:240px}
"""


def render_html(doc: Doc, title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for b in doc.blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = _safe_name(b.text.lower())
            out.append(f'<{b.kind} id="{anchor}">{e(b.text)}</{b.kind}>')
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "note":
            out.append(f'<p class="note">{e(b.text)}</p>')
        elif b.kind == "list":
            out.append(f"<{b.text}>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + f"</{b.text}>")
        elif b.kind == "table":
            rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>"]
            for row in b.items:
                rows.append("<tr>" + "".join(
                    f"<td><strong>{e(c.text)}</strong></td>" if c.bold else f"<td>{e(c.text)}</td>" for c in row
                ) + "</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode("ascii")
            css = ' class="grid"' if b.file.startswith("samples_") else ""
            out.append(f'<figure><img{css} alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "details":
            out.append(f"<details><summary>{e(b.text)}</summary><pre>{e(b.items[0])}</pre></details>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


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


# --------------------------------------------------------------------------------------------
# The report


class _Report:
    def __init__(self, run_dir: Path, out_dir: Path, results: dict) -> None:
        self.run_dir = run_dir
        self.out_dir = out_dir
        self.r = results
        self.doc = Doc()
        self.files: dict[str, bytes] = {}  # name (relative to out_dir) -> content
        self.results = _dict(results.get("results"))
        self.methods = sorted(self.results, key=method_key)
        benchmarks = [b for b in _list(results.get("benchmarks")) if isinstance(b, str)]
        for method in self.methods:
            for bench in _dict(self.results[method]):
                if bench not in benchmarks:
                    benchmarks.append(bench)
        self.benchmarks = benchmarks
        headline = [b for b in _list(results.get("headline")) if isinstance(b, str)]
        self.headline = headline or [b for b in benchmarks if b != "pref"]
        every = set(self.methods) | set(_dict(results.get("curves"))) | set(_dict(results.get("compute")))
        every |= set(_dict(results.get("gradient_variance"))) | set(_dict(_dict(results.get("samples")).get("grids")))
        self.colours = palette(every)

    # -- data access --
    def score(self, method: str, bench: str) -> dict:
        return _dict(_dict(self.results.get(method)).get(bench))

    def mean(self, method: str, bench: str) -> float | None:
        return _num(self.score(method, bench).get("mean"))

    def overall(self, method: str) -> float | None:
        values = [self.mean(method, b) for b in self.headline]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def teacher_for(self, bench: str) -> str | None:
        """The teacher trained on ``bench`` (pref_oracle -> teacher/pref)."""
        if f"teacher/{bench}" in self.results:
            return f"teacher/{bench}"
        for method in self.methods:
            task = method.partition("/")[2]
            if method.startswith("teacher/") and bench.startswith(task + "_"):
                return method
        return None

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

    # -- findings: the paper's claims, checked against the result file --
    def _cascade_stages(self, frame) -> list[dict]:
        stages = [_dict(s) for s in _list(self.r.get("cascade_stages"))]
        if not stages and not frame.empty:  # fall back to the stage column of the curve rows
            seen: dict[Any, dict] = {}
            for _, row in frame.sort_values("step").iterrows():
                if row["stage"] is not None and row["stage"] == row["stage"]:
                    seen.setdefault(row["stage"], {"stage": row["stage"], "task": row["stage_task"]})["end_step"] = row["step"]
            stages = list(seen.values())
        return stages

    def _ms(self, method: str, bench: str) -> str:
        """'mean ± seed sd (n seeds)' of one final score."""
        cell = self.score(method, bench)
        n, std = len(_list(cell.get("per_seed"))), _num(cell.get("std"))
        spread = f" ± {std:.3f}" if std is not None and n > 1 else ""
        return f"{_fmt(self.mean(method, bench))}{spread} ({n} seed{'s' if n != 1 else ''})"

    def _overall_seeds(self, method: str) -> list[float]:
        """Per-seed overall scores (mean of the headline benchmarks' per-seed scores)."""
        per = [[_num(v) for v in _list(self.score(method, b).get("per_seed"))] for b in self.headline]
        if not per or any(len(p) != len(per[0]) or None in p for p in per):
            return []
        return [sum(p[i] for p in per) / len(per) for i in range(len(per[0]))]

    def paired_se(self, model: str, bench: str) -> float | None:
        """Standard error of ``model``'s gain over the base on ``bench`` from the per-image
        differences, where both were scored on the same noise (one evaluation seed, schema 3) and
        the score is the plain mean of its images (not GenEval's mean over tags); else None."""
        if not paired_evaluation(self.r):
            return None

        def first_seed_images(name: str) -> list:  # teachers and the base have one seed
            seeds = _list(self.score(name, bench).get("seeds"))
            per_seed = _dict(_dict(self.r.get("per_image")).get(name))
            return [_num(v) for v in _list(_dict(per_seed.get(str(seeds[0]))).get(bench))] if seeds else []

        ours, base = first_seed_images(model), first_seed_images("base")
        if len(ours) < 2 or len(ours) != len(base) or any(v is None for v in ours + base):
            return None
        mean = self.mean(model, bench)
        if mean is None or abs(sum(ours) / len(ours) - mean) > 1e-6 * max(1.0, abs(mean)):
            return None
        return paired_gain(ours, base)[1]

    @staticmethod
    def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        return mean, sd

    @staticmethod
    def _verdict(oks: list[bool | None]) -> str:
        if any(ok is False for ok in oks):
            return "did not hold"
        return "held" if oks and all(ok is True for ok in oks) else "not testable"

    def findings_lines(self) -> list[str]:
        """One line per claim of the paper: held / did not hold / not testable, with the numbers."""
        lines = []
        teachers = [(t, t.partition("/")[2]) for t in self.methods if t.startswith("teacher/")]
        teachers = [(t, b) for t, b in teachers if b in self.benchmarks]
        gain = {b: None if self.mean(t, b) is None or self.mean("base", b) is None else self.mean(t, b) - self.mean("base", b)
                for t, b in teachers}
        paired_se = {b: self.paired_se(t, b) for t, b in teachers}  # each teacher gain's s.e., where images pair up
        # 1. Teachers gain on their own task.
        oks, parts = [], []
        for task in ("geneval", "ocr", "pref"):
            g, teacher = gain.get(task), f"teacher/{task}"
            if g is None:
                oks.append(None)
                parts.append(f"{task}: not in the file")
                continue
            text = f"{task}: {self._ms(teacher, task)} vs base {self._ms('base', task)}, gain {g:+.3f}"
            se = paired_se[task]
            if se is not None:
                text += f" (± {se:.3f} s.e. over the paired images)"
            if task != "pref":
                oks.append(g >= 0.15)
                parts.append(text + " (needs >= +0.15)")
                continue
            sds = [_num(self.score(m, task).get("std")) for m in self.methods
                   if len(_list(self.score(m, task).get("per_seed"))) > 1]
            sd = max((v for v in sds if v is not None), default=None)
            oks.append(None if sd is None else g > 2 * sd)
            parts.append(text + (" (clear = above 2 seed-sd; no seed spread in the file)" if sd is None
                                 else f" (clear = above 2 × the largest seed sd on pref, {2 * sd:.3f})"))
        lines.append(f"Teachers gain on their own task: {self._verdict(oks)}. " + "; ".join(parts) + ".")
        # 2. OPD keeps >= 85% of every teacher's gain.
        oks, parts = [], []
        for t, b in teachers:
            g, opd = gain[b], self.mean("opd", b)
            if g is None or opd is None or g <= 0:
                oks.append(None)
                parts.append(f"{b}: not testable ({'teacher did not gain' if g is not None and g <= 0 else 'missing scores'})")
                continue
            kept = (opd - self.mean("base", b)) / g
            std = _num(self.score("opd", b).get("std"))
            n = len(_list(self.score("opd", b).get("per_seed")))
            text = (f"{b}: {kept:.0%}" + (f" ± {std / g:.0%}" if std is not None and n > 1 else "")
                    + f" of {t}'s gain {g:+.3f}")
            se = paired_se[b]
            if se is not None and g < 2 * se:  # a share of a gain the evaluation cannot tell from zero is noise
                oks.append(None)
                parts.append(text + f" (not testable: the gain is within 2 s.e., {2 * se:.3f}, of zero)")
                continue
            oks.append(kept >= 0.85)
            parts.append(text)
        lines.append(f"OPD keeps >= 85% of every teacher's gain: {self._verdict(oks) if teachers else 'not testable'}. "
                     + ("; ".join(parts) if parts else "no teachers in the file") + ".")
        # 3. OPD above multi-reward and cascade RL, at equal student updates and at equal forward passes.
        rivals = ("multi-reward", "cascade")
        oks, parts = [], []
        opd_mean, opd_sd = self._mean_sd(self._overall_seeds("opd"))
        for rival in rivals:
            mean, sd = self._mean_sd(self._overall_seeds(rival))
            if opd_mean is None or mean is None:
                oks.append(None)
                parts.append(f"vs {rival}: not in the file")
                continue
            oks.append(opd_mean > mean)
            parts.append(_versus(opd_mean, opd_sd, rival, mean, sd))
        line = (f"OPD above multi-reward and cascade RL, overall ({', '.join(self.headline)}) at equal student updates "
                f"(final results): {self._verdict(oks)}. " + "; ".join(parts) + ". At equal forward passes: ")
        frame = self._curves_frame(["opd", *rivals])
        heads = [b for b in self.headline if b in frame]
        curve_overall: dict[str, list[float]] = {}
        if not frame.empty and len(heads) == len(self.headline) and heads:
            frame = frame.dropna(subset=heads)
            reach = [frame[frame["method"] == m]["forwards"].max() for m in ("opd", *rivals)]
            budget = min(reach) if all(r == r for r in reach) else 0.0
            if budget > 0:
                for m in ("opd", *rivals):
                    part = frame[(frame["method"] == m) & (frame["forwards"] <= budget)].sort_values("step")
                    curve_overall[m] = [float(rows[heads].iloc[-1].mean()) for _, rows in part.groupby("seed")]
        if len(curve_overall) == 1 + len(rivals) and all(curve_overall.values()):
            oks, parts = [], []
            opd_mean, opd_sd = self._mean_sd(curve_overall["opd"])
            for rival in rivals:
                mean, sd = self._mean_sd(curve_overall[rival])
                oks.append(opd_mean > mean)
                parts.append(_versus(opd_mean, opd_sd, rival, mean, sd))
            line += (f"{self._verdict(oks)} (last curve evaluation within {_fmt_int(budget)} forward passes, "
                     "the most every method reached). " + "; ".join(parts) + ".")
        else:
            line += "not testable (no forward-pass curves for OPD, multi-reward and cascade RL in the file)."
        lines.append(line)
        # 4. Cascade forgetting: an earlier stage's task drops after the later stages.
        frame = self._curves_frame(["cascade"])
        stages = self._cascade_stages(frame)
        oks, parts = [], []
        for stage in stages[:-1]:
            task, end = str(stage.get("task")), _num(stage.get("end_step"))
            bench = task if task in self.headline else next((b for b in self.headline if b.startswith(task + "_")), None)
            if frame.empty or end is None or bench is None or bench not in frame:
                continue
            drops = []
            for _, rows in frame.dropna(subset=[bench]).sort_values("step").groupby("seed"):
                at_end = rows[rows["step"] <= end]
                if not at_end.empty:
                    drops.append(float(at_end[bench].iloc[-1] - rows[bench].iloc[-1]))
            mean, sd = self._mean_sd(drops)
            if mean is None:
                continue
            oks.append(mean > 2 * (sd or 0.0))
            parts.append(f"{bench} (stage {stage.get('stage', '?')}) drops {mean:+.3f}"
                         + ("" if sd is None else f" ± {sd:.3f}") + f" from its stage end to the final ({len(drops)} seeds)")
        lines.append(f"Cascade RL forgets earlier stages: {'held' if any(oks) else self._verdict(oks)}. "
                     + ("; ".join(parts) + " (forgetting = drop above 2 seed-sd)" if parts
                        else "no per-stage cascade curves in the file") + ".")
        # 5. Analytic gradient variance >= 10x below the PPO-style estimator's.
        variance = _dict(self.r.get("variance"))
        ratios = [v for v in (_num(_dict(r).get("ratio_ppo_over_analytic")) for r in _list(variance.get("rows")))
                  if v is not None]
        ratio = _num(variance.get("ratio_ppo_over_analytic"))
        if ratio is None and not ratios:
            lines.append("Analytic gradient variance >= 10x below the PPO-style estimator's: not testable "
                         "(no variance experiment in the file).")
        else:
            ok = (ratio if ratio is not None else min(ratios)) >= 10
            lines.append(f"Analytic gradient variance >= 10x below the PPO-style estimator's: {'held' if ok else 'did not hold'}. "
                         f"Ratio PPO-style / analytic {_fmt_g(ratio)} at the reference setting"
                         + (f"; {sum(v >= 10 for v in ratios)} of {len(ratios)} settings >= 10 "
                            f"(range {_fmt_g(min(ratios))} to {_fmt_g(max(ratios))})" if ratios else "") + ".")
        return lines

    def findings(self) -> None:
        self.doc.p("The paper's claims checked against this run's result file (± is the sd over seeds).")
        self.doc.list(self.findings_lines())

    # -- sections --
    def header(self) -> None:
        r = self.r
        self.doc.h(1, f"opd-bench report: {self.run_dir.name}")
        seeds = ", ".join(str(s) for s in _list(r.get("seeds"))) or "n/a"
        self.doc.list([
            f"suite: {r.get('suite', 'n/a')} ({r.get('suite_version', 'n/a')}), model: {r.get('model', 'n/a')}, "
            f"preset: {r.get('preset', 'n/a')}",
            f"seeds: {seeds}",
            f"date: {r.get('date', 'n/a')}, opd-bench {r.get('package_version', 'n/a')}, "
            f"commit: {r.get('git_commit') or 'n/a'}",
            f"benchmarks: {', '.join(self.benchmarks) or 'n/a'}; overall = mean of {', '.join(self.headline) or 'n/a'}",
            self.evaluation_line(),
        ])

    def evaluation_line(self) -> str:
        """How the final scores were sampled: prompts, images and the noise seed."""
        record = _dict(_dict(self.r.get("config")).get("eval"))
        if not record:
            return "final evaluation: settings not recorded"
        limit, images = record.get("limit"), record.get("images_per_prompt")
        prompts = "every test prompt" if limit is None else f"{limit} test prompts"
        per_prompt = "each benchmark's own images" if images is None else f"{images} images"
        noise = (f"noise seed {record['seed']} for every model, so all are scored on the same starting noise"
                 if paired_evaluation(self.r) else "each cell's training seed as noise seed")
        return f"final evaluation: {prompts} x {per_prompt} per benchmark, {noise}"

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
            "pref is the learned preference model's logit-scale score (unbounded, higher is better)."
        )
        columns = self.benchmarks + ["overall"]
        values = {m: {b: self.mean(m, b) for b in self.benchmarks} for m in self.methods}
        for m in self.methods:
            values[m]["overall"] = self.overall(m)
        best_all, best_student = {}, {}
        for column in columns:
            finite = [(values[m][column], m) for m in self.methods if values[m][column] is not None]
            if finite:
                best_all[column] = max(v for v, _ in finite)
            students = [v for v, m in finite if is_student(m)]
            if students:
                best_student[column] = max(students)
        rows = []
        for m in self.methods:
            row: list[Any] = [Cell(m)]
            for column in columns:
                value = values[m][column]
                if column == "overall":
                    text = _fmt(value)
                else:
                    std = _num(self.score(m, column).get("std"))
                    n = len(_list(self.score(m, column).get("per_seed")))
                    text = _fmt(value) + (f" ± {std:.3f}" if std is not None and n > 1 else "")
                if value is not None and is_student(m) and value == best_student.get(column):
                    text += " ★"
                row.append(Cell(text, bold=value is not None and value == best_all.get(column)))
            rows.append(row)
        self.doc.table(["method"] + columns, rows)

        per_tag = _dict(self.r.get("per_tag"))
        tags = sorted({t for m in per_tag for t in _dict(_dict(per_tag[m]).get("geneval"))})
        if tags:
            self.doc.h(3, "GenEval accuracy per tag")
            rows = []
            for m in sorted(per_tag, key=method_key):
                by_tag = _dict(_dict(per_tag[m]).get("geneval"))
                rows.append([m] + [_fmt(by_tag.get(t)) for t in tags])
            self.doc.table(["method"] + tags, rows)

    def _curves_frame(self, methods: list[str]):
        import pandas as pd

        records = []
        curves = _dict(self.r.get("curves"))
        for method in methods:
            for seed, rows in _dict(curves.get(method)).items():
                for row in _list(rows):
                    row = _dict(row)
                    step = _num(row.get("step"))
                    if step is None:
                        continue
                    record = {"method": method, "seed": str(seed), "step": step,
                              "forwards": total_forwards(row) or 0.0,
                              "stage": row.get("stage"), "stage_task": row.get("stage_task")}
                    for bench in self.benchmarks:
                        record[bench] = _num(row.get(f"eval/{bench}"))
                    records.append(record)
        frame = pd.DataFrame.from_records(records)
        for bench in self.benchmarks:
            if bench in frame:
                frame[bench] = pd.to_numeric(frame[bench], errors="coerce")
        return frame

    def curves(self) -> None:
        import seaborn as sns

        curves = _dict(self.r.get("curves"))
        methods = sorted((m for m in curves if is_student(m) and _dict(curves[m])), key=method_key)
        if not methods:
            self.doc.note("No training curves in results.json (no student method logged periodic evaluations).")
            return
        frame = self._curves_frame(methods)
        n_seeds = max(len(_dict(curves[m])) for m in methods)
        self.doc.p(
            "Score on the test prompts during training, per headline benchmark, against student optimizer "
            "steps (left) and against transformer forward passes, student plus teacher plus the frozen reference "
            "of a KL penalty (right); the second axis charges DiffusionOPD and its PPO-style variant for querying "
            "the teachers and GRPO methods for their KL reference. Lines are the mean "
            f"over seeds ({_seed_label(n_seeds)}). Dashed lines: the final score of the teacher trained on that "
            "benchmark; dotted grey: the base model."
        )
        drawn = 0
        for bench in self.headline:
            if frame.empty or bench not in frame or frame[bench].notna().sum() == 0:
                self.doc.note(f"No curve values for {bench}.")
                continue
            data = frame[frame[bench].notna()].copy()
            # Align the forwards axis across seeds: per (method, step), the mean forward count.
            data["forwards_mean"] = data.groupby(["method", "step"])["forwards"].transform("mean")
            present = sorted(data["method"].unique(), key=method_key)
            fig, axes = _figure(12.5, 4.6, ncols=2)
            for ax, x, xlabel in ((axes[0], "step", "student optimizer steps"),
                                  (axes[1], "forwards_mean", "transformer forward passes (student + teacher + reference)")):
                sns.lineplot(data=data, x=x, y=bench, hue="method", hue_order=present,
                             palette={m: self.colours[m] for m in present}, errorbar="sd",
                             marker="o", markersize=4, ax=ax)
                teacher = self.teacher_for(bench)
                if teacher and self.mean(teacher, bench) is not None:
                    ax.axhline(self.mean(teacher, bench), ls="--", lw=1.4, color=self.colours[teacher],
                               label=f"{teacher} (final)")
                if self.mean("base", bench) is not None:
                    ax.axhline(self.mean("base", bench), ls=":", lw=1.2, color=self.colours["base"], label="base")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("score (0-1)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, loc="best")
            axes[0].set_title(f"{bench}: score vs optimizer steps")
            axes[1].set_title(f"{bench}: score vs forward passes")
            self.add_plot(f"curves_{_safe_name(bench)}.png", fig,
                          f"{bench}: convergence (mean over seeds; {_seed_label(n_seeds)})")
            drawn += 1
        if not drawn:
            self.doc.note("The curves carry no headline benchmark values.")

    def grad(self) -> None:
        import pandas as pd
        import seaborn as sns

        source = _dict(self.r.get("gradient_variance"))
        records = []
        for method in sorted(source, key=method_key):
            for seed, rows in _dict(source[method]).items():
                for row in _list(rows):
                    row = _dict(row)
                    step = _num(row.get("step"))
                    for key in ("grad/variance", "grad/variance_rel"):
                        value = _num(row.get(key))
                        if step is not None and value is not None and value > 0:
                            records.append({"method": method, "seed": str(seed), "step": step,
                                            "metric": key, "value": value})
        if not records:
            self.doc.note("No gradient-variance logs in results.json.")
            return
        frame = pd.DataFrame.from_records(records)
        self.doc.p(
            "Variance of the gradient estimate across the samples of a batch, logged during training "
            "(log scale). Left: total variance; right: relative to the squared norm of the mean gradient. "
            "Line: mean over seeds; band: min-max over seeds."
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

    def variance(self) -> None:
        import pandas as pd
        import seaborn as sns

        variance = _dict(self.r.get("variance"))
        rows = [_dict(r) for r in _list(variance.get("rows"))]
        if not rows:
            self.doc.note("No variance experiment in results.json.")
            return
        reference = _dict(variance.get("reference"))
        ratio = _num(variance.get("ratio_ppo_over_analytic"))
        self.doc.p(
            "Same student, teacher and states; the gradient of the per-step KL is estimated either "
            "analytically (DiffusionOPD's mean matching) or with the PPO-style sampled log-ratio reward. "
            "The ratio is the PPO-style estimator's variance over the analytic one's (above 1: the analytic "
            "gradient is less noisy)."
            + (f" Teacher: the {variance['teacher_task']} teacher." if isinstance(variance.get("teacher_task"), str) else "")
            + (f" At the reference setting (batch {reference.get('batch', 'n/a')}, noise level "
               f"{reference.get('noise_level', 'n/a')}) the ratio is {_fmt_g(ratio)}." if ratio is not None else "")
        )
        records = []
        for row in rows:
            batch, level, value = _num(row.get("batch")), _num(row.get("noise_level")), _num(row.get("ratio_ppo_over_analytic"))
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
        for row in sorted(rows, key=lambda r: (_num(r.get("noise_level")) or 0.0, _num(r.get("batch")) or 0.0)):
            table.append([_fmt_int(row.get("batch")), _fmt_g(row.get("noise_level")), _fmt_int(row.get("repeats")),
                          _fmt_g(row.get("var_analytic")), _fmt_g(row.get("var_ppo")),
                          _fmt_g(row.get("ratio_ppo_over_analytic")), _fmt_g(row.get("rel_var_analytic")),
                          _fmt_g(row.get("rel_var_ppo")), _fmt(row.get("cosine_of_means"))])
        self.doc.table(["batch", "noise level", "repeats", "var analytic", "var PPO", "ratio PPO/analytic",
                        "rel. var analytic", "rel. var PPO", "cosine of means"], table)

    def cascade(self) -> None:
        import seaborn as sns

        curves = _dict(_dict(self.r.get("curves")).get("cascade"))
        if not curves:
            self.doc.note("No cascade RL curves in results.json (cascade not run).")
            return
        frame = self._curves_frame(["cascade"])
        benches = [b for b in self.headline if b in frame and frame[b].notna().any()]
        if frame.empty or not benches:
            self.doc.note("The cascade curves carry no headline benchmark values.")
            return
        long = frame.melt(id_vars=["seed", "step"], value_vars=benches, var_name="benchmark", value_name="score")
        long = long[long["score"].notna()]
        stages = self._cascade_stages(frame)
        self.doc.p(
            "Cascade RL trains one task after another, each stage starting from the previous stage's weights. "
            "Each line is one task's test score across the cascade's optimizer steps (mean over seeds); "
            "shaded spans and vertical lines mark the stages. A score that drops after its own stage is forgetting."
        )
        fig, (ax,) = _figure(10, 4.8)
        sns.lineplot(data=long, x="step", y="score", hue="benchmark", hue_order=benches, errorbar="sd",
                     marker="o", markersize=4, ax=ax)
        start = 0.0
        for i, stage in enumerate(stages):
            end = _num(stage.get("end_step"))
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
        self.add_plot("cascade_forgetting.png", fig, "Cascade RL: per-task score across stages (stage boundaries dashed)")
        mean_curve = long.groupby(["benchmark", "step"])["score"].mean().reset_index()
        table = []
        for bench in benches:
            part = mean_curve[mean_curve["benchmark"] == bench].sort_values("step")
            peak_idx = part["score"].idxmax()
            peak, final = float(part.loc[peak_idx, "score"]), float(part["score"].iloc[-1])
            table.append([bench, _fmt(part["score"].iloc[0]), _fmt(peak), _fmt_int(part.loc[peak_idx, "step"]),
                          _fmt(final), _fmt(peak - final)])
        self.doc.table(["benchmark", "start", "peak", "peak at step", "final", "forgetting (peak - final)"], table)

    def samples(self) -> None:
        samples = _dict(self.r.get("samples"))
        grids = _dict(samples.get("grids"))
        if not grids:
            self.doc.note("No sample grids in results.json.")
            return
        prompts = [str(p) for p in _list(samples.get("prompts"))]
        self.doc.p("Every grid uses the same prompts and the same seeds; one row per prompt, in this order:")
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
            name = f"samples_{_safe_name(method)}.png"
            self.files[name] = data
            self.doc.img(name, data, f"{method}: one row per prompt (same prompts and seeds for every method)")

    def compute(self) -> None:
        compute = _dict(self.r.get("compute"))
        if not compute:
            self.doc.note("No compute accounting in results.json.")
            return
        self.doc.p(
            "Training cost of one run of each method (mean over seeds). Teachers' rows are their own RL runs; "
            "DiffusionOPD's rows count only the distillation: add the teachers' rows for its full cost. "
            "Forward passes are per-sample transformer evaluations as counted by the policy (a classifier-free-"
            "guided call counts 2). Reference forwards are the frozen base's, for GRPO's KL penalty; every "
            "comparison at equal forward passes charges all three kinds."
        )
        rows = []
        for method in sorted(compute, key=method_key):
            c = _dict(compute[method])
            wall = _num(c.get("wall_seconds"))
            rows.append([method, _fmt_int(c.get("optimizer_steps")), _fmt_int(c.get("student_forwards")),
                         _fmt_int(c.get("teacher_forwards")), _fmt_int(c.get("reference_forwards", 0)),
                         _fmt_int(total_forwards(c)), _fmt_int(c.get("images")),
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
        env = _dict(self.r.get("environment"))
        if env:
            self.doc.table(["key", "value"], [[k, str(env[k])] for k in sorted(env)])
        else:
            self.doc.note("No environment recorded.")
        hashes = _dict(self.r.get("prompt_hashes"))
        if hashes:
            self.doc.h(3, "Prompt files (sha256)")
            self.doc.table(["benchmark", "test", "train"],
                           [[t, str(_dict(hashes[t]).get("test", "n/a")), str(_dict(hashes[t]).get("train", "n/a"))]
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
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(results).__name__}")
    return results


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, a self-contained ``index.html`` and the plot PNGs for one run.

    ``out_dir`` defaults to ``run_dir/report``. Returns ``{file name: path}`` for every file written
    (``"report.md"``, ``"index.html"``, the plots and the copied sample grids).
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    results = load_results(run_dir)
    report = _Report(run_dir, out_dir, results)
    report.build()
    written: dict[str, Path] = {}
    for name, data in report.files.items():
        atomic_write_bytes(out_dir / name, data)
        written[name] = out_dir / name
    atomic_write_bytes(out_dir / "report.md", render_markdown(report.doc).encode("utf-8"))
    written["report.md"] = out_dir / "report.md"
    title = f"opd-bench report: {run_dir.name}"
    atomic_write_bytes(out_dir / "index.html", render_html(report.doc, title).encode("utf-8"))
    written["index.html"] = out_dir / "index.html"
    return written
