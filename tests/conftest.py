import importlib
from pathlib import Path

import pytest
import torch

from opd_bench.tiny import TinyConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny SD3 pipeline saved as a diffusers folder, built offline once per session."""
    from opd_bench.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-sd3"), TinyConfig(), seed=0)


@pytest.fixture()
def policy(tiny_dir):
    """A fresh policy per test (adapters added by one test must not leak into another)."""
    from opd_bench.policy import Policy

    torch.manual_seed(0)
    return Policy.from_pretrained(str(tiny_dir))


@pytest.fixture()
def benchmark_script(monkeypatch):
    """Import a script of ``benchmarks/`` by name, with that folder on the path as when it is run
    from there (the probe scripts import their shared ``probe_args``)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module
