"""`opd-bench run --set NAME=VALUE`: single fields of a preset changed, checked, and made part of the run's identity."""

import json

import pytest
from click.testing import CliRunner

from opd_bench.cli import main
from opd_bench.presets import OverrideError, apply_overrides, plan

TASKS = ("geneval", "ocr", "pref")


def test_each_kind_of_name_changes_its_field_and_nothing_else():
    before = plan("standard")
    after = apply_overrides(before, [
        "opd.lr=1",  # an integer for a float field: a float
        "opd-ppo.clip_range=0.1",
        "multi-reward.lora_rank=16",
        "teacher.steps=90",
        "teacher.pref.kl_beta=0.01",
        'cascade.stages=[["pref", 5], ["ocr", 7]]',
        "cascade.grpo.lr=1e-4",
        "opd.lr_schedule=cosine",  # a bare word is a string
        "eval_limit=64",
        "variance_batches=[2, 4]",
    ], tasks=TASKS)
    assert after.opd.lr == 1.0 and isinstance(after.opd.lr, float)
    assert after.opd_ppo.clip_range == 0.1 and after.multi_reward.lora_rank == 16
    assert after.teacher.steps == 90 and after.teacher_overrides == {"pref": {"kl_beta": 0.01}}
    assert after.cascade.stages == [("pref", 5), ("ocr", 7)] and after.cascade.total_steps == 12
    assert after.cascade.grpo.lr == 1e-4 and after.opd.lr_schedule == "cosine"
    assert after.eval_limit == 64 and after.variance_batches == (2, 4)
    untouched = {k: v for k, v in after.to_dict().items()
                 if k not in ("opd", "opd_ppo", "multi_reward", "teacher", "teacher_overrides", "cascade", "eval_limit", "variance_batches")}
    assert untouched == {k: v for k, v in before.to_dict().items() if k in untouched}
    assert after.opd.steps == before.opd.steps and after.multi_reward.lr == before.multi_reward.lr


def test_one_tasks_teacher_keeps_the_presets_own_per_task_changes():
    paper = plan("paper")  # the paper's pref teacher has its own kl_beta
    after = apply_overrides(paper, ["teacher.pref.lr=2e-4", "teacher.ocr.kl_beta=0.02"], tasks=TASKS)
    assert after.teacher_overrides == {"pref": {**paper.teacher_overrides["pref"], "lr": 2e-4}, "ocr": {"kl_beta": 0.02}}


@pytest.mark.parametrize("pair, message", [
    ("opd.lrr=1", "OPDConfig has no field 'lrr' (did you mean 'lr'?)"),
    ("opdd.lr=1", "no section or field 'opdd' (did you mean 'opd'?)"),
    ("evl_limit=3", "(did you mean 'eval_limit'?)"),
    ("teacher.prf.kl_beta=0.1", "the suite has no task 'prf' (did you mean 'pref'?)"),
    ("opd.steps=1.5", "opd.steps=1.5: takes an integer"),
    ("opd.detach_uncond=1", "takes true or false"),
    ("opd.lr=-1", "invalid OPD config value(s): lr=-1.0 (needs > 0)"),
    ("opd-ppo.clip_range=-1", "clip_range=-1.0 (needs > 0)"),
    ("teacher.group_size=1", "group_size=1 (needs >= 2: advantages need a group)"),
    ("opd.mode=ppx", "mode='ppx' (needs one of 'analytic', 'ppo')"),
    ("teacher.adv_std=grp", "adv_std='grp' (needs one of 'group', 'batch')"),  # refused before any training, not at its first step
    ("opd.lr=Infinity", "lr=inf (needs a finite number)"),
    ('opd.teacher_guidance={"pref": -5}', "teacher_guidance={'pref': -5} (needs a finite scale >= 0 for each task)"),
    ("opd.seed=3", "use --seeds instead"),
    ("cascade.grpo=3", "is a config of its own"),
    ("opd", "is not NAME=VALUE"),
    ("opd=3", "opd is a config; set one of its fields"),
    ("eval_limit=0", "invalid run plan value(s): eval_limit=0 (needs an integer >= 1, or null: every test prompt)"),
    ("opd.eval_limit=64", "use --set train_eval_limit=N"),  # a trainer field nothing reads
    ("cascade.grpo.eval_limit=64", "use --set train_eval_limit=N"),
    ("cascade.grpo.steps=100", "the cascade trains the steps of its stages ([[\"geneval\", 1], [\"ocr\", 1]])"),
    ('cascade.stages=[["prf", 2]]', "the suite has no task 'prf'"),
    ('opd.teacher_guidance={"gneval": 3}', "--set opd.teacher_guidance: the suite has no task 'gneval' (did you mean 'geneval'?)"),
    ('multi-reward.reward_weights={"ocr": 1}', "with reward_mode='own' each sample has its own task's reward alone"),
    ('cascade.grpo.reward_weights={"ocr": 2}', "--set cascade.grpo.reward_weights: a teacher or cascade stage trains on its own"),
    ('teacher.reward_weights={"geneval": 2}', "--set teacher.reward_weights: a teacher or cascade stage"),
    ('teacher.ocr.reward_weights={"gneval": 2}', "--set teacher.ocr.reward_weights: a teacher or cascade stage"),
    ("eval_limit=None", 'eval_limit="None": takes an integer, or null, e.g. eval_limit=2'),  # JSON's null, not Python's
    ("opd.ema=fast", 'opd.ema="fast": takes a number, or null, e.g. opd.ema=0.0'),
    ("teacher.pref.lr.x=4", "--set teacher.pref.lr.x: the name has too many parts; a teacher's field is teacher.FIELD "
                            "or teacher.TASK.FIELD"),
    # the variance ratio is read at this point of the grid: a point outside it gave NaN at the end of the run
    ("variance_reference=[2]", "variance_reference=(2,) (needs a pair [batch, noise level] with the batch one of "
                               "variance_batches [1, 2] and the noise level one of variance_noise_levels [0.7])"),
    ('variance_reference=["a", "b"]', "variance_reference=('a', 'b') (needs a pair [batch, noise level]"),
    ("variance_reference=[4, 0.7]", "variance_reference=(4, 0.7) (needs a pair [batch, noise level]"),
    ("variance_reference=[2, 0.3]", "variance_reference=(2, 0.3) (needs a pair [batch, noise level]"),
    ("variance_noise_levels=[0.3]", "variance_reference=(2, 0.7) (needs a pair [batch, noise level]"),
    ("variance_noise_levels=[0, 0.7]", "variance_noise_levels=(0, 0.7) (needs a non-empty list of numbers > 0)"),
])
def test_a_bad_change_is_refused_with_the_fix(pair, message):
    with pytest.raises(OverrideError) as error:
        apply_overrides(plan("smoke"), [pair], tasks=TASKS)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_float_field_takes_a_fraction_where_the_preset_holds_a_whole_number():
    standard = plan("standard")
    assert standard.teacher.lora_alpha == 16 and isinstance(standard.teacher.lora_alpha, int)  # annotated float
    assert apply_overrides(standard, ["teacher.lora_alpha=32.5"], tasks=TASKS).teacher.lora_alpha == 32.5
    assert apply_overrides(standard, ["teacher.pref.lora_alpha=8.5"], tasks=TASKS).teacher_for("pref").lora_alpha == 8.5
    same = apply_overrides(standard, ["teacher.lora_alpha=16"], tasks=TASKS)  # no change: the plan's JSON is the preset's
    assert json.dumps(same.to_dict()) == json.dumps(standard.to_dict())


def test_a_per_task_teacher_change_equal_to_the_teacher_wide_value_is_no_change():
    standard = plan("standard")
    assert apply_overrides(standard, [f"teacher.pref.lr={standard.teacher.lr}"], tasks=TASKS) == standard
    # equal to the teacher-wide value as it ends up, whatever the order
    after = apply_overrides(standard, ["teacher.pref.lr=2e-3", "teacher.lr=2e-3", "teacher.ocr.lr=1e-3"], tasks=TASKS)
    assert after.teacher.lr == 2e-3 and after.teacher_overrides == {"ocr": {"lr": 1e-3}}
    paper = plan("paper")  # its pref teacher's own kl_beta, set teacher-wide: one value for all
    assert apply_overrides(paper, ["teacher.kl_beta=0.01"], tasks=TASKS).teacher_overrides == {}


def test_a_teacher_trained_at_another_cfg_scale_is_queried_at_its_own_or_refused():
    # PAPER.md: each teacher is queried at its own CFG scale; the fallback is the student's
    for name in ("smoke", "standard", "paper"):
        apply_overrides(plan(name), [], tasks=TASKS)  # the presets' teachers and students agree
    with pytest.raises(OverrideError) as error:
        apply_overrides(plan("standard"), ["teacher.ocr.guidance_scale=1.0"], tasks=TASKS)
    assert str(error.value) == (
        "--set: the ocr teacher(s) train at another CFG scale than opd's 4.5, which opd would query them at; "
        "add --set opd.teacher_guidance='{\"ocr\": 1}' (each teacher's own scale), or name 4.5 there to keep the student's")
    with pytest.raises(OverrideError, match="than opd-ppo's 4.5"):  # opd's now named; opd-ppo's still falls back
        apply_overrides(plan("standard"), ["teacher.ocr.guidance_scale=1.0", 'opd.teacher_guidance={"ocr": 1}'], tasks=TASKS)
    both = ['opd.teacher_guidance={"ocr": 1}', 'opd-ppo.teacher_guidance={"ocr": 4.5}']  # 4.5 on purpose: allowed
    after = apply_overrides(plan("standard"), ["teacher.ocr.guidance_scale=1.0", *both], tasks=TASKS)
    assert after.opd.teacher_guidance == {"ocr": 1.0} and after.opd_ppo.teacher_guidance == {"ocr": 4.5}


def test_multi_reward_switches_to_a_weighted_sum_in_any_order():
    after = apply_overrides(plan("standard"), ["multi-reward.reward_mode=weighted-sum"], tasks=TASKS)
    assert (after.multi_reward.reward_mode, after.multi_reward.aggregation) == ("weighted-sum", "sum-then-normalise")
    for pairs in (["multi-reward.aggregation=normalise-then-sum", "multi-reward.reward_mode=weighted-sum"],
                  ["multi-reward.reward_mode=weighted-sum", "multi-reward.aggregation=normalise-then-sum"]):
        after = apply_overrides(plan("standard"), pairs + ['multi-reward.reward_weights={"pref": 2}'], tasks=TASKS)
        assert (after.multi_reward.aggregation, after.multi_reward.reward_weights) == ("normalise-then-sum", {"pref": 2})
    with pytest.raises(OverrideError, match="--set multi-reward.reward_weights: the suite has no task 'prf'"):
        apply_overrides(plan("standard"), ["multi-reward.reward_mode=weighted-sum", 'multi-reward.reward_weights={"ocr": 1, "prf": 2}'], tasks=TASKS)
    # weights that reward_mode='own' would never read are refused, not ignored
    with pytest.raises(OverrideError, match="reward_weights weigh the rewards of reward_mode='weighted-sum'"):
        apply_overrides(plan("standard"), ['multi-reward.reward_weights={"pref": 2}'], tasks=TASKS)


def test_a_changed_preset_is_another_experiment(tmp_path):
    from opd_bench.harness import Harness

    out = tmp_path / "run"
    plain = Harness(out, preset="smoke", seeds=[0], progress=False)
    changed = Harness(tmp_path / "other", preset="smoke", seeds=[0], progress=False,
                      overrides=["teacher.pref.kl_beta=0.02", "opd.steps=1"])
    assert changed.plan.opd.steps == 1 and changed.options["overrides"] == ["teacher.pref.kl_beta=0.02", "opd.steps=1"]
    assert changed.teacher_dir("pref").name != plain.teacher_dir("pref").name  # its own teacher
    assert changed.teacher_dir("ocr").name == plain.teacher_dir("ocr").name  # the others are shared
    (out / "teachers").mkdir()  # once work is saved, the folder is bound to its plan
    with pytest.raises(FileExistsError, match=r"another suite, suite config, model, preset or --set change .*; to go on with it, "
                       r"rerun with its saved settings .*link its old path.* \(--force deletes this run's trained work\)$"):
        Harness(out, preset="smoke", seeds=[0], progress=False, overrides=["opd.steps=1"])
    assert json.loads((out / "run.json").read_text())["plan"]["opd"]["steps"] == plain.plan.opd.steps
    # a --set that leaves the preset as it is changes nothing, and is recorded as no change
    same = Harness(out, preset="smoke", seeds=[0], progress=False, overrides=[f"opd.steps={plain.plan.opd.steps}"])
    assert same.overrides == [] and same.options["overrides"] == []


def test_the_cli_refuses_a_bad_change_in_one_line_before_touching_the_folder(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--set", "opd.lrr=1", "--out", str(out), "--no-report"])
    assert result.exit_code == 1 and "did you mean 'lr'?" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_run_with_changes_is_not_listed():
    from fake_results import make_results

    from opd_bench.leaderboard import SubmissionError, check_listable

    results = make_results()
    check_listable(results)
    results["config"]["overrides"] = ["opd.lr=0.01"]
    with pytest.raises(SubmissionError, match="changed its standard preset with --set opd.lr=0.01"):
        check_listable(results)


def test_an_optional_field_takes_its_own_type_or_null():
    smoke = plan("smoke")
    assert smoke.opd.ema is None and smoke.eval_limit == 2
    on = apply_overrides(smoke, ["opd.ema=0.9", "eval_limit=null"], tasks=TASKS)
    assert on.opd.ema == 0.9 and on.eval_limit is None
    assert apply_overrides(on, ["opd.ema=null"]).opd.ema is None
    with pytest.raises(OverrideError, match="takes a number"):
        apply_overrides(smoke, ["opd.ema=fast"])


def test_a_dry_run_prints_the_changed_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--method", "opd", "--set", "opd.steps=7",
                                       "--set", "teacher.pref.lr=1e-4", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["methods"] == ["opd"] and shown["seeds"] == [0] and shown["overrides"] == ["opd.steps=7", "teacher.pref.lr=1e-4"]
    assert shown["plan"]["opd"]["steps"] == 7 and shown["plan"]["teacher_overrides"] == {"pref": {"lr": 1e-4}}
    assert shown["plan"]["multi_reward"] == json.loads(json.dumps(plan("smoke").to_dict()))["multi_reward"]
    assert not out.exists()


def test_a_set_file_is_a_list_of_set_changes_that_the_command_line_overrides(tmp_path):
    changes = tmp_path / "changes.txt"
    changes.write_text('# my variant\nopd.steps=7\n\n  cascade.stages=[["pref", 2], ["ocr", 1]]\nopd.lr=1e-4\n')
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--set-file", str(changes), "--set", "opd.lr=5e-4",
                                       "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    # recorded (and so part of the run's identity) as if each line had been a --set, the file's first
    assert shown["overrides"] == ["opd.steps=7", 'cascade.stages=[["pref", 2], ["ocr", 1]]', "opd.lr=1e-4", "opd.lr=5e-4"]
    assert shown["plan"]["opd"]["steps"] == 7 and shown["plan"]["opd"]["lr"] == 5e-4
    assert shown["plan"]["cascade"]["stages"] == [["pref", 2], ["ocr", 1]]

    changes.write_text("opd.steps=7\nopd.steps 9\n")
    result = CliRunner().invoke(main, ["run", "--set-file", str(changes), "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code != 0 and f"{changes}:2: 'opd.steps 9' is not NAME=VALUE" in result.output
    changes.write_text("opd.stepz=7\n")
    result = CliRunner().invoke(main, ["run", "--set-file", str(changes), "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code != 0 and "did you mean 'steps'" in result.output
    changes.write_bytes(b"\xef\xbb\xbfopd.steps=7\n")  # a byte-order mark, as some editors save
    result = CliRunner().invoke(main, ["run", "--set-file", str(changes), "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0 and json.loads(result.output)["plan"]["opd"]["steps"] == 7, result.output
    changes.write_bytes(b"opd.steps=\xff\n")
    result = CliRunner().invoke(main, ["run", "--set-file", str(changes), "--out", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code != 0 and f"{changes} is not UTF-8 text (invalid start byte at byte 10); save it as UTF-8" in result.output
