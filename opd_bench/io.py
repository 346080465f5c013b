"""Small file helpers: atomic writes, JSON comparison and image grids."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


# a saved student's weights: a LoRA adapter in peft's format or a full copy (Policy.save_adapter)
WEIGHT_FILES = ("adapter_model.safetensors", "full_model.safetensors")


def holds_weights(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a saved student's weights and adapter config, the files that decide what it draws
    (other files in the folder do not count). Cached per process by the files' size, times and inode: a
    run checks the same adapters many times, and a full copy is gigabytes."""
    folder = Path(folder)
    files = []
    for name in (*WEIGHT_FILES, "adapter_config.json"):
        if (folder / name).is_file():
            info = os.stat(folder / name)  # ctime changes on every write or rename, and utime cannot set it
            files.append((name, str((folder / name).resolve()), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return _digest(tuple(files))


@functools.lru_cache(maxsize=256)
def _digest(files: tuple[tuple[str, str, int, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, path, *_ in files:  # by the file's own name: a link into a cache hashes as a copy does
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # or an OS crash after the rename can leave the new name on an empty file
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_folder(folder: str | Path) -> None:
    """Flush every file under ``folder``, and the folders' entries, to the disk.

    Called before a marker that says the folder is complete (a cell's ``DONE``, a checkpoint's
    rename), so that after an OS crash or power loss the marker never outlives what it marks. A
    killed process needs none of this: what it wrote is already in the kernel's cache.
    """
    folder = Path(folder)
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_file() and not path.is_symlink() and os.name != "nt":  # Windows fsyncs only files open for writing
            _fsync(path, os.O_RDONLY)
    for path in [*(p for p in paths if p.is_dir() and not p.is_symlink()), folder, folder.parent]:
        try:
            _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # a folder cannot be opened for fsync on Windows or some network file systems
            pass


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NUMBER = r"(?:-?[0-9][0-9.eE+-]*|null|NaN|-?Infinity)"
# A list of plain numbers as json.dumps(indent=...) writes it: "[" newline, one number per line, "]".
# Raw newlines never occur inside JSON strings, so this cannot match text inside a string.
_NUMBER_LIST = re.compile(r"\[\n\s*(" + _NUMBER + r"(?:,\n\s*" + _NUMBER + r")*)\n\s*\]")


def json_text(value: Any, *, compact_lists: bool = False) -> str:
    """Indented, key-sorted JSON; ``compact_lists`` puts every list of plain numbers on one line
    (per-image scores would otherwise take a line each and make a result file several times larger)."""
    text = json.dumps(value, indent=2, sort_keys=True)
    if compact_lists:
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return text + "\n"


def atomic_write_json(path: str | Path, value: Any, *, compact_lists: bool = False) -> None:
    atomic_write_bytes(path, json_text(value, compact_lists=compact_lists).encode())


class CorruptFileError(ValueError):
    """A file a run or command wrote that can no longer be parsed (a disk error, a hand edit)."""


# What to do about a corrupt file inside a run folder: its part is redone once the file is gone.
REDO_HINT = "delete it and rerun the command to redo that part, or pass --force to start over"


def read_json(path: str | Path, *, fix: str = REDO_HINT) -> Any:
    """``json.loads`` of a file, with an error that names the file and ``fix`` when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}); {fix}") from None


def read_json_lines(path: str | Path, *, fix: str = REDO_HINT) -> list[Any]:
    """The records of a JSON-lines file; a line that is not JSON is named with ``fix``."""
    return parse_json_lines(Path(path).read_text().splitlines(), Path(path), fix=fix)


def parse_json_lines(lines: list[str], source: Path, *, fix: str = REDO_HINT) -> list[Any]:
    """One record per line of ``lines`` (blank lines: none), read from ``source``."""
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CorruptFileError(f"{source} line {number} is not valid JSON ({error}); {fix}") from None
    return records


# Settings added after runs were recorded, with the value every earlier run trained with. A recorded
# config is compared without them at that value, so a run folder, teacher or leaderboard entry made
# before the setting existed is the same experiment as one made since with that value.
LATER_SETTINGS = {"updates_per_rollout": 1}


def without_later_settings(value: Any) -> Any:
    """``value`` (JSON-like) with every ``LATER_SETTINGS`` key that holds its earlier value left out."""
    if isinstance(value, dict):
        return {k: without_later_settings(v) for k, v in value.items()
                if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k] and not isinstance(v, bool))}
    return [without_later_settings(v) for v in value] if isinstance(value, list) else value


_ABSENT = object()


def _clipped(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_differences(saved: Any, current: Any, *, limit: int = 3) -> str:
    """Where two JSON values differ, for an error message: ``"plan.opd.lr: 0.001 saved, 0.0003 now"``,
    the first ``limit`` differing keys, shallowest first (a different ``preset`` before the dozens of
    settings it changes), then how many more. A key one side lacks (a field a newer version added)
    reads ``absent``."""
    differences: list[tuple[int, str, str]] = []

    def walk(a: Any, b: Any, path: list[str]) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key, _ABSENT), b.get(key, _ABSENT), [*path, str(key)])
        elif a != b:
            shown = ["absent" if v is _ABSENT else _clipped(json.dumps(v)) for v in (a, b)]
            name = ".".join(path) or "(top)"
            differences.append((len(path), name, f"{name}: {shown[0]} saved, {shown[1]} now"))

    walk(saved, current, [])
    found = [text for _, _, text in sorted(differences)]
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # by file name; PNG otherwise


def save_grid(images, path: str | Path, columns: int) -> None:
    """Save ``[B, 3, H, W]`` images in ``[0, 1]`` as one grid with ``columns`` per row, in the format
    the name asks for (``GRID_FORMATS``; lossless PNG for any other name)."""
    import io

    import torch
    from PIL import Image

    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():  # clamp keeps NaN, and NaN casts to an arbitrary byte
        raise FloatingPointError(f"not writing {path}: the images hold NaN or inf values (a guidance scale or noise "
                                 "level too large for the model?); sample with smaller ones")
    images = images.clamp(0, 1)
    batch, _, height, width = images.shape
    rows = -(-batch // columns)
    grid = torch.ones(3, rows * height, columns * width)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=GRID_FORMATS.get(Path(path).suffix.lower(), "PNG"), quality=95)
    atomic_write_bytes(path, buffer.getvalue())
