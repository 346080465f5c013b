"""Peak memory of a reward server under the largest request its default limits accept.

Starts ``python -m opd_bench.serve REWARD --port 0`` in a subprocess, warms it up with one small
request, then sends (1) the largest accepted request: blank images, the most pixels per byte,
``max_request_pixels`` in all, ``max_image_pixels`` each; (2) the same request from several
clients at once; (3) the 9000x9000 blank PNG of issue 12 (0.34 MB), which must be refused from
its header. After each step it reads the server's peak resident memory (``VmHWM``, reset in
between through ``/proc/PID/clear_refs``) and prints one JSON line per step.

    python benchmarks/bench_reward_server_memory.py --reward ocr
    python benchmarks/bench_reward_server_memory.py --reward toy/brightness --clients 4

Linux only (``/proc``). Figures and the machine they were measured on: docs/reward_server.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from opd_bench.serve import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def blank_png(width: int, height: int) -> bytes:
    """An all-black 8-bit RGB PNG, compressed row by row (the full image never exists here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + 3 * width)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def body(side: int, count: int) -> bytes:
    image = base64.b64encode(blank_png(side, side)).decode("ascii")
    metadata = [{"task": "ocr"}] * count
    return json.dumps({"images": [image] * count, "prompts": ['a sign that says "ab"'] * count, "metadata": metadata}).encode()


def post(url: str, data: bytes) -> tuple[int, str, float]:
    start = time.perf_counter()
    request = urllib.request.Request(url + "score", data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=3600) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    return status, text, time.perf_counter() - start


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS


def report(fields: dict) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="ocr")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in step 2 (< 2: skip it)")
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "opd_bench.serve", args.reward, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = server.stdout.readline()
        if " at " not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        url = line.split(" at ")[1].split()[0]
        side = int(DEFAULT_MAX_IMAGE_PIXELS ** 0.5)
        count = DEFAULT_MAX_REQUEST_PIXELS // DEFAULT_MAX_IMAGE_PIXELS
        status, _, _ = post(url, body(64, 1))  # warm-up: imports and the reward's first call
        assert status == 200, status
        idle = memory_mb(server.pid)["VmRSS"]
        report({"step": "idle after warm-up", "reward": args.reward, "rss_mb": round(idle)})

        largest = body(side, count)
        reset_peak(server.pid)
        status, _, seconds = post(url, largest)
        peak = memory_mb(server.pid)["VmHWM"]
        report({"step": "largest accepted request", "images": f"{count} x {side}x{side}",
                "request_mb": round(len(largest) / 2**20, 2), "status": status, "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak), "over_idle_mb": round(peak - idle)})

        if args.clients >= 2:
            reset_peak(server.pid)
            results = []
            threads = [threading.Thread(target=lambda: results.append(post(url, largest))) for _ in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            peak = memory_mb(server.pid)["VmHWM"]
            report({"step": f"{args.clients} such requests at once", "statuses": sorted(r[0] for r in results),
                    "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak),
                    "over_idle_mb": round(peak - idle)})

        reset_peak(server.pid)
        bomb = body(9000, 1)
        status, text, seconds = post(url, bomb)
        peak = memory_mb(server.pid)["VmHWM"]
        report({"step": "9000x9000 blank PNG", "request_mb": round(len(bomb) / 2**20, 2), "status": status,
                "seconds": round(seconds, 3), "peak_rss_mb": round(peak), "error": json.loads(text).get("error", "")[:80]})
        status, _, _ = post(url, body(64, 1))
        report({"step": "still serving", "status": status})
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
