"""Experiment trackers (``opd-bench run --log-to tensorboard,wandb``): every training cell's metrics,
live, beside its ``metrics.jsonl``.

The JSON-lines log stays the record the results are assembled from; a tracker only mirrors it, so
turning one on changes no number and is not part of a run's identity. A tracker is opened per
training cell (a teacher, a ``(method, seed)`` run, a cascade stage), named by the cell's folder
inside the run (``methods/opd/seed0``) and grouped by the run folder. A cell started afresh (a new
run, ``--force``, a deleted cell folder) starts its tracker afresh too. On resume TensorBoard drops
what the dead run logged after its last checkpoint, as the JSON-lines log does; W&B cannot (it
accepts no step below one it has), so there the dead run's values stay for those steps and the
resumed run's are dropped: ``metrics.jsonl`` is the record. Packages are imported when
a run starts, so a missing one fails in one line before any training; nothing here is imported
by a run that logs to no tracker.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, Protocol, Sequence

from opd_bench.registry import Registry


class TrackerUnavailableError(ImportError):
    """A tracker asked for whose package is not installed; the message says what to install."""


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...  # one metrics.jsonl record, with its "step"

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    # An evaluation line repeats its step's counters (for the report's forward-pass axis): a
    # tracker takes them from the training line, so that each step has one point per series.
    evaluation = any(k.startswith("eval/") for k in record)
    return {k: float(v) for k, v in record.items()
            if k != "step" and (not evaluation or k.startswith("eval/")) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files under ``RUN/tensorboard/<cell>`` (``tensorboard --logdir RUN/tensorboard``)."""

    requires = ("torch.utils.tensorboard", "tensorboard")  # (module imported, package to install)

    def __init__(self, root: Path, name: str, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote after its checkpoint are hidden, as in metrics.jsonl,
        # and a fresh start hides every earlier event of the cell (its folder is outside the cell's)
        self.writer = SummaryWriter(log_dir=str(root / "tensorboard" / name),
                                    purge_step=0 if resume_step is None else resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per cell (project ``$WANDB_PROJECT`` or ``opd-bench``, group: the run folder);
    ``WANDB_MODE=offline`` keeps it on disk. A resumed cell continues its own W&B run; a cell
    started afresh gets a new one (W&B would drop every step of a reused run's new curve up to the
    old one's last). The id is kept in the cell folder (``ID_FILE``)."""

    requires = ("wandb", "wandb")
    ID_FILE = "wandb_id"

    def __init__(self, root: Path, name: str, config: dict, resume_step: int | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opd-bench"), group=root.name, name=name,
                              id=self.cell_id(root, name, resume_step is not None), resume="allow", config=config,
                              dir=str(root))

    @classmethod
    def cell_id(cls, root: Path, name: str, resumed: bool) -> str:
        """The W&B run id of the cell ``root/name``: the saved one on resume, else a new one, saved.
        A cell resumed from before ids were saved gets the one it had (a hash of its path)."""
        from opd_bench.io import atomic_write_bytes

        saved = root / name / cls.ID_FILE
        if resumed:
            return (saved.read_text().strip() if saved.is_file()
                    else hashlib.sha1(f"{root.resolve()}/{name}".encode()).hexdigest()[:16])
        new = secrets.token_hex(8)
        atomic_write_bytes(saved, new.encode())
        return new

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


TRACKERS = Registry("tracker")
TRACKERS.register("tensorboard", TensorBoardTracker, help="event files under RUN/tensorboard (pip install tensorboard)")
TRACKERS.register("wandb", WandbTracker, help="Weights & Biases, one run per cell (pip install wandb)")

_ACTIVE: dict[str, Any] = {"names": (), "root": None}


def configure(names: Sequence[str], root: str | Path | None) -> None:
    """Mirror the metrics of every training cell under ``root`` to ``names`` from now on in this
    process; checks the names and imports their packages now, so a run fails before it trains."""
    import importlib

    names = tuple(dict.fromkeys(n for n in names if n))
    for name in names:
        module, package = TRACKERS.resolve(name).requires  # resolve: "did you mean" for a misspelt name
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackerUnavailableError(f"--log-to {name} needs the {package} package; pip install {package} "
                              "(or drop it from --log-to)") from None
    _ACTIVE.update(names=names, root=None if root is None else Path(root))


def open_for(run_dir: str | Path, config: dict, resume_step: int | None) -> Tracker | None:
    """The configured trackers of the training cell in ``run_dir`` (None when none is configured or
    the cell is outside the configured run folder)."""
    names, root = _ACTIVE["names"], _ACTIVE["root"]
    if not names or root is None:
        return None
    try:
        name = Path(run_dir).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
    trackers: list[Tracker] = []
    try:
        for n in names:
            trackers.append(TRACKERS.resolve(n)(root, name, config, resume_step))
    except BaseException:  # the ones already started are closed, not left open beside a failed run
        _Both(trackers).close()
        raise
    return trackers[0] if len(trackers) == 1 else _Both(trackers)


class _Both:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        errors = []
        for tracker in self.trackers:  # every one closed, even when one fails to
            try:
                tracker.close()
            except Exception as error:  # noqa: BLE001 - re-raised below, after the others are closed
                errors.append(error)
        if errors:
            raise errors[0]
