"""What a benchmark's figures depend on besides its options: the code's commit (and whether the tree
had uncommitted changes), the torch version and the CPU model. Shared by the benchmark scripts so
every recorded figure can be traced to the code and machine that made it."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def _git(tree: Path, *args: str) -> str | None:
    out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(tree: Path) -> dict:
    """``{"commit", "dirty"}`` of ``tree``; a plain copy gives ``"not a git tree"`` (and dirty None),
    also where it lies inside another repository, whose commit would not be this tree's."""
    top = _git(tree, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(tree).resolve():
        return {"commit": "not a git tree", "dirty": None}
    return {"commit": _git(tree, "rev-parse", "HEAD"), "dirty": bool(_git(tree, "status", "--porcelain"))}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def torch_version() -> str:
    import torch  # torch.__version__ names the build (e.g. +cu130), which the package metadata may not

    return torch.__version__


def provenance(tree: Path) -> dict:
    """``{"commit", "dirty", "torch", "cpu"}`` for code from ``tree`` on this machine."""
    return {**git_state(tree), "torch": torch_version(), "cpu": cpu_model()}


def stray_modules(tree: Path) -> list[str]:
    """Loaded ``opd_bench`` modules whose file lies outside ``tree``. The editable install maps
    ``opd_bench.trainers`` and ``opd_bench.baselines`` to its own checkout whatever PYTHONPATH says,
    so code meant to come from ``tree`` can silently mix in another checkout's."""
    tree = Path(tree).resolve()
    return sorted(
        name for name, module in list(sys.modules.items())
        if name.split(".")[0] == "opd_bench" and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(tree)
    )
