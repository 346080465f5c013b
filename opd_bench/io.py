"""Small file helpers: atomic writes and image grids."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def save_grid(images, path: str | Path, columns: int) -> None:
    """Save ``[B, 3, H, W]`` images in ``[0, 1]`` as one PNG grid with ``columns`` per row."""
    import io

    import torch
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    batch, _, height, width = images.shape
    rows = -(-batch // columns)
    grid = torch.ones(3, rows * height, columns * width)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
