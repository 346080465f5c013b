"""Several processes train the same model as one: 2 CPU processes (gloo) against 1.

The 2-process run is launched with ``torch.distributed.run`` (what ``torchrun`` and
``accelerate launch`` do), running this file as the worker script, so the process group is
built from the launcher's environment exactly as in real use.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opd_bench import rewards
from opd_bench.distributed import ProcessGroup, current
from opd_bench.policy import Policy
from opd_bench.rollout import Prompt
from opd_bench.trainers.grpo import GRPOConfig, GRPOTrainer
from opd_bench.training import read_metrics

PROMPTS = [Prompt("a white square", "bright"), Prompt("a yellow star", "bright"), Prompt("a black circle", "bright")]
# 2 prompts x 2 images per step, 2 of 3 steps trained: 8 (sample, step) pairs a step; with two
# updates per rollout (the default) a rollout of 4 prompts serves two steps, each on one image of
# every group. micro_batch=4 cuts the 1-process batch where the 2 ranks split it, so even the
# micro-batch gradient variance matches. Four steps: two rollouts (or four).
# adv_std="batch" (the default, Flow-GRPO's): each rank holds one group, so dividing by the rank's own
# std instead of the whole batch's gives other weights (checked: the weights test fails).
def config(updates: int) -> GRPOConfig:
    return GRPOConfig(
        steps=4, prompts_per_step=2, group_size=2, num_steps=3, train_fraction=0.67, micro_batch=4, clip_range=0.2,
        lr=1e-2, eval_every=0, checkpoint_every=2, seed=3, adv_std="batch", updates_per_rollout=updates,
    )


def _train(tiny_dir, run_dir, updates: int) -> tuple[GRPOTrainer, list[torch.Tensor]]:
    policy = Policy.from_pretrained(str(tiny_dir))
    trainer = GRPOTrainer(config(updates), policy=policy, prompts=PROMPTS, rewards={"bright": rewards.get("toy/brightness")}, run_dir=run_dir)
    trainer.train(progress=False)
    return trainer, [p.detach().clone() for p in policy.parameters("student")]


def _worker(tiny_dir: str, run_dir: str, out_dir: str, updates: str) -> None:
    """One rank of the 2-process run: train, then report weights and collective checks to out_dir."""
    torch.set_num_threads(1)
    ranks = current()
    trainer, weights = _train(tiny_dir, run_dir, int(updates))
    # variable-size gather: rank r contributes r + 1 rows
    gathered = ranks.all_gather(torch.full((ranks.rank + 1, 2), float(ranks.rank)))
    # gradient averaging, with a parameter that has a gradient on rank 1 only
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(ranks.rank))
    b.grad = torch.ones(2) if ranks.rank == 1 else None
    ranks.average_gradients([a, b])
    torch.save(
        {
            "rank": ranks.rank, "world_size": ranks.world_size, "weights": weights, "gathered": gathered,
            "grad_a": a.grad, "grad_b": b.grad, "opened_log": trainer.run.log is not None,
        },
        Path(out_dir) / f"rank{ranks.rank}.pt",
    )


def test_shard_and_single_process_collectives():
    items = list("abcdef")
    assert ProcessGroup(rank=0, world_size=2).shard(items) == (["a", "b", "c"], 0)
    assert ProcessGroup(rank=1, world_size=2).shard(items) == (["d", "e", "f"], 3)
    assert ProcessGroup(rank=2, world_size=3).shard(items) == (["e", "f"], 4)
    with pytest.raises(ValueError, match="4 prompts per step cannot be split evenly over 3 processes"):
        ProcessGroup(rank=0, world_size=3).shard(items[:4])
    single = ProcessGroup()
    assert single.is_main and not single.distributed and single.shard(items) == (items, 0)
    x = torch.arange(4.0)
    assert single.all_gather(x) is x and single.all_reduce_sum(x) is x and single.broadcast_object({"k": 1}) == {"k": 1}
    assert single.run_on_main(lambda: 7) == 7
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    single.average_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]
    assert ProcessGroup(rank=1, world_size=2, local_rank=1).device("cuda") == torch.device("cuda", 1)
    assert ProcessGroup().device("cpu") == torch.device("cpu")


def test_a_bad_timeout_is_named(monkeypatch):
    from opd_bench.distributed import DEFAULT_TIMEOUT_S, _timeout_seconds

    assert _timeout_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("OPD_BENCH_DIST_TIMEOUT", "90")
    assert _timeout_seconds() == 90
    for bad in ("abc", "0", "-5", "inf"):
        monkeypatch.setenv("OPD_BENCH_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"OPD_BENCH_DIST_TIMEOUT='{bad}': give the seconds"):
            _timeout_seconds()


@pytest.mark.parametrize("updates", [1, 2])
def test_two_processes_train_like_one(tiny_dir, tmp_path, updates):
    _, single_weights = _train(tiny_dir, tmp_path / "single", updates)
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")

    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OPD_BENCH_BACKEND": "gloo"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(tiny_dir), str(tmp_path / "multi"), str(out), str(updates),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    assert [r["opened_log"] for r in results] == [True, False]  # only rank 0 writes the run folder
    for ours, theirs in zip(results[0]["weights"], results[1]["weights"], strict=True):
        assert torch.equal(ours, theirs)  # averaged gradients keep the ranks' weights identical
    for r in results:
        # The same weights as the 1-process run, up to float noise: the re-evaluated log-densities
        # depend on the batch a sample is computed in, and Adam's normalised step magnifies that on
        # small gradients (the 1-process run with micro_batch 8 instead of 4 already moves weights
        # by ~5e-4 of their scale, 2 processes by ~2e-3). Where a coordinate's two gradients nearly
        # cancel, Adam's second step divides noise by noise, so a few coordinates may move more
        # (2 of 7,680 by 1.7% of their tensor's scale with this machine's libraries, 2026-12-05);
        # a wrong offset, seed or reduction moves most of them, by O(1).
        far = total = 0
        for mine, reference in zip(r["weights"], single_weights, strict=True):
            scale = float(reference.abs().max()) + 1e-8
            assert float((mine - reference).abs().max()) <= 0.1 * scale  # none moves far
            far += int(((mine - reference).abs() > 1e-2 * scale).sum())
            total += reference.numel()
        assert far <= 0.005 * total, f"{far} of {total} weights differ by more than 1% of their tensor's scale"
        assert r["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert r["grad_a"].tolist() == [0.5] * 3 and r["grad_b"].tolist() == [0.5] * 2

    multi = read_metrics(tmp_path / "multi" / "metrics.jsonl")
    assert [r["step"] for r in multi] == [1, 2, 3, 4]  # one line per step: a second writer would repeat them
    assert (tmp_path / "multi" / "DONE").exists() and (tmp_path / "multi" / "final" / "adapter_model.safetensors").exists()
    for a, b in zip(single, multi):
        assert set(a) == set(b)
        for key in a:
            if key == "wall_seconds":
                continue
            # abs: the GRPO loss is a near-cancelling sum of +-advantage * ratio (~0 +- 1e-5)
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    assert single[0]["grad/norm"] > 0 and single[-1]["images"] == 16 and single[-1]["student_forwards"] == multi[-1]["student_forwards"]
    if updates == 2:  # the second update of each rollout is off-policy, by as much on 2 processes as on 1
        for a, b in zip(single[1::2], multi[1::2]):
            assert a["approx_kl"] > 0 and b["approx_kl"] == pytest.approx(a["approx_kl"], rel=0.05)
    assert "grad/variance" in multi[0] and [r["reward/bright/mean"] for r in multi] == pytest.approx([r["reward/bright/mean"] for r in single], rel=1e-5)


def _ending_worker(mode: str, out_dir: str) -> None:
    """One rank of a 2-process job that ends. ``fail``: rank 1 raises while rank 0 waits for it in a
    collective. ``linger``: rank 0 works on after the others are done for longer than the
    collectives' timeout (1 s here), as it does in the final evaluations. ``shared``: an error that
    ``run_on_main`` raises on every rank. Each rank writes when it left (after the closing barrier:
    atexit runs the handler registered first last)."""
    import atexit

    from opd_bench import distributed
    from opd_bench.distributed import leave_alone_on_error

    out = Path(out_dir)
    rank = os.environ["RANK"]
    atexit.register(lambda: (out / f"left{rank}").write_text(f"{time.time()} {distributed._abandoned}"))
    ranks = current()
    with leave_alone_on_error():
        if mode == "fail":
            if ranks.rank == 1:
                raise RuntimeError("rank 1 fails alone")
            ranks.all_reduce_sum(torch.ones(1))  # never completes: rank 1 will not join it
        elif mode == "linger":
            if ranks.is_main:
                time.sleep(4)
                (out / "worked").write_text(str(time.time()))
        else:
            ranks.run_on_main(lambda: 1 / 0)


def _launch(mode: str, out_dir: Path, timeout_s: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_BACKEND": "gloo", "OPD_BENCH_DIST_TIMEOUT": timeout_s}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, mode, str(out_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)


def test_a_rank_that_fails_ends_the_job_instead_of_waiting_for_the_timeout(tmp_path):
    """Before: the failed rank waited for the others in its closing barrier while they waited for it
    in the collective, so the job hung until the timeout (here 600 s; the subprocess would time out)."""
    done = _launch("fail", tmp_path, "600")
    assert done.returncode != 0 and "rank 1 fails alone" in done.stderr


def test_the_other_ranks_wait_at_exit_for_as_long_as_rank_0_works(tmp_path):
    """Rank 0's final evaluations come after training: the closing barrier must outlast them. On
    the collectives' own timeout (1 s here) rank 1 left after 1 s; under nccl that timeout is the
    watchdog's, which aborts the process, and the launcher then stopped rank 0's evaluations."""
    done = _launch("linger", tmp_path, "1")
    assert done.returncode == 0, done.stderr[-3000:]
    worked = float((tmp_path / "worked").read_text())
    assert all(float((tmp_path / f"left{r}").read_text().split()[0]) >= worked for r in range(2))


def test_an_error_every_rank_raises_keeps_the_closing_barrier(tmp_path):
    """Only an error of one rank skips the barrier; one that run_on_main raises on every rank does
    not (every rank reaches the barrier, which keeps gloo from aborting a peer mid-teardown)."""
    done = _launch("shared", tmp_path, "60")
    assert done.returncode != 0 and "ZeroDivisionError" in done.stderr
    assert [(tmp_path / f"left{r}").read_text().split()[1] for r in range(2)] == ["False", "False"]


if __name__ == "__main__":  # a rank of a 2-process run (launched by the tests above)
    if sys.argv[1] in ("fail", "linger", "shared"):
        _ending_worker(*sys.argv[1:3])
    else:
        _worker(*sys.argv[1:5])
