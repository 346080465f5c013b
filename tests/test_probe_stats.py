"""The statistics behind the teacher probes (issue 11): the gradient signal-to-noise split and the
share of a group's reward spread that its starting noise decides, on hand-computed cases."""

import pytest
import torch


def test_signal_is_the_dot_product_of_distinct_batches_and_noise_the_rest(benchmark_script):
    snr = benchmark_script("probe_grad_snr").signal_to_noise
    a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 1.0])
    stats = snr(torch.stack([a, b, a, b]))
    # pairs: (a,b) x4, (a,a) x1, (b,b) x1 over 6 distinct pairs -> (4*3 + 5 + 10) / 6
    assert stats["signal"] == pytest.approx((4 * 3 + 5 + 10) / 6)
    # E|g|^2 = (5 + 10) / 2
    assert stats["noise"] == pytest.approx(7.5 - stats["signal"])
    assert stats["snr"] == pytest.approx(stats["signal"] / stats["noise"])


def test_signal_estimate_finds_a_known_mean_inside_its_error(benchmark_script):
    snr = benchmark_script("probe_grad_snr").signal_to_noise
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(40, 2000, generator=generator) + 0.1  # |E g|^2 = 20, noise 2000
    stats = snr(grads)
    assert abs(stats["signal"] - 20) < 3 * stats["signal_se"]
    assert stats["noise"] == pytest.approx(2000, rel=0.05)
    assert snr(grads - 0.1)["snr_upper"] < 0.01  # no mean: only an upper bound


def test_noise_share_is_one_when_the_start_decides_and_zero_when_it_does_not(benchmark_script):
    decompose = benchmark_script("probe_noise_share").decompose
    decided = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])  # [prompts, starts, continuations]
    assert decompose(decided)["between_share"] == 1.0
    assert decompose(decided)["groups_with_spread_shared_start"] == 0.0
    undecided = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, 0.5]]])
    assert decompose(undecided)["between_share"] == 0.0
    assert decompose(undecided)["groups_with_spread_shared_start"] == 1.0


def test_coordinates_with_a_mean_stand_out_of_their_noise(benchmark_script):
    snr = benchmark_script("probe_grad_snr").signal_to_noise
    generator = torch.Generator().manual_seed(1)
    grads = torch.randn(40, 2000, generator=generator)
    null = snr(grads)
    assert null["coords_t_above_3"] < 3 * null["coords_t_above_3_if_no_signal"]
    grads[:, :100] += 1.0  # t about 6 on 5% of the coordinates
    assert snr(grads)["coords_t_above_3"] == pytest.approx(0.05 + null["coords_t_above_3"], abs=0.005)


def test_paired_gain_and_share_kept_by_hand(benchmark_script):
    precision = benchmark_script("eval_precision")
    gain, se = precision.paired_gain([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1
    assert gain == pytest.approx(2.0) and se == pytest.approx(1.0 / 3 ** 0.5)
    # teacher gains 2 over the base, the student 1.5
    assert precision.share_kept([2.5, 2.5], [3.0, 3.0], [1.0, 1.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        precision.paired_gain([1.0, 2.0], [1.0])  # images that do not pair up


def test_two_runs_compare_model_by_model_and_refuse_evaluations_that_do_not_pair(benchmark_script, capsys):
    precision = benchmark_script("eval_precision")

    def run(teacher: list[float], seed: int = 0) -> dict:
        return {"benchmarks": ["ocr"], "config": {"eval": {"seed": seed, "limit": 3, "images_per_prompt": 1}},
                "per_image": {"base": {"0": {"ocr": [1.0, 2.0, 3.0]}}, "teacher/ocr": {"0": {"ocr": teacher}}}}

    precision.compare_runs(run([3.0, 5.0, 4.0]), run([1.0, 2.0, 3.0]))
    lines = capsys.readouterr().out.splitlines()
    assert '"base"' in lines[0] and "ocr +0.000 ± 0.000" in lines[0]  # the same base: the evaluations pair up
    assert "ocr +2.000 ± 0.577" in lines[1]  # differences 2, 3, 1
    with pytest.raises(SystemExit, match="do not pair up"):
        precision.compare_runs(run([1.0, 2.0, 3.0]), run([1.0, 2.0, 3.0], seed=1))


def test_task_gradient_cosines_pair_tasks_within_a_batch_and_a_task_across_batches(benchmark_script):
    cosines = benchmark_script("probe_task_gradients").cosines
    e = torch.eye(3)
    grads = [{"a": e[0], "b": e[1], "c": -e[0]}, {"a": e[0] + e[1], "b": e[1], "c": e[2]}]
    found = cosines(grads, ["a", "b", "c"])
    assert found["within"]["a/b"] == pytest.approx([0.0, 2 ** -0.5])
    assert found["within"]["a/c"] == pytest.approx([-1.0, 0.0])
    assert found["next"] == {"a": pytest.approx([2 ** -0.5]), "b": pytest.approx([1.0]), "c": pytest.approx([0.0])}
