"""The file helpers every result goes through: atomic writes and the compact JSON of result files."""

import json
import math
import os
import stat

import pytest

from opd_bench import io


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io.atomic_write_bytes(path, b"old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_written_file_is_readable_by_others_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        io.atomic_write_bytes(tmp_path / "sub" / "report.md", b"x")  # the folder is made too
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "sub" / "report.md").stat().st_mode) == 0o644


def _record_fsyncs(monkeypatch, events):
    """Make os.fsync and os.replace append what they act on to ``events``, in order."""
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), replace(a, b))[1])


def test_a_written_file_reaches_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """Otherwise an OS crash just after the rename can leave the name on an empty file."""
    events = []
    _record_fsyncs(monkeypatch, events)
    io.atomic_write_bytes(tmp_path / "results.json", b"new")
    assert [kind for kind, _ in events] == ["fsync", "replace"]
    assert events[0][1].startswith(str(tmp_path / ".results.json.")) and events[1][1] == str(tmp_path / "results.json")


def test_syncing_a_folder_flushes_every_file_and_folder_under_it(tmp_path, monkeypatch):
    (tmp_path / "final" / "sub").mkdir(parents=True)
    for name in ("final/adapter_model.safetensors", "final/sub/x.json"):
        (tmp_path / name).write_bytes(b"x")
    events = []
    _record_fsyncs(monkeypatch, events)
    io.sync_folder(tmp_path / "final")
    synced = {path for _, path in events}
    assert synced == {str(tmp_path / p) for p in ("final/adapter_model.safetensors", "final/sub/x.json", "final/sub", "final", "")}


def test_compact_json_puts_number_lists_on_one_line_and_reads_back_the_same(tmp_path):
    value = {"per_image": [0.5, -2.5e-05, None, 1], "nested": [[1, 2], [3.25]], "names": ["a", "b"],
             "text": "[\n  1\n]", "nan": [float("nan"), 1.0], "empty": []}
    text = io.json_text(value, compact_lists=True)
    assert '"per_image": [0.5, -2.5e-05, null, 1]' in text and '"names": [\n' in text  # strings keep a line each
    back = json.loads(text)
    assert math.isnan(back["nan"][0]) and back["nan"][1] == 1.0
    back.pop("nan"), value.pop("nan")
    assert back == value
    io.atomic_write_json(tmp_path / "r.json", value, compact_lists=True)
    assert json.loads((tmp_path / "r.json").read_text()) == value


def test_the_weights_hash_follows_the_weights_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"w" * 64)
    (a / "adapter_config.json").write_text("{}")
    (tmp_path / "blob-1234").write_bytes(b"w" * 64)  # a cache's blob, linked under the weights' name
    (b / "adapter_model.safetensors").symlink_to(tmp_path / "blob-1234")
    (b / "adapter_config.json").write_text("{}")
    first = io.weights_sha256(a)
    assert io.weights_sha256(b) == first
    (a / "README.md").write_text("notes beside the weights")
    assert io.weights_sha256(a) == first
    times = os.stat(a / "adapter_model.safetensors")
    (a / "adapter_model.safetensors").write_bytes(b"v" * 64)  # the same size, copied with its old times
    os.utime(a / "adapter_model.safetensors", ns=(times.st_atime_ns, times.st_mtime_ns))
    assert io.weights_sha256(a) != first
    assert io.weights_sha256(tmp_path / "not-trained-yet") != first  # a planned cell's folder: no weights


def test_a_grid_of_non_finite_images_is_refused_and_nothing_is_written(tmp_path):
    import torch

    from opd_bench.io import save_grid

    images = torch.rand(2, 3, 4, 4)
    save_grid(images, tmp_path / "ok.png", columns=2)
    assert (tmp_path / "ok.png").stat().st_size > 0
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="the images hold NaN or inf values"):
        save_grid(images, tmp_path / "bad.png", columns=2)
    assert not (tmp_path / "bad.png").exists()
