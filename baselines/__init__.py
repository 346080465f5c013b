"""Multi-reward RL and cascade RL baselines, installed as ``opd_bench.baselines``.

They share the rollout, advantage and loss functions with the trainers; built in the trainers
issue.
"""
