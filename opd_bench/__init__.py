"""opd-bench: test DiffusionOPD against multi-reward and cascade RL on any SD3-family model.

Kept import-light: ``import opd_bench`` and ``opd-bench --help`` load neither torch nor diffusers.
"""

__version__ = "0.1.0"
