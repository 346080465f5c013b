"""The paper's claims, checked against one result file: each claim is a function that reads a
``ResultView`` and returns one line, "held" / "did not hold" / "not testable", with the numbers
and their spread. The report opens with these lines, so a reader sees the answer before the plots.

The thresholds are the issue's targets: teachers +0.15 on geneval and OCR (a clear gain on pref),
the student keeping >= 85% of every teacher's gain, OPD above multi-reward and cascade RL at equal
updates and at equal forward passes, cascade forgetting, the analytic gradient's variance >= 10x
below the PPO-style estimator's. A last line gives the context of all of them: whether the student
methods end above the untrained base at all.
"""

from __future__ import annotations

import math

from opd_bench.results_view import ResultView, as_dict, as_list, fmt, fmt_g, fmt_int, is_student, mean_sd, num

TEACHER_TARGET = 0.15  # absolute gain on geneval and OCR
KEPT_TARGET = 0.85  # share of a teacher's gain the student keeps
VARIANCE_TARGET = 10.0  # PPO-style over analytic
RIVALS = ("multi-reward", "cascade")
TASKS = ("geneval", "ocr", "pref")  # one teacher each
SHOWN = 5e-4  # half the last digit the lines show (three decimals): a difference below it reads as 0.000
EPS = 1e-9  # a gain printed as exactly the target meets it (0.35 - 0.2 is 0.1499999...)


TIE = "tie"  # a comparison whose difference is within the seed spread: neither held nor refuted


def verdict(oks: list[bool | str | None]) -> str:
    """A claim fails if any part fails, holds if every part holds, is unresolved if a part is a tie
    within the seed spread, else it was not testable."""
    if any(ok is False for ok in oks):
        return "did not hold"
    if any(ok == TIE for ok in oks):
        return "not resolved (a difference within the seed spread or below the precision shown)"
    return "held" if oks and all(ok is True for ok in oks) else "not testable"


def _versus(mean: float, sd: float | None, rival: str, rival_mean: float, rival_sd: float | None) -> tuple[bool | str | None, str]:
    """(OPD above the rival: True, False, TIE or None, ``OPD ± sd vs rival ± sd (difference)``). A
    difference smaller than the larger seed sd is a tie, so that a reader does not take it for a
    win or a loss; with one seed on both sides there is no spread to judge: not testable (None)."""
    spreads = [v for v in (sd, rival_sd) if v is not None]
    difference = mean - rival_mean
    within = bool(spreads) and abs(difference) < max(spreads)
    equal = abs(difference) < SHOWN  # equal at the precision shown (0.000 vs 0.000): no win, no loss, spread or not
    note = (", within the seed sd" if within else ", equal at this precision" if equal
            else "" if spreads else ", one seed: no spread to judge")
    # one seed on both sides: the sign of any difference would decide, so nothing is judged
    ok = TIE if within or equal else None if not spreads else difference > 0
    return (ok,
            f"{fmt(mean)}{'' if sd is None else f' ± {sd:.3f}'} vs {rival} "
            f"{fmt(rival_mean)}{'' if rival_sd is None else f' ± {rival_sd:.3f}'} ({difference:+.3f}{note})")


def _teachers(view: ResultView) -> list[tuple[str, str]]:
    """(teacher, its benchmark) for every teacher whose task is a benchmark of the file."""
    pairs = [(t, t.partition("/")[2]) for t in view.methods if t.startswith("teacher/")]
    return [(t, b) for t, b in pairs if b in view.benchmarks]


def _gain(view: ResultView, model: str, bench: str) -> float | None:
    ours, base = view.mean(model, bench), view.mean("base", bench)
    return None if ours is None or base is None else ours - base


def _largest_seed_sd(view: ResultView, bench: str) -> float | None:
    """The largest seed sd of any model on ``bench``: the yardstick of a clear gain on a score
    with no fixed scale (pref)."""
    sds = [num(view.score(m, bench).get("std")) for m in view.methods if len(as_list(view.score(m, bench).get("per_seed"))) > 1]
    return max((v for v in sds if v is not None), default=None)


def teacher_gains(view: ResultView) -> str:
    oks, parts, teachers = [], [], _teachers(view)
    for task in TASKS:
        teacher = f"teacher/{task}"
        g = _gain(view, teacher, task) if (teacher, task) in teachers else None
        if g is None:
            oks.append(None)
            parts.append(f"{task}: not in the file")
            continue
        text = f"{task}: {view.score_text(teacher, task)} vs base {view.score_text('base', task)}, gain {g:+.3f}"
        se = view.paired_se(teacher, task)
        if se is not None:
            text += f" (± {se:.3f} s.e. over the paired images)"
        if task != "pref":
            oks.append(g >= TEACHER_TARGET - EPS)
            parts.append(text + f" (needs >= +{TEACHER_TARGET})")
            continue
        # pref is on the preference model's own scale: "clear" is measured against the seed spread
        sd = _largest_seed_sd(view, task)
        oks.append(None if sd is None else g > 2 * sd)
        parts.append(text + (" (clear = above 2 seed-sd; no seed spread in the file)" if sd is None
                             else f" (clear = above 2 × the largest seed sd on pref, {2 * sd:.3f})"))
    return f"Teachers gain on their own task: {verdict(oks)}. " + "; ".join(parts) + "."


def share_kept(view: ResultView) -> str:
    teachers = _teachers(view)
    oks, parts, combined = [], [], False
    for b in TASKS:  # every teacher: one missing leaves the claim untested, as on the teacher line
        t = f"teacher/{b}"
        if (t, b) not in teachers:
            oks.append(None)
            parts.append(f"{b}: not testable ({t} not in the file)")
            continue
        g, opd = _gain(view, t, b), view.mean("opd", b)
        if g is None or opd is None or g <= 0:
            oks.append(None)
            parts.append(f"{b}: not testable ({'teacher did not gain' if g is not None and g <= 0 else 'missing scores'})")
            continue
        kept = (opd - view.mean("base", b)) / g
        std = num(view.score("opd", b).get("std"))
        n = len(as_list(view.score("opd", b).get("per_seed")))
        se, sd = view.paired_se(t, b), _largest_seed_sd(view, b) if b == "pref" else None
        # the share's spread: OPD's seed sd and the teacher's own (single-run) gain's s.e., relative to the gain
        terms = [x for x in (std / g if std is not None and n > 1 else None, kept * se / g if se is not None else None)
                 if x is not None]
        spread = math.sqrt(sum(x * x for x in terms)) if terms else None
        combined |= len(terms) == 2
        text = f"{b}: {kept:.0%}" + (f" ± {spread:.0%}" if spread is not None else "") + f" of {t}'s gain {g:+.3f}"
        if se is not None and g < 2 * se:  # a share of a gain the evaluation cannot tell from zero is noise
            oks.append(None)
            parts.append(text + f" (not testable: the gain is within 2 s.e., {2 * se:.3f}, of zero)")
            continue
        if b == "pref" and (sd is None or g <= 2 * sd):  # the teacher line calls this gain not clear: no share of it either
            oks.append(None)
            parts.append(text + (" (not testable: no seed spread to call the gain clear by)" if sd is None
                                 else f" (not testable: the gain is within 2 seed sd, {2 * sd:.3f})"))
            continue
        if spread is None:  # one seed and unpaired images: nothing to judge the share by
            oks.append(None)
            parts.append(text + " (not testable: one seed and no paired images, no spread to judge by)")
            continue
        if spread is not None and abs(kept - KEPT_TARGET) < spread:
            oks.append(TIE)
            parts.append(text + f" (within its spread of {KEPT_TARGET:.0%})")
            continue
        oks.append(kept >= KEPT_TARGET - EPS)
        parts.append(text)
    return (f"OPD keeps >= {KEPT_TARGET:.0%} of every teacher's gain: {verdict(oks) if teachers else 'not testable'}. "
            + ("; ".join(parts) if teachers else "no teachers in the file")
            + (". Here ± combines OPD's seed sd with the s.e. of the teacher's paired gain" if combined else "") + ".")


def _compare(per_seed: dict[str, list[float]], why_missing: dict[str, str]) -> tuple[list[bool | None], list[str]]:
    """OPD's per-seed overall scores against each rival's; ``why_missing``: what to say of a
    method without scores (not in the file, or no finite score)."""
    oks, parts = [], []
    opd_mean, opd_sd = mean_sd(per_seed.get("opd", []))
    for rival in RIVALS:
        mean, sd = mean_sd(per_seed.get(rival, []))
        if opd_mean is None or mean is None:
            oks.append(None)
            missing = "; ".join(f"{name}: {why_missing[key]}" for name, key, value in
                                (("OPD", "opd", opd_mean), (rival, rival, mean)) if value is None)
            parts.append(f"vs {rival}: not testable ({missing})")
            continue
        ok, text = _versus(opd_mean, opd_sd, rival, mean, sd)
        oks.append(ok)
        parts.append(text)
    return oks, parts


def _at_equal_forwards(view: ResultView) -> tuple[float, dict[str, list[float]], dict[str, list[int]]]:
    """Per seed, the last curve evaluation's overall score within the forward passes every method
    with curves reached (student + teacher + KL reference), and the step each was read at; empty
    where OPD or every rival lacks curves."""
    methods = ("opd", *RIVALS)
    frame = view.curves_frame(list(methods))
    heads = [b for b in view.headline if b in frame]
    if frame.empty or not heads or len(heads) != len(view.headline):
        return 0.0, {}, {}
    frame = frame.dropna(subset=heads)
    reach = {m: frame[frame["method"] == m]["forwards"].max() for m in methods}
    reach = {m: r for m, r in reach.items() if r == r}  # r != r: a method without curves
    if "opd" not in reach or len(reach) < 2 or min(reach.values()) <= 0:
        return 0.0, {}, {}
    budget = min(reach.values())
    overall, steps = {}, {}
    for m in reach:
        part = frame[(frame["method"] == m) & (frame["forwards"] <= budget)].sort_values("step")
        last = [rows.iloc[-1] for _, rows in part.groupby("seed")]
        overall[m] = [float(row[heads].mean()) for row in last]
        steps[m] = sorted({int(row["step"]) for row in last})
    return budget, overall, steps


def _equal_updates(view: ResultView) -> dict[str, str]:
    """Rivals whose recorded optimizer steps differ from OPD's: rival -> 'opd N, rival M'."""
    steps = {m: num(as_dict(as_dict(view.r.get("compute")).get(m)).get("optimizer_steps")) for m in ("opd", *RIVALS)}
    return {rival: f"{fmt_int(steps['opd'])} OPD updates, {fmt_int(steps[rival])} {rival}" for rival in RIVALS
            if steps["opd"] is not None and steps[rival] is not None and steps["opd"] != steps[rival]}


def opd_versus_baselines(view: ResultView) -> str:
    why = {m: "no finite overall score" if m in view.methods else "not in the file" for m in ("opd", *RIVALS)}
    oks, parts = _compare({m: view.overall_seeds(m) for m in ("opd", *RIVALS)}, why)
    unequal_updates = _equal_updates(view)
    for i, rival in enumerate(RIVALS):  # the label says equal updates: a file where they differ cannot test it
        unequal = unequal_updates.get(rival)
        if unequal and oks[i] is not None:
            oks[i] = None
            parts[i] += f" (not testable: unequal student updates, {unequal})"
    line = (f"OPD above multi-reward and cascade RL, overall ({', '.join(view.headline)}) at equal student updates "
            f"(final results): {verdict(oks)}. " + "; ".join(parts) + ". At equal forward passes: ")
    budget, overall, steps = _at_equal_forwards(view)
    if not overall:
        return line + "not testable (no curves with forward-pass counts for OPD and a rival in the file)."
    oks, parts = _compare(overall, {m: "no curves with forward-pass counts in the file" for m in ("opd", *RIVALS)})
    read = ", ".join(f"{m} at step {'/'.join(map(str, steps[m]))}" for m in ("opd", *RIVALS) if m in steps)
    return line + (f"{verdict(oks)} (last curve evaluation within {fmt_int(budget)} forward passes, "
                   f"the most every method with curves reached: {read}{view.curves_note()}; the teachers' own "
                   "training, which OPD needs first, is not charged here: see Compute). " + "; ".join(parts) + ".")


def _signed(values: list[float]) -> tuple[float | None, float | None, str]:
    """Mean, seed sd and '+m ± sd' of per-seed differences (NaN, no evaluation before a stage, left out)."""
    mean, sd = mean_sd([v for v in values if v == v])
    return mean, sd, "n/a" if mean is None else f"{mean:+.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def cascade_forgetting(view: ResultView) -> str:
    """A stage forgets if its task's score falls after it by more than 2 seed-sd; a stage measured
    not to gain clearly on its own task has nothing to forget, and is not testable (one with no
    evaluation before it is judged on its fall alone)."""
    oks, parts = [], []
    for row in view.stage_scores(view.curves_frame(["cascade"])):
        if row["last"]:  # nothing after it to forget it
            continue
        drops = [end - final for end, final in zip(row["end"], row["final"])]
        drop, drop_sd = mean_sd(drops)
        if drop is None:
            continue
        gain, gain_sd, gain_text = _signed([end - before for end, before in zip(row["end"], row["before"])])
        after_text = _signed([-d for d in drops])[2]
        text = (f"{row['bench']} (stage {row['stage']}): {gain_text} in its stage, then {after_text} from its stage "
                f"end to the final ({len(row['end'])} seed{'s' if len(row['end']) != 1 else ''})")
        if drop_sd is None or (gain is not None and gain_sd is None):  # one seed: any wiggle would count
            oks.append(None)
            parts.append(text + " (not testable: one seed measured, no spread to judge a gain or a fall by)")
            continue
        if gain is not None and (gain <= 2 * gain_sd or gain < SHOWN):
            oks.append(None)
            parts.append(text + " (not testable: no clear gain in its stage to forget)")
            continue
        oks.append(drop > 2 * drop_sd and drop >= SHOWN)  # a fall the lines would show as 0.000 is none
        parts.append(text)
    return (f"Cascade RL forgets earlier stages: {'held' if any(ok is True for ok in oks) else verdict(oks)}. "
            + ("; ".join(parts) + f" (forgetting = a fall above 2 seed-sd after a clear gain{view.curves_note()})" if parts
               else "no per-stage cascade curves in the file") + ".")


def students_versus_base(view: ResultView) -> str:
    """Not one of the paper's claims but the context for all of them: is a trained student better
    than the model it started from, overall?"""
    base = view.overall("base")
    students = [m for m in view.methods if is_student(m)]
    if base is None or not students:
        return "Student methods above the untrained base, overall: not testable (no base or students in the file)."
    oks, parts, scored = [], [], 0
    for m in students:
        mean, sd = mean_sd(view.overall_seeds(m))
        if mean is None:  # a student left out would let the rest read "held"
            oks.append(None)
            parts.append(f"{m}: not testable (no finite per-seed overall score)")
            continue
        scored += 1
        ok, text = _versus(mean, sd, "base", base, None)
        oks.append(ok)
        parts.append(f"{m} {text}")
    if not scored:
        return "Student methods above the untrained base, overall: not testable (no per-seed overall scores in the file)."
    return (f"Student methods above the untrained base, overall ({', '.join(view.headline)}): {verdict(oks)}. "
            + "; ".join(parts) + ".")


def variance_reduction(view: ResultView) -> str:
    claim = f"Analytic gradient variance >= {VARIANCE_TARGET:g}x below the PPO-style estimator's"
    variance = as_dict(view.r.get("variance"))
    ratios = [v for v in (num(as_dict(r).get("ratio_ppo_over_analytic")) for r in as_list(variance.get("rows")))
              if v is not None]
    ratio = num(variance.get("ratio_ppo_over_analytic"))
    if ratio is None and not ratios:
        return f"{claim}: not testable (no variance experiment in the file)."
    ok = (ratio if ratio is not None else min(ratios)) >= VARIANCE_TARGET
    return (f"{claim}: {'held' if ok else 'did not hold'}. Ratio PPO-style / analytic {fmt_g(ratio)} at the reference setting"
            + (f"; {sum(v >= VARIANCE_TARGET for v in ratios)} of {len(ratios)} settings >= {VARIANCE_TARGET:g} "
               f"(range {fmt_g(min(ratios))} to {fmt_g(max(ratios))})" if ratios else "") + ".")


CLAIMS = (teacher_gains, share_kept, opd_versus_baselines, cascade_forgetting, variance_reduction, students_versus_base)


def findings_lines(view: ResultView) -> list[str]:
    """One line per claim of the paper, in the paper's order."""
    return [claim(view) for claim in CLAIMS]
