"""DiffusionOPD and its teachers, installed as ``opd_bench.trainers``.

The trainers themselves (Flow-GRPO teachers, the analytic and PPO-style DiffusionOPD students)
are built in the trainers issue on top of ``opd_bench.rollout`` and ``opd_bench.sde``.
"""
