"""The GPU benchmarks' SD3.5-Medium-sized stand-in is drawn on the device it will run on (issue 11, item 5).

Built on the CPU first, its 2.2B random weights took longer than an H200 run's budget. On the meta
device nothing is allocated, so this checks in seconds that no parameter or buffer is created
anywhere else, which is what makes ``--device cuda`` draw them on the GPU.
"""

import pytest


def test_sd35m_stand_in_is_created_on_the_requested_device(benchmark_script):
    bench_rollout = benchmark_script("bench_rollout")

    pipe = bench_rollout.build("sd35m", "meta")

    devices = {
        name: {t.device.type for t in [*module.parameters(), *module.buffers()]}
        for name, module in pipe.components.items() if hasattr(module, "parameters")
    }
    assert sum(p.numel() for p in pipe.transformer.parameters()) == pytest.approx(2.24e9, rel=0.01)
    assert devices == {name: {"meta"} for name in devices}


def test_a_step_s_flops_are_counted_once_whatever_the_run_does_around_it(benchmark_script, policy, tmp_path):
    """bench_train_step's achieved TFLOP/s divides one step's counted FLOPs by its time: the count
    must be one step's, not the run's (building, saving), so doubling the images doubles it."""
    from opd_bench import rewards
    from opd_bench.rollout import Prompt, rollout
    from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer

    bench = benchmark_script("bench_train_step")
    prompts = [Prompt(f"a photo of {i} red circles", "geneval") for i in range(4)]

    def evaluate(policy):  # work a run does at its start and end, whatever its length
        return {"brightness": float(rollout(policy, prompts, num_steps=4, keep={"images"}).images.mean())}

    def trainer_with(prompts_per_step):
        return lambda steps, name: GRPOTrainer(
            GRPOConfig(steps=steps, prompts_per_step=prompts_per_step, group_size=2, num_steps=2, micro_batch=8,
                       eval_every=10**6, checkpoint_every=10**6, updates_per_rollout=1),  # as the benchmark's
            policy=policy, prompts=prompts, rewards={"geneval": rewards.get("toy/brightness")},
            run_dir=tmp_path / f"{prompts_per_step}-{name}", adapter=f"a{prompts_per_step}-{name}", evaluate=evaluate,
        )

    trainer_with(1)(1, "warm-up").train(progress=False)  # as the benchmark's timed run does first
    one, two = bench.step_flops(trainer_with(1)), bench.step_flops(trainer_with(2))
    assert one > 0 and two / one == pytest.approx(2.0, rel=1e-3)
