import json
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

from opd_bench import rewards
from opd_bench.baselines.cascade import CascadeTrainer
from opd_bench.baselines.multi_reward import MultiRewardConfig, MultiRewardTrainer
from opd_bench.policy import Policy
from opd_bench.presets import plan
from opd_bench.rl import clipped_policy_loss, group_advantages, zero_spread_share
from opd_bench.rollout import Prompt
from opd_bench.training import read_metrics, scheduled_lr
from opd_bench.trainers import grpo as grpo_module
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
from opd_bench.trainers.opd import OPDConfig, OPDTrainer
from opd_bench.trainers.teachers import train_teacher
from opd_bench.trainers.variance import estimate_gradients, variance_experiment

POOLS = {
    "bright": [Prompt("a white square", "bright"), Prompt("a yellow star", "bright")],
    "red": [Prompt("a red circle", "red"), Prompt("a red heart", "red")],
}
REWARDS = {"bright": rewards.get("toy/brightness"), "red": rewards.get("toy/color", target=(1, 0, 0))}
SMOKE = plan("smoke")  # the smoke run's configs: the smallest that exercise every code path


def _snapshot(policy):
    return {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}


def _changed(before, policy):
    """Parameters that changed since ``before``, or were added since (a new adapter)."""
    return {n for n, p in policy.transformer.named_parameters() if n not in before or not torch.equal(before[n], p)}


def _teacher(tiny_dir, folder, scale=0.3, seed=1):
    policy = Policy.from_pretrained(str(tiny_dir))
    policy.add_adapter("t", rank=8, alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters("t"):
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy.save_adapter("t", folder)


# ---------------------------------------------------------------------------- the math


def test_group_advantages_by_hand():
    rewards_ = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    # ddof=1 (the unbiased option; the ddof=0 default is pinned in test_grpo_reference.py)
    adv = group_advantages(rewards_, group, eps=0.0, clip=None, ddof=1)
    s = 2**0.5  # unbiased std of (1, 3) and of (0, 4) is sqrt(2) and 2 sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 1 / s, 0.0, 0.0, -2 / (2 * s), 2 / (2 * s)]))
    batch = group_advantages(rewards_, group, std="batch", eps=0.0, clip=None, ddof=1)
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / rewards_.std())
    # population std (default): 1 for (1, 3), 2 for (0, 4)
    population = group_advantages(rewards_, group, eps=0.0, clip=None)
    torch.testing.assert_close(population, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    assert group_advantages(torch.tensor([0.0, 100.0]), torch.tensor([0, 0]), clip=0.5).abs().max() == 0.5
    assert zero_spread_share(rewards_, group) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))


def test_clipped_loss_by_hand():
    new, old = torch.log(torch.tensor([1.5, 0.5, 1.1])), torch.zeros(3)
    adv = torch.tensor([1.0, -2.0, 3.0])
    loss, stats = clipped_policy_loss(new, old, adv, clip_range=0.2)
    # sample 0: max(-1.5, -1.2) = -1.2; sample 1: max(1.0, 1.6) = 1.6; sample 2: max(-3.3, -3.3) = -3.3
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.6, -3.3]))
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    # where the ratio left the range on the side that does not help, the unclipped term wins:
    # ratio 1.5 with A = -1: max(1.5, 1.2) = 1.5; ratio 0.5 with A = +1: max(-0.5, -0.8) = -0.5
    new = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    loss, stats = clipped_policy_loss(new, torch.zeros(2), torch.tensor([-1.0, 1.0]), clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([1.5, -0.5]))
    assert stats["approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    loss.sum().backward()  # d(-A rho)/d log p = -A rho: the unclipped terms keep their gradient
    torch.testing.assert_close(new.grad, torch.tensor([1.5, -0.5]))
    clipped = torch.log(torch.tensor([1.5])).requires_grad_()
    clipped_policy_loss(clipped, torch.zeros(1), torch.tensor([1.0]), clip_range=0.2)[0].sum().backward()
    assert clipped.grad.item() == 0  # a clipped term that wins carries no gradient


def test_grpo_loss_matches_hand_computation_on_a_tiny_batch(policy):
    """The micro-batched, accumulated GRPO gradient equals the gradient of the hand-written loss."""
    # clip_range wide: recomputing a log-prob in another batch size moves the ratio by ~1e-5, which a
    # 1e-4 clip would already catch on some pairs; here the test is the accumulation itself.
    config = GRPOConfig(prompts_per_step=1, group_size=2, num_steps=2, train_fraction=1.0, micro_batch=1, adv_clip=None, clip_range=0.5)
    policy.add_adapter("student", rank=2)
    with torch.no_grad():
        for p in policy.parameters("student"):
            p.add_(0.1 * torch.randn_like(p))
    params = policy.parameters("student")
    metrics, _ = grpo_module.grpo_step(policy, "student", POOLS["bright"][:1], {"bright": REWARDS["bright"]}, config, seed=3, params=params)
    engine_grad = [p.grad.clone() for p in params]
    # By hand: same rollout, reward, advantages; loss = mean over the 4 (sample, step) pairs of -A * ratio.
    from opd_bench.rl import step_at
    from opd_bench.rollout import rollout

    for p in params:
        p.grad = None
    with policy.use("student"):
        t = rollout(policy, POOLS["bright"][:1], images_per_prompt=2, num_steps=2, noise_level=0.7, guidance_scale=4.5, seed=3, keep={"latents", "images"})
        r = REWARDS["bright"](t.images, t.prompts, t.metadata).scores
        a = (r - r.mean()) / (r.std(correction=0) + 1e-4)  # Flow-GRPO: population std
        index, step = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
        current = step_at(policy, t, index, step, guidance_scale=4.5, detach_uncond=True)
    ratio = torch.exp(current.log_prob - t.log_probs[index, step])
    (-a[index] * ratio).mean().backward()
    assert metrics["loss"] == pytest.approx((-a[index] * ratio).mean().item(), abs=1e-6)
    for mine, theirs in zip(engine_grad, params):
        # float32 noise of the re-evaluated log-density (divided by small step stds) reaches ~1e-3 of
        # the scale; a wrong sign, scale or missing pair would be off by O(1)
        torch.testing.assert_close(mine, theirs.grad, rtol=0, atol=1e-2 * float(mine.abs().max()))


# -------------------------------------------------------------------- one step of each


def test_grpo_step_changes_only_the_trained_adapter(policy, tmp_path):
    config = replace(SMOKE.teacher, steps=1, eval_every=0, lr=1e-2)
    trainer = GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path)
    before = _snapshot(policy)
    trainer.train(progress=False)
    changed = _changed(before, policy)
    assert changed and all(".student." in n for n in changed)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in ("loss", "reward/red/mean", "reward/red/std", "zero_spread_share", "grad/norm", "student_forwards", "images", "wall_seconds"):
        assert key in record
    assert (tmp_path / "DONE").exists() and (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_an_ema_run_saves_the_average_and_trains_on_the_live_weights(policy, tmp_path):
    from safetensors.torch import load_file

    config = replace(SMOKE.teacher, steps=2, eval_every=0, lr=1e-2, ema=0.5)
    trainer = GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "run")
    live = [[p.detach().clone() for p in trainer.params]]  # w0, then the weights after each step
    update = trainer.ema.update

    def recording_update():
        live.append([p.detach().clone() for p in trainer.params])
        update()

    trainer.ema.update = recording_update
    trainer.train(progress=False)
    assert len(live) == 3 and any(not torch.equal(a, b) for a, b in zip(live[0], live[2]))
    for w0, w1, w2, shadow, now in zip(*live, trainer.ema.shadow, trainer.params):
        torch.testing.assert_close(shadow, 0.5 * (0.5 * w0 + 0.5 * w1) + 0.5 * w2)  # decay 0.5, two updates
        assert torch.equal(now, w2)  # the live weights go on training; the average is only saved
    trainer.ema.swap()
    policy.save_adapter("student", tmp_path / "average")
    trainer.ema.swap()
    saved, average = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors"), load_file(tmp_path / "average" / "adapter_model.safetensors")
    assert saved.keys() == average.keys() and all(torch.equal(saved[k], average[k]) for k in saved)


def test_opd_step_changes_the_student_not_the_teachers(policy, tiny_dir, tmp_path):
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    config = replace(SMOKE.opd, steps=1, eval_every=0, lr=1e-2)
    trainer = OPDTrainer(config, policy=policy, prompts=POOLS, teachers={"bright": teacher, "red": teacher}, rewards=REWARDS, run_dir=tmp_path / "run")
    before = _snapshot(policy)
    trainer.train(progress=False)
    changed = _changed(before, policy)
    assert changed and all(".student." in n for n in changed)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["teacher_forwards"] > 0 and record["kl"] > 0 and "kl/bright" in record and "reward/red/mean" in record


def test_monitoring_rewards_changes_the_logs_not_the_trained_weights(tiny_dir, tmp_path):
    """The standard preset turns the students' reward monitoring off to save time; that must not
    change what they learn (rewards are never in the OPD loss, and scoring draws no random numbers)."""
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    weights, logs = {}, {}
    for monitor in (True, False):
        policy = Policy.from_pretrained(str(tiny_dir))
        config = replace(SMOKE.opd, steps=2, eval_every=0, lr=1e-2, monitor_rewards=monitor)
        OPDTrainer(config, policy=policy, prompts=POOLS, teachers={"bright": teacher, "red": teacher}, rewards=REWARDS,
                   run_dir=tmp_path / str(monitor)).train(progress=False)
        weights[monitor] = [p.detach().clone() for p in policy.parameters("student")]
        logs[monitor] = read_metrics(tmp_path / str(monitor) / "metrics.jsonl")[-1]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))
    assert "reward/red/mean" in logs[True] and not any(k.startswith("reward/") for k in logs[False])
    assert logs[True]["loss"] == logs[False]["loss"]


def test_opd_ppo_mode_trains_and_refuses_deterministic_steps(policy, tiny_dir, tmp_path):
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    with pytest.raises(ValueError, match="noise_level > 0"):
        OPDConfig(mode="ppo", noise_level=0.0)
    config = replace(SMOKE.opd, mode="ppo", noise_level=0.7, steps=1, eval_every=0, lr=1e-2)
    trainer = OPDTrainer(config, policy=policy, prompts=POOLS, teachers={"bright": teacher, "red": teacher}, run_dir=tmp_path / "run")
    before = _snapshot(policy)
    trainer.train(progress=False)
    assert _changed(before, policy) and all(".student." in n for n in _changed(before, policy))


def test_opd_loss_is_zero_when_the_student_is_the_teacher(policy, tiny_dir, tmp_path):
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    config = replace(SMOKE.opd, steps=1, eval_every=0)
    trainer = OPDTrainer(config, policy=policy, prompts=POOLS, teachers={"bright": teacher, "red": teacher}, run_dir=tmp_path / "run")
    policy.copy_adapter_weights("student", teacher)
    trainer.train(progress=False)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["loss"] == 0 and record["grad/norm"] == 0


def test_multi_reward_and_cascade_steps(policy, tmp_path):
    multi = MultiRewardTrainer(
        replace(SMOKE.multi_reward, steps=1, eval_every=0), policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "multi"
    )
    before = _snapshot(policy)
    multi.train(progress=False)
    assert _changed(before, policy)
    record = read_metrics(tmp_path / "multi" / "metrics.jsonl")[-1]
    assert "reward/bright/mean" in record and "reward/red/mean" in record

    cascade_config = replace(SMOKE.cascade, stages=[("bright", 1), ("red", 2)])
    cascade_config = replace(cascade_config, grpo=replace(cascade_config.grpo, eval_every=0))
    cascade = CascadeTrainer(cascade_config, policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "cascade", adapter="cascade")
    before = _snapshot(policy)
    cascade.train(progress=False)
    changed = _changed(before, policy)
    assert changed and all(".cascade." in n for n in changed)
    assert any(p.abs().sum() > 0 for n, p in policy.transformer.named_parameters() if ".lora_B.cascade." in n)  # trained from B = 0
    records = read_metrics(tmp_path / "cascade" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and [r["stage_task"] for r in records] == ["bright", "red", "red"]
    assert records[2]["images"] == 3 * records[0]["images"]


def test_multi_reward_balances_its_tasks_without_dropping_prompts():
    from opd_bench.baselines.multi_reward import interleave

    assert interleave({"a": [1, 2, 3], "b": [4]}) == [1, 4, 2, 4, 3, 4]  # every prompt of a; b as often as a
    assert interleave({"a": [1, 2], "b": [3, 4]}) == [1, 3, 2, 4]  # equal pools (the tiny suite's): their union
    with pytest.raises(ValueError, match=r"no prompts for task\(s\) \['b'\]"):
        interleave({"a": [1], "b": []})


def test_weighted_sum_aggregations():
    scores = {"a": torch.tensor([1.0, 0.0, 2.0, 2.0]), "b": torch.tensor([0.0, 10.0, float("nan"), 0.0])}
    group, tasks = torch.tensor([0, 0, 1, 1]), ["a", "a", "b", "b"]
    config = MultiRewardConfig(reward_mode="weighted-sum", aggregation="sum-then-normalise", reward_weights={"a": 1.0, "b": 0.5})
    total, adv = grpo_module.aggregate_advantages(scores, group, tasks, config)
    torch.testing.assert_close(total, torch.tensor([1.0, 5.0, 2.0, 2.0]))
    assert adv[0] < 0 < adv[1] and adv[2] == adv[3] == 0
    # normalise-then-sum, by hand (eps 1e-4, population std): each reward over the samples it
    # applies to; b's NaN sample gets 0 from b and does not enter b's std.
    config = replace(config, aggregation="normalise-then-sum", adv_std="group")
    _, adv = grpo_module.aggregate_advantages(scores, group, tasks, config)
    # group 0: a (1, 0) -> +-0.5 / 0.5, b (0, 10) -> -+5 / 5, weighted 0.5; group 1: a equal, b alone
    first = 0.5 / (0.5 + 1e-4) - 0.5 * 5 / (5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([first, -first, 0.0, 0.0]))
    config = replace(config, adv_std="batch")
    _, adv = grpo_module.aggregate_advantages(scores, group, tasks, config)
    std_a = torch.tensor([1.0, 0.0, 2.0, 2.0]).std(correction=0).item()  # 0.829
    std_b = torch.tensor([0.0, 10.0, 0.0]).std(correction=0).item()  # 4.714: the NaN sample left out (with it as 0: 4.330)
    first = 0.5 / (std_a + 1e-4) - 0.5 * 5 / (std_b + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([first, -first, 0.0, 0.0]))
    assert abs(first - 0.0726) < 1e-3
    with pytest.raises(ValueError, match="reward_mode='own'"):
        MultiRewardConfig(reward_mode="own", aggregation="normalise-then-sum")


def test_weighted_sum_rollout_logs_each_tasks_own_reward(policy):
    """In the sum modes a sample's reward is the weighted total; the per-task curves still show the
    task's own reward on its samples, and the total has its own key."""
    prompts = [POOLS["bright"][0], POOLS["red"][0]]
    config = replace(SMOKE.multi_reward, reward_mode="weighted-sum", aggregation="sum-then-normalise",
                     reward_weights={"bright": 1.0, "red": 3.0}, group_size=2, num_steps=2, train_fraction=0.5)
    batch = grpo_module.grpo_rollout(policy, prompts, REWARDS, config, seed=0)
    images = batch.trajectory.images
    for task, index in (("bright", [0, 1]), ("red", [2, 3])):
        own = REWARDS[task](images[index], [prompts[index[0] // 2].text] * 2, [{}] * 2).scores
        assert batch.metrics[f"reward/{task}/mean"] == pytest.approx(float(own.mean()), abs=1e-6)
    both = [REWARDS[name](images, [p.text for p in prompts for _ in range(2)], [{}] * 4).scores for name in ("bright", "red")]
    assert batch.metrics["reward/weighted_sum/mean"] == pytest.approx(float((both[0] + 3 * both[1]).mean()), abs=1e-6)


def test_configs_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="mode"):
        OPDConfig(mode="reinforce")
    with pytest.raises(ValueError, match="lr_schedule"):
        OPDConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_schedule"):
        GRPOConfig(lr_schedule="step")


def test_learning_rate_schedules_by_hand():
    assert [scheduled_lr(1e-3, "constant", k, 4) for k in range(4)] == [1e-3] * 4
    # half a cosine over 4 steps: 1, (1 + cos 45deg) / 2, 1/2, (1 - cos 45deg) / 2
    expected = [1e-3, 1e-3 * (1 + 2**-0.5) / 2, 5e-4, 1e-3 * (1 - 2**-0.5) / 2]
    assert [scheduled_lr(1e-3, "cosine", k, 4) for k in range(4)] == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        scheduled_lr(1e-3, "linear", 0, 4)


# ------------------------------------------------------------------------ resume


def _interruptible(trainer, fail_after):
    if fail_after is not None:
        original = trainer.run.end_step

        def end_step(step, metrics, images):
            original(step, metrics, images)
            if step == fail_after:
                raise KeyboardInterrupt("killed")

        trainer.run.end_step = end_step
    return trainer


def _grpo_run(tiny_dir, run_dir, fail_after=None, task="red"):
    policy = Policy.from_pretrained(str(tiny_dir))
    config = replace(SMOKE.teacher, steps=3, eval_every=0, checkpoint_every=1, lr=1e-2)
    trainer = GRPOTrainer(config, policy=policy, prompts=POOLS[task], rewards={task: REWARDS[task]}, run_dir=run_dir)
    _interruptible(trainer, fail_after).train(progress=False)
    return policy


def _opd_run(tiny_dir, teacher, run_dir, fail_after=None):
    policy = Policy.from_pretrained(str(tiny_dir))
    config = replace(SMOKE.opd, steps=3, eval_every=0, checkpoint_every=1, lr=1e-2, lr_schedule="cosine")
    trainer = OPDTrainer(config, policy=policy, prompts=POOLS, teachers={"bright": teacher, "red": teacher}, rewards=REWARDS, run_dir=run_dir)
    _interruptible(trainer, fail_after).train(progress=False)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([0.25e-2])  # the last step's rate was used
    return policy


def test_a_killed_run_resumes_and_continues_the_same_curve(tiny_dir, tmp_path):
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    straight = _opd_run(tiny_dir, teacher, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _opd_run(tiny_dir, teacher, tmp_path / "killed", fail_after=2)
    assert not (tmp_path / "killed" / "DONE").exists()
    resumed = _opd_run(tiny_dir, teacher, tmp_path / "killed")
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    # the schedule is a function of the step: the resumed step 3 takes the same small rate
    assert [r["lr"] for r in b] == pytest.approx([1e-2, 0.75e-2, 0.25e-2])
    for key in ("loss", "kl/bright", "kl/red", "reward/red/mean", "grad/norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-4, abs=1e-7), key
    assert (b[2]["student_forwards"], b[2]["teacher_forwards"], b[2]["images"]) == (a[2]["student_forwards"], a[2]["teacher_forwards"], a[2]["images"])
    for p, q in zip(straight.parameters("student"), resumed.parameters("student")):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_killed_grpo_run_resumes_on_the_same_prompts_and_noise(tiny_dir, tmp_path):
    _grpo_run(tiny_dir, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _grpo_run(tiny_dir, tmp_path / "killed", fail_after=1)
    _grpo_run(tiny_dir, tmp_path / "killed")
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["images"] for r in b] == [r["images"] for r in a]
    for key in ("reward/red/mean", "grad/norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-3), key


def test_a_killed_two_update_grpo_run_resumes_on_the_next_rollout(tiny_dir, tmp_path):
    """With two updates per rollout a run checkpoints between rollouts: killed after step 3, mid-
    rollout, it resumes from step 2's checkpoint with a new rollout and repeats step 3's numbers."""
    config = GRPOConfig(steps=4, prompts_per_step=2, group_size=4, num_steps=3, train_fraction=0.67, micro_batch=64,
                        eval_every=0, checkpoint_every=2, lr=1e-2, clip_range=0.2, updates_per_rollout=2)

    def run(folder, fail_after=None):
        trainer = GRPOTrainer(config, policy=Policy.from_pretrained(str(tiny_dir)), prompts=POOLS["red"],
                              rewards={"red": REWARDS["red"]}, run_dir=folder)
        _interruptible(trainer, fail_after).train(progress=False)

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", fail_after=3)
    run(tmp_path / "killed")
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "killed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["images"] for r in b] == [r["images"] for r in a] == [16, 16, 32, 32]
    for key in ("reward/red/mean", "approx_kl", "grad/norm"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-3, abs=1e-9), key


def test_a_run_resumed_on_another_thread_count_says_its_numbers_will_differ(tiny_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(KeyboardInterrupt):
            _grpo_run(tiny_dir, tmp_path / "killed", fail_after=1)
        torch.set_num_threads(2)
        capsys.readouterr()
        _grpo_run(tiny_dir, tmp_path / "killed")
    finally:
        torch.set_num_threads(threads)
    warning = capsys.readouterr().err
    assert "on 2 torch threads where it ran on 1" in warning and "--threads 1" in warning
    assert (tmp_path / "killed" / "DONE").exists()


def test_a_run_resumed_with_another_max_batch_says_its_numbers_will_differ(tiny_dir, tmp_path, capsys):
    config = replace(SMOKE.teacher, steps=3, eval_every=0, checkpoint_every=1)

    def run(max_batch, fail_after=None):
        policy = Policy.from_pretrained(str(tiny_dir), max_batch=max_batch)
        trainer = GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "run")
        _interruptible(trainer, fail_after).train(progress=False)

    with pytest.raises(KeyboardInterrupt):
        run(None, fail_after=1)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(2, fail_after=2)  # killed again, after a checkpoint made with --max-batch 2
    assert "with --max-batch 2 where it ran with no --max-batch" in capsys.readouterr().err
    run(2)
    assert "max-batch" not in capsys.readouterr().err and (tmp_path / "run" / "DONE").exists()


def test_a_killed_run_is_not_resumed_on_other_prompts_or_rewards(tiny_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _grpo_run(tiny_dir, tmp_path / "killed", fail_after=1)
    saved = tmp_path / "killed" / "config.json"
    recorded = json.loads(saved.read_text())
    saved.write_text(json.dumps({k: v for k, v in recorded.items() if k != "data"}))  # as a run killed before the record
    with pytest.raises(KeyboardInterrupt):
        _grpo_run(tiny_dir, tmp_path / "killed", fail_after=2)  # resumed, not refused
    saved.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r'different config \(data.prompts_sha256: "[0-9a-f]{16}" saved, "[0-9a-f]{16}" now; data.rewards: \["red"\] saved, \["bright"\] now\)'):
        _grpo_run(tiny_dir, tmp_path / "killed", task="bright")


def test_finished_runs_are_not_overwritten_and_configs_must_match(tiny_dir, tmp_path):
    _grpo_run(tiny_dir, tmp_path / "run")
    with pytest.raises(FileExistsError, match="finished run"):
        _grpo_run(tiny_dir, tmp_path / "run")
    (tmp_path / "other" / "checkpoint").mkdir(parents=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["lr_schedule"]  # as a run made before the field existed
    (tmp_path / "other" / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))
    with pytest.raises(ValueError, match=r'different config \(lr: 0.5 saved, 0.01 now; lr_schedule: absent saved, "constant" now\)'):
        _grpo_run(tiny_dir, tmp_path / "other")


def test_teachers_are_reused_for_the_same_base_task_and_config(policy, tmp_path):
    config = replace(SMOKE.teacher, steps=1, eval_every=0)
    kwargs = dict(policy=policy, prompts=POOLS["red"], reward=REWARDS["red"], config=config, root=tmp_path, base="tiny-random", suite_version="v1", progress=False)
    first = train_teacher("red", **kwargs)
    stamp = (first / "DONE").stat().st_mtime_ns
    again = train_teacher("red", **kwargs)
    assert again == first and (first / "DONE").stat().st_mtime_ns == stamp
    other = train_teacher("red", **{**kwargs, "config": replace(config, lr=1e-3)})
    assert other != first
    with pytest.raises(ValueError, match="trained on other prompts; pass another suite_version"):
        train_teacher("red", **{**kwargs, "prompts": POOLS["red"][:1]})


# --------------------------------------------------------------- variance experiment


def test_variance_experiment_rows_and_the_zero_gap_case(policy, tiny_dir, tmp_path):
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    policy.load_adapter("teacher", teacher)
    policy.add_adapter("student", rank=8, alpha=16)
    prompts = POOLS["bright"] + POOLS["red"]
    rows = variance_experiment(policy, "student", "teacher", prompts, batch_sizes=(1, 2), noise_levels=(0.7,), repeats=3, num_steps=2)
    assert [(r["batch"], r["noise_level"]) for r in rows] == [(1, 0.7), (2, 0.7)]
    assert all(r["var_analytic"] > 0 and r["var_ppo"] > 0 for r in rows)
    # A student equal to its teacher: both estimators are exactly zero.
    policy.copy_adapter_weights("student", teacher)
    same = variance_experiment(policy, "student", "teacher", prompts, batch_sizes=(1,), noise_levels=(0.7,), repeats=2, num_steps=2)
    assert same[0]["var_analytic"] == 0 and same[0]["var_ppo"] < 1e-10 * rows[0]["var_ppo"]
    assert math.isnan(same[0]["ratio_ppo_over_analytic"])
    # The teacher samples at the student's CFG scale unless told otherwise (DiffusionOPD's
    # teacher_guidance): at another scale the equal teacher is a different target.
    small = dict(batch_sizes=(1,), noise_levels=(0.7,), repeats=2, num_steps=2, guidance_scale=2.0)
    assert variance_experiment(policy, "student", "teacher", prompts, **small)[0]["var_analytic"] == 0
    assert variance_experiment(policy, "student", "teacher", prompts, **small, teacher_guidance=4.5)[0]["var_analytic"] > 0


def test_the_variance_experiment_gives_the_same_gradients_with_gradient_checkpointing(tiny_dir, tmp_path):
    """Its backward recomputes the checkpointed blocks, which must see the student's adapter as the
    forward did (outside ``use(student)`` they did not: the run crashed at its very end)."""
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    student = _teacher(tiny_dir, tmp_path / "student", scale=0.1, seed=2)  # a student that differs from both
    grads = []
    for checkpointing in (False, True):
        policy = Policy.from_pretrained(str(tiny_dir), gradient_checkpointing=checkpointing)
        policy.load_adapter("teacher", teacher)
        policy.load_adapter("student", student, trainable=True)
        grads.append(estimate_gradients(policy, "student", "teacher", POOLS["bright"][:2], noise_level=0.7, num_steps=2,
                                        guidance_scale=4.5, teacher_guidance=4.5, seed=0))
    for plain, checkpointed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain)
    # the 4 (sample, step) pairs 3 at a time through the backward (a trainer's micro-batch): the same means
    chunked = estimate_gradients(policy, "student", "teacher", POOLS["bright"][:2], noise_level=0.7, num_steps=2,
                                 guidance_scale=4.5, teacher_guidance=4.5, seed=0, micro_batch=3)
    for plain, piecewise in zip(grads[0], chunked):
        torch.testing.assert_close(piecewise, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


def test_ppo_and_analytic_estimators_target_the_same_gradient():
    """Monte Carlo over next states: E[-r grad log pi] equals the analytic per-step KL gradient."""
    from opd_bench.rl import distillation_loss, process_reward
    from opd_bench.sde import flow_step

    torch.manual_seed(0)
    draws, shape = 40000, (2, 3, 3)
    x = torch.randn(1, *shape).expand(draws, *shape)
    v_teacher = torch.randn(1, *shape).expand(draws, *shape)
    theta = torch.randn(1, *shape, requires_grad=True)
    v = theta.expand(draws, *shape)
    student = flow_step(x, v, 0.6, 0.45, 0.7, generator=torch.Generator().manual_seed(1))
    teacher = flow_step(x, v_teacher, 0.6, 0.45, 0.7, prev_sample=student.prev_sample)
    (analytic,) = torch.autograd.grad(distillation_loss(student, teacher).mean(), theta)
    rescored = flow_step(x, v, 0.6, 0.45, 0.7, prev_sample=student.prev_sample.detach())
    reward = process_reward(rescored.log_prob.detach(), teacher.log_prob.detach(), x[0].numel())
    (ppo,) = torch.autograd.grad(-(reward * torch.exp(rescored.log_prob - rescored.log_prob.detach())).mean(), theta)
    cosine = torch.nn.functional.cosine_similarity(analytic.flatten(), ppo.flatten(), dim=0)
    assert cosine > 0.98 and ppo.norm() / analytic.norm() == pytest.approx(1.0, abs=0.1)


def test_full_parameter_training_changes_only_the_copy(policy, tiny_dir, tmp_path):
    x = torch.randn(policy.latent_shape(2))
    cond = policy.encode(["a red circle", "a blue star"])
    with torch.no_grad():
        base_before = policy.velocity(x, 0.5, cond)
    before = _snapshot(policy)
    config = replace(SMOKE.teacher, steps=1, eval_every=0, lr=1e-2, full_params=True)
    trainer = GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "run")
    copy_before = [p.detach().clone() for p in policy.parameters("student")]
    final = trainer.train(progress=False)
    assert not _changed(before, policy)  # the base transformer (the reference) is untouched
    assert any(not torch.equal(a, b) for a, b in zip(copy_before, policy.parameters("student")))
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, 0.5, cond), base_before)
        with policy.use("student"):
            trained = policy.velocity(x, 0.5, cond)
    other = Policy.from_pretrained(str(tiny_dir))
    other.load_adapter("loaded", final)
    with torch.no_grad(), other.use("loaded"):
        torch.testing.assert_close(other.velocity(x, 0.5, other.encode(["a red circle", "a blue star"])), trained)
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    opd = OPDTrainer(
        replace(SMOKE.opd, steps=1, eval_every=0, full_params=True), policy=other, prompts=POOLS,
        teachers={"bright": teacher, "red": teacher}, run_dir=tmp_path / "opd", adapter="full_student",
    )
    opd.train(progress=False)
    assert read_metrics(tmp_path / "opd" / "metrics.jsonl")[-1]["kl"] > 0


def test_cascade_refuses_a_stage_without_prompts_or_without_reward(tmp_path):
    config = replace(SMOKE.cascade, stages=[("bright", 1), ("red", 1)])
    for pools, scorers in ((POOLS, {"bright": REWARDS["bright"]}), ({"bright": POOLS["bright"]}, REWARDS)):
        with pytest.raises(ValueError, match=r"\['red'\] have no prompts or reward"):
            CascadeTrainer(config, policy=None, prompts=pools, rewards=scorers, run_dir=tmp_path)


# ---------------------------------------------------------------------------- library use: one policy, several trainers


def test_a_second_trainer_on_one_policy_never_starts_from_the_first_ones_weights(policy, tmp_path):
    config = replace(SMOKE.teacher, steps=1, eval_every=0)
    GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "a").train(progress=False)
    with pytest.raises(ValueError, match="the policy already has an adapter 'student'.*another adapter=... or a fresh Policy"):
        GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "b")
    # two teachers of one task under other configs: each its own adapter, each from the base
    first = train_teacher("red", policy=policy, prompts=POOLS["red"], reward=REWARDS["red"], config=config, root=tmp_path,
                          base="tiny-random", suite_version="v1", progress=False)
    other = train_teacher("red", policy=policy, prompts=POOLS["red"], reward=REWARDS["red"], config=replace(config, lr=1e-3),
                          root=tmp_path, base="tiny-random", suite_version="v1", progress=False)
    assert first != other and policy.adapters.count(f"train_teacher_{other.name}") == 1
    with pytest.raises(FileNotFoundError, match=f"it is a training run's folder, its trained adapter is {first / 'final'}"):
        policy.load_adapter("teacher", first)  # train_teacher returns the run folder


def test_an_opd_trainer_distils_the_teacher_it_is_given_not_one_already_on_the_policy(policy, tiny_dir, tmp_path):
    one, two = _teacher(tiny_dir, tmp_path / "one", seed=1), _teacher(tiny_dir, tmp_path / "two", seed=2)
    config = replace(SMOKE.opd, steps=1, eval_every=0, monitor_rewards=False)
    first = OPDTrainer(config, policy=policy, prompts={"red": POOLS["red"]}, teachers={"red": one}, run_dir=tmp_path / "a", adapter="a")
    second = OPDTrainer(config, policy=policy, prompts={"red": POOLS["red"]}, teachers={"red": two}, run_dir=tmp_path / "b", adapter="b")
    again = OPDTrainer(config, policy=policy, prompts={"red": POOLS["red"]}, teachers={"red": one}, run_dir=tmp_path / "c", adapter="c")
    assert first.teachers["red"] == again.teachers["red"] != second.teachers["red"]  # the same folder is loaded once
    assert policy.adapter_source(second.teachers["red"]) == two.resolve()


def test_a_reward_that_breaks_its_contract_is_named(policy, tmp_path):
    config = replace(SMOKE.teacher, steps=1, eval_every=0)
    broken = {
        "infinite": (lambda images, prompts, metadata: rewards.RewardOutput(torch.full((len(prompts),), math.inf)),
                     r"reward 'red' returned an infinite score for \d+ of \d+ images"),
        "one score": (lambda images, prompts, metadata: rewards.RewardOutput(torch.tensor([1.0])),
                      r"reward 'red' returned 1 scores for \d+ images; return one per image"),
        "a bare tensor": (lambda images, prompts, metadata: torch.ones(len(prompts)),
                          r"reward 'red' returned a Tensor; a reward returns RewardOutput"),
        "NaN": (lambda images, prompts, metadata: rewards.RewardOutput(torch.full((len(prompts),), math.nan)),
                r"reward 'red' returned NaN for \d+ of its task's \d+ samples"),
    }
    for k, (reward, problem) in enumerate(broken.values()):
        trainer = GRPOTrainer(config, policy=policy, prompts=POOLS["red"], rewards={"red": reward}, run_dir=tmp_path / str(k), adapter=f"s{k}")
        with pytest.raises((ValueError, TypeError), match=problem):
            trainer.train(progress=False)


def test_a_rollout_that_diverged_is_named_not_blamed_on_the_reward(policy, tmp_path, monkeypatch):
    """A rollout whose images diverged stops training with the cause named (its rewards would be
    read from the images' PNGs, black where they are NaN, and NaN ones used to read as the task's
    own reward skipping its samples)."""
    def diverging(*args, **kwargs):
        trajectory = rollout(*args, **kwargs)
        trajectory.images[1] = math.nan
        return trajectory

    rollout = grpo_module.rollout
    monkeypatch.setattr(grpo_module, "rollout", diverging)
    trainer = GRPOTrainer(replace(SMOKE.teacher, steps=1, eval_every=0), policy=policy, prompts=POOLS["red"],
                          rewards={"red": rewards.get("toy/brightness")}, run_dir=tmp_path, adapter="s")
    with pytest.raises(FloatingPointError, match=r"the rollout drew 1 of \d+ images with NaN or inf pixels: the sampler diverged"):
        trainer.train(progress=False)


def test_gradient_variance_weighs_each_micro_batch_by_its_share_of_the_step():
    """Pairs with known gradients g_i, accumulated as one mean in micro-batches of 3 and 2: each
    micro-batch's mean gradient estimates the step's, and its spread counts by the micro-batch's share."""
    from opd_bench.training import GradVariance

    g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0], [-4.0, 0.0], [0.0, 6.0]])
    weight = torch.nn.Parameter(torch.zeros(2))

    def variance(sizes):
        weight.grad = None
        tracker = GradVariance([weight])
        tracker.start()
        start = 0
        for size in sizes:
            ((g[start:start + size] * weight).sum() / len(g)).backward()
            tracker.record(size / len(g))
            start += size
        return tracker.finish()

    mean = g.mean(0)  # (0.4, 1.8)
    e1, e2 = g[:3].mean(0), g[3:].mean(0)  # (2, 1) and (-2, 3)
    by_hand = (3 / 5 * (e1 - mean).pow(2).sum() + 2 / 5 * (e2 - mean).pow(2).sum()) * 2 / (2 - 1)
    got = variance([3, 2])
    assert got["grad/variance"] == pytest.approx(float(by_hand))  # 9.6; the old count-based rescaling gave 8.72
    assert got["grad/variance_rel"] == pytest.approx(float(by_hand / mean.pow(2).sum()))
    # equal micro-batches: the plain unbiased trace of the estimates
    four = variance([1, 1, 1, 1, 1])
    assert four["grad/variance"] == pytest.approx(float(((g - mean) ** 2).sum() / 4))
    assert variance([5]) == {}  # one micro-batch: no spread to measure


def test_gradient_variance_pools_the_ranks_and_keeps_a_small_spread():
    """Two ranks (threads, summing as all_reduce does) with unequal micro-batches, and a spread a
    millionth of the mean's size: the running sums give the two-pass value over all micro-batches
    (sums of squared estimates would have cancelled to noise at that size)."""
    import threading
    from types import SimpleNamespace

    from opd_bench.training import GradVariance

    torch.manual_seed(0)
    signal = torch.randn(500)
    weights = {0: [0.2, 0.5, 0.3], 1: [0.6, 0.4]}  # each rank's shares of its own step sum to 1
    parts = {r: [w * (signal + 1e-3 * torch.randn(500)) for w in ws] for r, ws in weights.items()}
    shared, barrier, results = {}, threading.Barrier(2), {}

    def all_reduce_sum(rank, tensor):
        shared[rank] = tensor
        barrier.wait()
        total = shared[0] + shared[1]
        barrier.wait()
        return total

    def rank(r):
        weight = torch.nn.Parameter(torch.zeros(500))
        tracker = GradVariance([weight], ranks=SimpleNamespace(world_size=2, all_reduce_sum=lambda t: all_reduce_sum(r, t)))
        weight.grad = torch.zeros(500)
        tracker.start()
        for part, w in zip(parts[r], weights[r]):
            weight.grad = weight.grad + part
            tracker.record(w)
        results[r] = tracker.finish()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shares = torch.tensor([w / 2 for r in (0, 1) for w in weights[r]], dtype=torch.float64)
    estimates = torch.stack([part.double() / w for r in (0, 1) for part, w in zip(parts[r], weights[r])])
    mean = (shares[:, None] * estimates).sum(0)
    two_pass = float((shares * ((estimates - mean) ** 2).sum(1)).sum()) * 5 / 4
    assert results[0] == results[1] and results[0]["grad/variance"] == pytest.approx(two_pass, rel=1e-3)
    assert results[0]["grad/variance_rel"] < 1e-5


def test_a_non_finite_gradient_stops_training_before_it_reaches_the_weights(tmp_path):
    from types import SimpleNamespace

    from opd_bench.training import GradVariance, TrainingRun

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    run = TrainingRun(tmp_path / "run", config={"method": "test"}, policy=SimpleNamespace(forward_counts={}), adapter="x",
                      params=[weight], optimizer=optimizer, ema=None)

    def step_fn(step):
        weight.grad = torch.tensor([1.0, math.nan, 1.0])
        return {"loss": math.nan}, 1

    closed = []
    run.log.mirror = SimpleNamespace(log=lambda record: None, close=lambda: closed.append(True))  # a tracker
    with pytest.raises(FloatingPointError, match="step 1: the gradient is not finite .* nothing was stepped"):
        run.train(step_fn, steps=2, max_grad_norm=1.0, grad_variance=GradVariance([weight]), desc="x", lr=0.1, progress=False)
    assert torch.equal(weight.detach(), torch.ones(3))
    assert closed == [True]  # a failed cell closes its tracker (an open W&B run would take the next cell's metrics)


def test_a_finished_run_keeps_its_adapter_and_not_its_optimizer_state(tmp_path):
    """Nothing resumes a finished run; its checkpoint (Adam's moments besides the weights) only
    filled the disk, GBs per cell with full_params."""
    from types import SimpleNamespace

    from opd_bench.training import GradVariance, TrainingRun

    weight = torch.nn.Parameter(torch.ones(3))
    saved = []
    policy = SimpleNamespace(forward_counts={}, save_adapter=lambda adapter, folder: saved.append(folder) or folder)
    run = TrainingRun(tmp_path / "run", config={"method": "test"}, policy=policy, adapter="x", params=[weight],
                      optimizer=torch.optim.AdamW([weight], lr=0.1), ema=None, checkpoint_every=1)

    def step_fn(step):
        weight.grad = torch.ones(3)
        return {"loss": 1.0}, 1

    run.train(step_fn, steps=2, max_grad_norm=1.0, grad_variance=GradVariance([weight]), desc="x", lr=0.1, progress=False)
    assert (tmp_path / "run" / "DONE").exists() and saved == [tmp_path / "run" / "final"]
    assert not any((tmp_path / "run").glob("checkpoint*"))


def test_a_finished_run_reaches_the_disk_before_its_done_marker(tmp_path, monkeypatch):
    """After an OS crash or power loss, DONE must not outlive a truncated adapter, nor a checkpoint
    the curve it resumes after."""
    from types import SimpleNamespace

    from opd_bench.training import GradVariance, TrainingRun

    def save_adapter(adapter, folder):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        return folder

    weight = torch.nn.Parameter(torch.ones(3))
    run = TrainingRun(tmp_path / "run", config={"method": "test"}, policy=SimpleNamespace(forward_counts={}, save_adapter=save_adapter),
                      adapter="x", params=[weight], optimizer=torch.optim.AdamW([weight], lr=0.1), ema=None, checkpoint_every=1)

    def step_fn(step):
        weight.grad = torch.ones(3)
        return {"loss": 1.0}, 1

    synced, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(f"rename to {b}"), replace(a, b))[1])
    run.train(step_fn, steps=2, max_grad_norm=1.0, grad_variance=GradVariance([weight]), desc="x", lr=0.1, progress=False)
    folder = tmp_path / "run"
    done = synced.index(f"rename to {folder / 'DONE'}")
    assert {str(folder / "final" / "adapter_model.safetensors"), str(folder / "final")} <= set(synced[:done])
    first_checkpoint = synced.index(f"rename to {folder / 'checkpoint'}")
    for name in ("metrics.jsonl", "checkpoint.tmp/training_state.pt", "checkpoint.tmp/state.json"):
        assert str(folder / name) in synced[:first_checkpoint], name


def test_config_values_of_the_wrong_type_or_sign_and_misspelt_task_keys_are_named(policy, tiny_dir, tmp_path):
    for change, problem in (({"max_grad_norm": -1.0}, "max_grad_norm=-1.0 .needs > 0: a negative bound reverses"),
                            ({"lora_alpha": 0}, r"lora_alpha=0 \(needs > 0"), ({"lr": "1e-3"}, r"lr='1e-3' \(needs a number\)"),
                            ({"steps": 2.5}, r"steps=2.5 \(needs a whole number\)"), ({"eval_every": -1}, r"eval_every=-1 \(needs >= 0")):
        with pytest.raises(ValueError, match=problem):
            replace(SMOKE.teacher, **change)
    for stages in (["red"], [("red", "3")], [("red", 0)]):
        with pytest.raises(ValueError, match="cascade stages must be a non-empty list of \\(task, steps >= 1\\)"):
            replace(SMOKE.cascade, stages=stages)
    with pytest.raises(ValueError, match="reward_weights names 'rde', which is not one of the trainer's rewards .* Did you mean 'red'"):
        GRPOTrainer(replace(SMOKE.teacher, reward_weights={"rde": 2.0}), policy=policy, prompts=POOLS["red"],
                    rewards={"red": REWARDS["red"]}, run_dir=tmp_path / "w")
    teacher = _teacher(tiny_dir, tmp_path / "teacher")
    with pytest.raises(ValueError, match="teacher_guidance names 'rde', which is not one of the trainer's tasks"):
        OPDTrainer(replace(SMOKE.opd, teacher_guidance={"rde": 3.0}), policy=policy, prompts={"red": POOLS["red"]},
                   teachers={"red": teacher}, run_dir=tmp_path / "g")


def test_a_cascade_refuses_a_finished_stage_of_other_settings(policy, tmp_path):
    config = replace(SMOKE.cascade, stages=[("red", 1)])
    config = replace(config, grpo=replace(config.grpo, eval_every=0))
    CascadeTrainer(config, policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "c", adapter="c1").train(progress=False)
    longer = replace(config, stages=[("red", 2)])
    with pytest.raises(ValueError, match=r"stage0-red holds a finished stage with a different config \(.*steps: 1 saved, 2 now"):
        CascadeTrainer(longer, policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "c", adapter="c2").train(progress=False)
    # the same stage again (a rerun after a kill in a later stage) is reused, also one recorded before
    # config.json held its training data
    two = replace(config, stages=[("red", 1), ("bright", 1)])
    for old_format in (False, True):
        CascadeTrainer(two, policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "d", adapter=f"d{old_format}",
                       overwrite=True).train(progress=False)
        stage = tmp_path / "d" / "stage0-red" / "config.json"
        if old_format:
            stage.write_text(json.dumps({k: v for k, v in json.loads(stage.read_text()).items() if k != "data"}))
        shutil.rmtree(tmp_path / "d" / "stage1-bright")
        stamp = (tmp_path / "d" / "stage0-red" / "DONE").stat().st_mtime_ns
        CascadeTrainer(two, policy=policy, prompts=POOLS, rewards=REWARDS, run_dir=tmp_path / "d",
                       adapter=f"d{old_format}-again").train(progress=False)
        assert (tmp_path / "d" / "stage1-bright" / "DONE").exists()
        assert (tmp_path / "d" / "stage0-red" / "DONE").stat().st_mtime_ns == stamp  # reused, not retrained
