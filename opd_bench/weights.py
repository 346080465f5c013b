"""Find the weights of a real model (a reward model, a detector) on this machine, or say how to get them.

Nothing in opd-bench downloads at run time. A model is given as a local folder or file, or as a
hub id that must already be in the Hugging Face hub cache. When it is not there, the error names
what was expected, where it was looked for, and the command that fetches it on a machine with
internet. There is no silent fallback to other weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class MissingPackageError(ImportError):
    """A package a reward or engine needs that is not installed; the message says what to install
    or where to run it instead."""


class MissingWeightsError(FileNotFoundError):
    """Weights that are not on this machine; the message says what to fetch and how."""

    def __str__(self) -> str:
        return str(self.args[0])


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.count("/") != 1 or Path(value).expanduser().exists()


def _hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers/diffusers
        return os.path.expanduser("~/.cache/huggingface/hub")


def resolve_weights(
    value: str | os.PathLike | None,
    *,
    what: str,
    expected: Sequence[str] = (),
    hub_id: str | None = None,
    option: str = "model_path",
    model_type: str | None = None,
    hub_files: Sequence[str] = (),
) -> Path:
    """Return the local path of ``value`` (a folder, a file or a cached hub id).

    ``what``: the model's name in messages ("PickScore"). ``expected``: file names that must be
    inside a folder (any one of ``a|b`` alternatives). ``hub_id``: the usual hub id, suggested
    when ``value`` is missing. ``option``: the argument the user passes the path as.
    ``model_type``: the ``model_type`` of a transformers ``config.json`` there (other weights in
    the right place would load with a wall of warnings and fail on a shape, far from the cause).
    ``hub_files``: the only files of ``hub_id`` needed, named in the download hint (HPSv2's repo
    holds several checkpoints; one is used).
    """
    wanted = "".join(f" {name}" for name in hub_files)
    if value is None or str(value) == "":
        suggestion = f" (usually the hub id {hub_id!r})" if hub_id else ""
        fetch = f"; fetch it with `hf download {hub_id}{wanted}` on a machine with internet" if hub_id else ""
        raise MissingWeightsError(f"{what} needs its weights: pass {option}=<local folder or cached hub id>{suggestion}{fetch}")
    text = str(value)
    if _looks_local(text):
        path = Path(text).expanduser()
        if not path.exists():
            fetch = f" (fetch with `hf download {hub_id}{wanted} --local-dir {path}` on a machine with internet)" if hub_id else ""
            raise MissingWeightsError(f"{what} weights not found: {str(path)!r} does not exist{fetch}")
        _check_expected(path, expected, what)
        _check_model_type(path, model_type, what, option)
        return path
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(text, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, RepositoryNotFoundError, offline errors
        if hub_id and text != hub_id:  # "weights/owlv2" reads like a hub id, but may be a folder not made yet
            raise MissingWeightsError(
                f"{what}: {text!r} is neither a folder here ({Path(text).resolve()} does not exist) nor a hub id in the "
                f"hub cache ({_hub_cache()}), and opd-bench never downloads; as a folder, fetch it on a machine with "
                f"internet with `hf download {hub_id}{wanted} --local-dir {text}`; as a hub id, run `hf download {text}` "
                "there and copy the cache"
            ) from None
        raise MissingWeightsError(
            f"{what}: hub id {text!r} is not in the hub cache ({_hub_cache()}) and opd-bench never downloads; "
            f"run `hf download {text}` on a machine with internet (and copy the cache), or pass a local folder "
            f"as {option}= ({type(error).__name__})"
        ) from None
    _check_expected(path, expected, what)
    _check_model_type(path, model_type, what, option)
    return path


def _check_model_type(path: Path, model_type: str | None, what: str, option: str) -> None:
    import json

    config = path / "config.json"
    if model_type is None or not config.is_file():
        return
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        return  # not a transformers config; the loader says what it makes of it
    if found is not None and found != model_type:
        raise MissingWeightsError(f"{what} weights in {str(path)!r} are of model type {found!r} (config.json), not {model_type!r}; "
                                  f"check that {option} names the {what} folder")


def _check_expected(path: Path, expected: Sequence[str], what: str) -> None:
    if not expected or path.is_file():
        return
    missing = [name for name in expected if not any((path / alt).exists() for alt in name.split("|"))]
    if missing:
        raise MissingWeightsError(
            f"{what} weights in {str(path)!r} are incomplete: missing {', '.join(missing)} "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})"
        )


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse a ``.safetensors`` file that is truncated or corrupt, naming it.

    Reads only the header (8-byte length, then JSON with each tensor's byte range): a file
    shorter than its header says was cut off (an interrupted copy or download), which the
    loaders report without naming the file or the cause.
    """
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    problem = ""
    with path.open("rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or 8 + header_size > size:
            problem = f"it has {size} bytes, less than its header needs"
        else:
            try:
                header = json.loads(handle.read(header_size))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if not all(isinstance(end, int) and not isinstance(end, bool) for end in ends):
                    raise TypeError("a data_offsets entry is not an integer")  # "12" would fail the sum below
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
                problem = f"its header is not valid ({type(error).__name__})"
            else:
                needed = 8 + header_size + max(ends, default=0)
                if size < needed:
                    problem = f"it has {size} bytes and its header describes {needed}"
    if problem:
        raise CorruptWeightsError(
            f"weights file {str(path)!r} is truncated or corrupt ({problem}); copy it again or rebuild it"
        )


class CorruptWeightsError(ValueError):
    """A weights file that is truncated or corrupt; the message names it."""


def indexed_shards(component: str | os.PathLike) -> list[Path] | None:
    """The shard files that a sharded component's ``*.safetensors.index.json`` names (sorted), or
    None without an index. A shard it names that is not there is refused, naming it: the shards
    that are there would pass every other check (an interrupted copy)."""
    import json

    component = Path(component)
    indexes = sorted(component.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    shards: set[Path] = set()
    for index in indexes:
        try:
            names = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            if not all(isinstance(name, str) for name in names):
                raise TypeError("a weight_map entry is not a file name")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptWeightsError(f"shard index {str(index)!r} is not valid ({type(error).__name__}: no weight_map "
                                      "of tensor -> file); copy it again") from None
        missing = sorted({name for name in names if not (component / name).is_file()})
        if missing:
            raise MissingWeightsError(f"weights file {str(component / missing[0])!r} is missing: {index.name} names it "
                                      f"({len(missing)} of {len(set(names))} shards missing); copy the folder again")
        shards |= {component / name for name in names}
    return sorted(shards)


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Check a local diffusers pipeline folder's weights before diffusers loads it.

    Every component with a model ``config.json`` needs weights, and every ``.safetensors`` file
    must be whole (``check_safetensors``). Diffusers' own errors name ``.bin`` files after an
    "unsafe serialization" warning when safetensors are missing; pipelines here are safetensors.
    """
    folder = Path(folder)
    for component in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        indexed_shards(component)  # a sharded component has every shard its index names
        files = sorted(component.glob("*.safetensors"))
        if not files and not any(component.glob("*.bin")):  # .bin: an old checkpoint diffusers can still load
            raise MissingWeightsError(
                f"pipeline folder {str(folder)!r} has no weights for {component.name}: expected "
                f"{component.name}/*.safetensors (as save_pretrained writes them); copy the folder again"
            )
        for file in files:
            check_safetensors(file)
