"""Issue 11: GRPO's defaults are Flow-GRPO's (train_sd3.py), each pinned against a hand-computed value,
and the policy's fast paths (adapter switches, device/dtype) keep their meaning."""

from dataclasses import replace

import pytest
import torch

from opd_bench import rewards
from opd_bench.baselines.cascade import CascadeConfig
from opd_bench.baselines.multi_reward import MultiRewardConfig
from opd_bench.presets import OverrideError, apply_overrides, plan, set_fields
from opd_bench.rl import group_advantages, step_at, train_step_indices
from opd_bench.rollout import Prompt
from opd_bench.training import add_student
from opd_bench.trainers import grpo as grpo_module
from opd_bench.trainers.grpo import GRPOConfig, aggregate_advantages
from opd_bench.trainers.opd import OPDConfig

# A group of 4: mean 3, deviations (-2, -1, 0, 3), squares summing to 14.
REWARDS4 = torch.tensor([1.0, 2.0, 3.0, 6.0])
# population std sqrt(14 / 4) = 1.8708287; advantage = deviation / (1.8708287 + 1e-4)
FLOW_GRPO_ADV = torch.tensor([-1.0689878, -0.5344939, 0.0, 1.6034817])
# unbiased std sqrt(14 / 3) = 2.1602469 (this project before issue 11)
UNBIASED_ADV = torch.tensor([-0.9257772, -0.4628886, 0.0, 1.3886659])


def test_defaults_are_flow_grpo_and_shared_by_the_rl_baselines():
    # detach_uncond: the Flow-GRPO loop of issue 11's check; train_sd3.py at 74db691 does not detach (README)
    for config in (GRPOConfig(), MultiRewardConfig(), CascadeConfig().grpo):
        assert (config.adv_ddof, config.train_steps, config.detach_uncond) == (0, "first", True)
        assert (config.adv_std, config.kl_weighting) == ("batch", "reference")  # global_std=True; / 2 std_dev_t^2
        assert config.updates_per_rollout == 2  # gradient_accumulation_steps = num_batches_per_epoch // 2
    assert OPDConfig().detach_uncond is False  # OPD keeps the full pathwise gradient (README)
    with pytest.raises(ValueError, match="adv_ddof"):
        GRPOConfig(adv_ddof=2)
    with pytest.raises(ValueError, match="train_steps"):
        GRPOConfig(train_steps="last")


def test_advantages_divide_by_the_population_std_plus_1e_4():
    group = torch.zeros(4, dtype=torch.long)
    _, advantages = aggregate_advantages({"t": REWARDS4}, group, ["t"] * 4, GRPOConfig())
    torch.testing.assert_close(advantages, FLOW_GRPO_ADV)
    # two groups: each centred on its own mean, both divided by the batch's std (global_std=True):
    # the 8 rewards 1 2 3 6 11 12 13 16 have mean 8 and squared deviations summing to 228
    both = torch.cat([REWARDS4, REWARDS4 + 10])
    _, advantages = aggregate_advantages({"t": both}, torch.tensor([0] * 4 + [1] * 4), ["t"] * 8, GRPOConfig())
    batch_std_adv = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / ((228 / 8) ** 0.5 + 1e-4)  # -0.3746, -0.1873, 0, 0.5619
    torch.testing.assert_close(advantages, torch.cat([batch_std_adv, batch_std_adv]))
    torch.testing.assert_close(group_advantages(REWARDS4, group, ddof=1), UNBIASED_ADV)
    # two groups side by side, and the batch std, also with ddof=0
    two = group_advantages(torch.cat([REWARDS4, REWARDS4 + 10]), torch.tensor([0] * 4 + [1] * 4))
    torch.testing.assert_close(two, torch.cat([FLOW_GRPO_ADV, FLOW_GRPO_ADV]))
    batch = group_advantages(REWARDS4, group, std="batch")
    torch.testing.assert_close(batch, FLOW_GRPO_ADV)


def test_with_rewards_on_other_scales_each_task_is_normalised_by_its_own_batch_std():
    """Multi-reward RL routes each sample to its own task's reward ("own"): the batch std is taken
    over each task's samples, so a pref-like reward near 30 does not shrink an OCR-like one's
    advantages (pooled, the 8 rewards' std would be 12.89)."""
    rewards_ = torch.cat([REWARDS4, torch.tensor([20.0, 22.0, 30.0, 36.0])])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    tasks = ["a"] * 4 + ["b"] * 4
    _, advantages = aggregate_advantages({"a": rewards_, "b": rewards_}, group, tasks, MultiRewardConfig())
    # b: 20 22 30 36 have mean 27 and squared deviations summing to 164; group means 21 and 33
    b = torch.tensor([-1.0, 1.0, -3.0, 3.0]) / ((164 / 4) ** 0.5 + 1e-4)  # -0.1562, 0.1562, -0.4685, 0.4685
    torch.testing.assert_close(advantages, torch.cat([FLOW_GRPO_ADV, b]))


def test_trained_steps_are_the_first_fraction_of_every_sample():
    assert train_step_indices(3, 8, 0.5, mode="first").tolist() == [[0, 1, 2, 3]] * 3
    assert train_step_indices(2, 10, 0.6, mode="first").tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    assert train_step_indices(1, 10, 0.99, mode="first").tolist() == [list(range(9))]  # int(9.9) = 9, as Flow-GRPO
    assert train_step_indices(1, 3, 0.1, mode="first").tolist() == [[0]]  # at least one step
    random = train_step_indices(4, 8, 0.5, torch.Generator().manual_seed(0), mode="random")
    assert random.shape == (4, 4) and len({tuple(row) for row in random.tolist()}) > 1
    # random: k = round(fraction * n) distinct steps per sample, from the trainable ones, reproducible
    many = train_step_indices(200, 10, 0.45, torch.Generator().manual_seed(1), mode="random")
    assert many.shape == (200, 4) and all(len(set(row)) == 4 for row in many.tolist())  # round(4.5) = 4
    assert set(many.flatten().tolist()) == set(range(10))  # every step is trained across the batch
    assert torch.equal(many, train_step_indices(200, 10, 0.45, torch.Generator().manual_seed(1), mode="random"))
    subset = train_step_indices(50, 8, 0.5, torch.Generator().manual_seed(2), trainable=[2, 5, 7], mode="random")
    assert subset.shape == (50, 2) and set(subset.flatten().tolist()) == {2, 5, 7}
    with pytest.raises(ValueError, match="needs a generator"):
        train_step_indices(1, 8, 0.5, mode="random")
    with pytest.raises(ValueError, match="mode must be"):
        train_step_indices(1, 8, 0.5, mode="last")


def test_grpo_step_trains_steps_0_to_k_with_the_unconditional_half_detached(policy, monkeypatch):
    calls = []

    def recording_step_at(policy_, trajectory, index, step, **options):
        calls.append((index.tolist(), step.tolist(), options.get("detach_uncond")))
        return step_at(policy_, trajectory, index, step, **options)

    monkeypatch.setattr(grpo_module, "step_at", recording_step_at)
    config = GRPOConfig(prompts_per_step=1, group_size=2, num_steps=4, train_fraction=0.5, micro_batch=4)
    params = add_student(policy, "student", config)
    grpo_module.grpo_step(policy, "student", [Prompt("a red circle", "red")], {"red": rewards.get("toy/brightness")}, config, seed=0, params=params)
    assert calls == [([0, 0, 1, 1], [0, 1, 0, 1], True)]


def test_a_per_step_noise_level_makes_the_untrained_steps_deterministic(policy, monkeypatch):
    rollouts, real_rollout = [], grpo_module.rollout

    def recording_rollout(*args, **options):
        rollouts.append(real_rollout(*args, **options))
        return rollouts[-1]

    monkeypatch.setattr(grpo_module, "rollout", recording_rollout)
    config = GRPOConfig(prompts_per_step=1, group_size=2, num_steps=4, train_fraction=0.5, micro_batch=4, noise_level=[0.7, 0.7, 0, 0])
    params = add_student(policy, "student", config)
    grpo_module.grpo_step(policy, "student", [Prompt("a red circle", "red")], {"red": rewards.get("toy/brightness")}, config, seed=0, params=params)
    trajectory = rollouts[0]
    assert trajectory.noise_levels == [0.7, 0.7, 0.0, 0.0]
    # the untrained steps are Euler steps (no noise, no density); the trained ones stay stochastic
    assert torch.equal(trajectory.stds[:, 2:], torch.zeros_like(trajectory.stds[:, 2:]))
    assert trajectory.log_probs[:, 2:].isnan().all() and (trajectory.stds[:, :2] > 0).all()
    for bad, match in (([0.7, 0.7, 0.7], "3 levels for num_steps=4"), ([0.7, 0, 0.7, 0.7], "0 on a trained step"), (0, "needs > 0"),
                       ([0.9, 0.5, 0, 0], "varies over the trained steps")):  # a micro-batch holds several steps
        with pytest.raises(ValueError, match=match):
            GRPOConfig(num_steps=4, train_fraction=0.5, noise_level=bad)
    with pytest.raises(ValueError, match="0 on a trained step"):  # random trains any step
        GRPOConfig(num_steps=4, train_fraction=0.5, noise_level=[0.7, 0.7, 0, 0], train_steps="random")
    # --set takes either form
    listed = set_fields(GRPOConfig(num_steps=4, train_fraction=0.5), ["noise_level=[0.7,0.7,0,0]"])
    assert listed.noise_level == [0.7, 0.7, 0.0, 0.0] and all(isinstance(v, float) for v in listed.noise_level)
    assert set_fields(listed, ["noise_level=0.5"]).noise_level == 0.5
    # one task's list, then a teacher-wide change it no longer fits: refused now, naming the task's setting
    with pytest.raises(OverrideError, match="teacher.ocr.noise_level: no longer fits"):
        apply_overrides(plan("smoke"), ["teacher.ocr.noise_level=[0.7,0,0]", "teacher.num_steps=4"], tasks=["ocr", "pref"])


def _trainable_student(policy):
    policy.add_adapter("student", rank=2, seed=0)
    with torch.no_grad():
        for p in policy.parameters("student"):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return policy.parameters("student")


def _grads(params, loss):
    return torch.autograd.grad(loss, params, retain_graph=True)


def test_the_kl_penalty_is_flow_grpos_by_default(policy, monkeypatch):
    """Flow-GRPO's penalty is mean_d (mu - mu_ref)^2 / (2 std_dev_t^2), std_dev_t = the step's std
    without sqrt(-dt), so its betas mean that weighting; "step" divides by the step's own variance."""
    seen = []

    def recording_step_at(*args, **options):
        seen.append(step_at(*args, **options))
        return seen[-1]

    monkeypatch.setattr(grpo_module, "step_at", recording_step_at)
    params = _trainable_student(policy)  # a perturbed adapter: the student's means differ from the base's
    config = GRPOConfig(prompts_per_step=1, group_size=2, num_steps=4, train_fraction=0.5, micro_batch=4, kl_beta=0.5)
    assert config.kl_weighting == "reference"
    kls = {}
    for weighting in ("reference", "step"):
        seen.clear()
        metrics, _ = grpo_module.grpo_step(policy, "student", [Prompt("a red circle", "red")], {"red": rewards.get("toy/brightness")},
                                           replace(config, kl_weighting=weighting), seed=0, params=params)
        current, reference = seen  # one micro-batch: the student's recomputation, then the base's
        squared = (current.mean - reference.mean).detach().flatten(1).pow(2).mean(1)
        std_dev_t = current.std / (-current.dt).sqrt()
        by_hand = squared / (2 * (std_dev_t if weighting == "reference" else current.std) ** 2)
        assert float(squared.min()) > 0
        assert metrics["kl"] == pytest.approx(float(by_hand.mean()), rel=1e-5)
        # the policy term averages to 0 here (ratio 1, a group's advantages sum to 0): the loss is beta * kl
        assert metrics["loss"] == pytest.approx(config.kl_beta * metrics["kl"], rel=1e-3)
        kls[weighting] = metrics["kl"]
    assert kls["step"] > 3 * kls["reference"]  # 1 / |dt| per step: 4-step schedule, steps 0 and 1


def test_detached_unconditional_branch_gets_no_gradient(policy):
    params = _trainable_student(policy)
    x = torch.randn(2, *policy.latent_shape(1)[1:], generator=torch.Generator().manual_seed(2))
    sigma, w = torch.tensor([0.8, 0.4]), 4.5
    cond = policy.encode(["a red circle", "a blue star"])
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with policy.use("student"):
        detached = policy.velocity(x, sigma, cond, w, detach_uncond=True)
        full = policy.velocity(x, sigma, cond, w)
        text = policy.velocity(x, sigma, cond)  # the conditional half alone
        with torch.no_grad():
            uncond_cond = type(cond)(cond.negative_embeds, cond.negative_pooled, cond.negative_embeds, cond.negative_pooled)
            uncond = policy.velocity(x, sigma, uncond_cond)
        assert detached.requires_grad
        # The same values: exactly the two halves' guided sum (each half is its own forward of B),
        # and the batched 2B forward's up to float32 noise (other matmul blocking, amplified by w).
        torch.testing.assert_close(detached, uncond + w * (text - uncond), rtol=0, atol=1e-6)
        torch.testing.assert_close(detached, full, rtol=0, atol=1e-3 * float(full.detach().abs().max()))
        # v = u + w (t - u) with u constant: dv = w dt, i.e. the unconditional branch contributes 0
        for got, expected in zip(_grads(params, (detached * weights).sum()), _grads(params, (w * text * weights).sum())):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        # and the undetached gradient does include it: (1 - w) du + w dt
        uncond_live = policy.velocity(x, sigma, uncond_cond)
        expected_full = _grads(params, (((1 - w) * uncond_live + w * text) * weights).sum())
        got_full = _grads(params, (full * weights).sum())
        for got, expected in zip(got_full, expected_full):  # float32 noise of the 2B forward: ~1e-4 of the scale
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * float(got.abs().max()))
        text_only = _grads(params, (w * text * weights).sum())
    flat_full, flat_text = torch.cat([g.flatten() for g in got_full]), torch.cat([g.flatten() for g in text_only])
    assert (flat_full - flat_text).norm() > 0.1 * flat_full.norm()  # so detaching is not a no-op here
    del uncond


def test_nested_use_of_the_active_adapter_does_not_switch(policy, monkeypatch):
    policy.add_adapter("student", rank=2)
    switches = []
    layer = policy._lora_layers[0]
    monkeypatch.setattr(layer, "enable_adapters", lambda enabled, f=layer.enable_adapters: (switches.append(enabled), f(enabled)))
    with policy.use("student"):
        switches.clear()
        with policy.use("student"), policy.use("student"):
            pass
        assert switches == []
        with policy.use(None):
            pass
        assert switches == [False, True]


def test_an_adapter_added_while_another_is_active_leaves_that_one_active(policy):
    x = torch.randn(1, *policy.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    cond = policy.encode(["a red circle"])
    policy.add_adapter("a", rank=2, init=False, seed=1)  # random B: differs from the base
    with torch.no_grad(), policy.use("a"):
        before = policy.velocity(x, 0.5, cond)
        policy.add_adapter("b", rank=2, init=False, seed=2)  # peft activates "b" on the layers
        after = policy.velocity(x, 0.5, cond)
    torch.testing.assert_close(before, after)
    assert {n for n, p in policy.transformer.named_parameters() if p.requires_grad} == {
        n for n, _ in policy.transformer.named_parameters() if ".lora_" in n
    }  # both were added trainable; switching did not freeze either


def test_device_and_dtype_follow_the_pipeline_when_it_moves(policy):
    assert policy.dtype == torch.float32 and policy.device.type == "cpu"
    policy.pipeline.to(dtype=torch.float64)
    assert policy.dtype == torch.float64


PROMPT_POOL = [Prompt(f"a {c} circle", "red") for c in ("red", "blue", "white", "black", "yellow")]


def _two_update_config(**changes) -> GRPOConfig:
    return GRPOConfig(**{**dict(steps=4, prompts_per_step=2, group_size=4, num_steps=3, train_fraction=0.67, micro_batch=64,
                                eval_every=0, checkpoint_every=2, lr=1e-2, clip_range=0.2), **changes})


def test_one_rollout_serves_two_updates_each_on_half_of_every_group(tiny_dir, tmp_path, monkeypatch):
    from opd_bench.policy import Policy
    from opd_bench.training import read_metrics

    rollouts, updates = [], []
    real_rollout, real_step_at = grpo_module.rollout, grpo_module.step_at

    def recording_rollout(policy_, prompts, **options):
        rollouts.append(len(prompts))
        return real_rollout(policy_, prompts, **options)

    def recording_step_at(policy_, trajectory, index, step, **options):
        if options.get("detach_uncond"):  # the trained policy's recomputation, not the KL's reference
            updates.append(sorted(set(index.tolist())))
        return real_step_at(policy_, trajectory, index, step, **options)

    monkeypatch.setattr(grpo_module, "rollout", recording_rollout)
    monkeypatch.setattr(grpo_module, "step_at", recording_step_at)
    trainer = grpo_module.GRPOTrainer(_two_update_config(), policy=Policy.from_pretrained(str(tiny_dir)), prompts=PROMPT_POOL,
                                      rewards={"red": rewards.get("toy/brightness")}, run_dir=tmp_path / "run")
    trainer.train(progress=False)
    assert rollouts == [4, 4]  # 2 rollouts of 2 x prompts_per_step prompts for 4 optimizer steps
    assert len(updates) == 4  # one micro-batch per update
    for first, second in (updates[0:2], updates[2:4]):
        assert len(first) == len(second) == 8 and not set(first) & set(second)  # halves of the rollout's 16
        for group in range(4):  # two images of each prompt's four in each half
            assert sum(i // 4 == group for i in first) == 2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["images"] for r in records] == [16, 16, 32, 32]  # a rollout's images count once
    # the first update of a rollout is on-policy (ratio 1); the second follows weights the first moved
    assert [r["approx_kl"] == 0 for r in records] == [True, False, True, False]
    assert records[0]["reward/red/mean"] == records[1]["reward/red/mean"]  # both report their rollout's rewards


def test_runs_and_checkpoints_end_between_rollouts():
    with pytest.raises(ValueError, match=r"steps=3 is not a multiple of updates_per_rollout=2.*use steps 2, 4"):
        GRPOConfig(steps=3)
    with pytest.raises(ValueError, match=r"checkpoint_every=5 .*use checkpoint_every 4, 6, or updates_per_rollout=1"):
        GRPOConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match=r"updates_per_rollout=2 \(needs >= 1 and dividing group_size=3"):
        GRPOConfig(group_size=3)
    with pytest.raises(ValueError, match=r"updates_per_rollout=0 \(needs >= 1"):
        GRPOConfig(updates_per_rollout=0)
    with pytest.raises(ValueError, match=r"stage\(s\) \[\['geneval', 3\]\] .* multiple of 2"):
        CascadeConfig(stages=[("pref", 2), ("geneval", 3)])
    GRPOConfig(steps=3, checkpoint_every=5, group_size=3, updates_per_rollout=1)  # one update: any count
    CascadeConfig(stages=[("geneval", 3)], grpo=GRPOConfig(updates_per_rollout=1))


def test_set_changes_that_check_each_other_apply_in_any_order():
    """steps and checkpoint_every must be multiples of updates_per_rollout: --set takes the changes
    in any order, and refuses only what no order makes valid, with the config's one-line reason."""
    two = ["teacher.updates_per_rollout=2", "teacher.checkpoint_every=10", "multi-reward.checkpoint_every=10",
           "multi-reward.updates_per_rollout=2", "cascade.grpo.updates_per_rollout=2", "cascade.grpo.checkpoint_every=10"]
    for pairs in (two, two[::-1]):
        changed = apply_overrides(plan("standard"), pairs)
        assert (changed.teacher.updates_per_rollout, changed.multi_reward.updates_per_rollout,
                changed.cascade.grpo.updates_per_rollout) == (2, 2, 2)
        assert changed.teacher.checkpoint_every == changed.cascade.grpo.checkpoint_every == 10
    paper = apply_overrides(plan("paper"), ["teacher.steps=301", "teacher.updates_per_rollout=1"])
    assert (paper.teacher.steps, paper.teacher.updates_per_rollout) == (301, 1)
    assert apply_overrides(plan("paper"), ["teacher.steps=301", "teacher.steps=302"]).teacher.steps == 302  # the last one
    with pytest.raises(OverrideError, match=r"^--set teacher.updates_per_rollout=2: checkpoint_every=5 is not a multiple"):
        apply_overrides(plan("standard"), ["teacher.updates_per_rollout=2"])
    with pytest.raises(OverrideError, match=r"--set cascade.stages=.*multiple of 2"):
        apply_overrides(plan("paper"), ['cascade.stages=[["pref",20],["ocr",15]]'])
    assert set_fields(GRPOConfig(updates_per_rollout=1, steps=3), ["steps=4", "updates_per_rollout=2"]).steps == 4


def test_folders_and_teachers_from_before_updates_per_rollout_keep_their_identity():
    """A run folder or teacher recorded before the setting existed trained one update per rollout:
    it resumes, and keeps its teacher key, under a config that sets 1; not under one that sets 2."""
    import hashlib
    import json

    from opd_bench.training import config_differences
    from opd_bench.trainers.teachers import teacher_key

    one = replace(plan("standard").teacher)
    recorded = {key: value for key, value in grpo_module.grpo_run_config(one, [Prompt("a red circle", "red")], {"red": None}).items()
                if key != "updates_per_rollout"}
    assert config_differences(recorded, grpo_module.grpo_run_config(one, [Prompt("a red circle", "red")], {"red": None})) is None
    two = replace(one, updates_per_rollout=2, checkpoint_every=10)
    assert "updates_per_rollout: absent saved, 2 now" in config_differences(
        recorded, grpo_module.grpo_run_config(two, [Prompt("a red circle", "red")], {"red": None}))
    before = {k: v for k, v in one.to_dict().items() if k != "updates_per_rollout"}  # the key as computed before
    identity = {"base": "b", "suite_version": "v", "task": "pref", "config": before}
    assert teacher_key("b", "v", "pref", one) == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    assert teacher_key("b", "v", "pref", replace(two, checkpoint_every=5 * 2)) != teacher_key("b", "v", "pref", replace(one, checkpoint_every=10))
