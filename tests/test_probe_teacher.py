"""The teacher probe behind T1-T14, L1-L2, O4-O6, S1-S5, W1-W2 and Q1-Q8 (issue 11): every gain it prints
pairs the teacher with the base on the same benchmark and sampler, so each equals the difference of
the two scores it prints beside it (GenEval's ``score`` gain: the tags' mean)."""

import json
import sys

import pytest


def test_every_gain_is_the_teacher_minus_the_base_on_its_own_benchmark_and_sampler(benchmark_script, monkeypatch, capsys):
    probe = benchmark_script("probe_teacher")
    monkeypatch.setattr(sys, "argv", [
        "probe_teacher.py", "--task", "geneval", "--steps", "1", "--eval-limit", "9", "--set", "prompts_per_step=1",
        "--set", "group_size=2", "--set", "lr=0.05", "--also", "pref", "--sampler", "3,0", "--sampler", "3,0/0/0.7"])
    probe.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def gain_of(scores):  # the two scores' difference, as the probe prints them (rounded to 4 places)
        return scores["teacher"]["score"] - scores["base"]["score"]

    own = {"base": out["base"], "teacher": out["teacher"]}
    assert out["gain_and_se"]["score"][0] == pytest.approx(gain_of(own), abs=2e-4)
    training = out["training_sampler"]
    assert out["training_sampler_gain_and_se"]["score"][0] == pytest.approx(gain_of(training), abs=2e-4)
    for label in ("3,0", "3,0/0/0.7"):  # one level, and one per step
        extra = out["samplers"][label]
        assert extra["gain_and_se"]["score"][0] == pytest.approx(gain_of(extra), abs=2e-4)
    pref = out["also"]["pref"]
    for sampler, key in (("ode", "gain_and_se"), ("training_sampler", "training_sampler_gain_and_se")):
        scores = {"base": pref["base"][sampler], "teacher": pref["teacher"][sampler]}
        assert pref[key]["pref"][0] == pytest.approx(gain_of(scores), abs=2e-4)
    # the teacher moved (lr 0.05), so the pairings above compare numbers that differ
    assert gain_of({"base": pref["base"]["ode"], "teacher": pref["teacher"]["ode"]}) != 0


def test_each_samplers_excess_over_the_ode_is_its_own_gain_minus_the_ode_gain(benchmark_script, monkeypatch, capsys):
    probe = benchmark_script("probe_teacher")
    labels = ("3,0", "3,0/0/0.7")
    monkeypatch.setattr(sys, "argv", [  # pref: a continuous score, so every sampler's gain differs
        "probe_teacher.py", "--task", "pref", "--steps", "1", "--eval-limit", "6", "--set", "prompts_per_step=1",
        "--set", "group_size=2", "--set", "lr=0.05", *[arg for label in labels for arg in ("--sampler", label)]])
    probe.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ode_gain = out["gain_and_se"]["pref"][0]
    excesses = [(out["training_sampler_excess_over_ode_and_se"], out["training_sampler_gain_and_se"]["pref"][0])]
    excesses += [(out["samplers"][label]["excess_over_ode_and_se"], out["samplers"][label]["gain_and_se"]["pref"][0])
                 for label in labels]
    gains = [gain for _, gain in excesses]
    assert len(set(gains)) == len(gains)  # three different gains, so pairing one with another's excess is caught
    for (excess, se), gain in excesses:
        assert excess == pytest.approx(gain - ode_gain, abs=2e-4) and se > 0


@pytest.mark.parametrize("text", ["3", "0,0", "3,-1", "3,0/0.7", "3,a", "3,0/0/0/0", "3,nan", "3,0/inf/0"])
def test_a_bad_sampler_is_refused_with_the_form_to_write(benchmark_script, text):
    probe = benchmark_script("probe_teacher")
    parser = probe.probe_parser("")
    with pytest.raises(SystemExit):
        probe.parse_sampler(parser, text, 4.5)


def test_a_sampler_takes_one_level_or_one_per_step(benchmark_script):
    probe = benchmark_script("probe_teacher")
    parser = probe.probe_parser("")
    assert probe.parse_sampler(parser, "8,0", 4.5) == (8, 4.5, 0.0)
    assert probe.parse_sampler(parser, "3,0/0/0.7", 4.5) == (3, 4.5, [0.0, 0.0, 0.7])
