"""Serve any registered reward over HTTP, so a scorer can live in its own Python environment.

Some scorers pin dependencies that clash with the training environment (ImageReward needs an
old ``transformers``, Mask2Former needs ``mmdet``). Run ``opd-bench serve-reward NAME`` in the
scorer's environment and use ``rewards.get("remote", url=...)`` in the trainer: the remote
reward has the same signature, so trainers cannot tell the difference.

This module imports only the standard library at load time; numpy, PIL and torch are imported
when the first request is decoded, and the reward's own module when the server is built. It
never imports diffusers or transformers itself. See ``docs/reward_server.md``.

Protocol (version 1, JSON over HTTP/1.0, one request per connection)
--------------------------------------------------------------------

``GET /health`` ->
    ``{"status": "ok", "reward": NAME, "options": {...}, "protocol": 1, "max_batch": N,
    "max_request_bytes": M, "max_image_pixels": P, "max_request_pixels": Q, "token": bool}``

``POST /score`` with body
    ``{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}``
    (8-bit RGB PNGs of one size; ``metadata`` may be omitted, meaning empty dicts) ->
    ``{"scores": [float or null, ...], "details": {...}}``

* ``null`` in ``scores`` is NaN ("this reward does not apply to this sample").
* ``details`` is the reward's details made JSON-safe: tensors and arrays become lists, NaN and
  infinities become ``null``, values JSON cannot hold are dropped (their keys are listed in
  ``details["serve/dropped"]``).
* The server scores a request in chunks of at most ``max_batch`` images, one chunk at a time
  (a lock serialises reward calls: reward models are not thread safe). Per-sample lists (one
  entry per image of the chunk) are concatenated in order; any other detail of a split request
  is returned as one value per chunk under ``"<key>/per_chunk"``, with the chunk sizes in
  ``details["chunk_sizes"]``.
* Image sizes are read from each PNG's IHDR header before anything is decoded: an image over
  ``max_image_pixels`` or a request over ``max_request_pixels`` (width x height summed over its
  images) is refused with 413, so a small PNG that decodes to gigabytes costs nothing. Images
  are decoded one chunk at a time under the reward lock, so at most one chunk of decoded pixels
  exists at a time, whatever the number of concurrent clients. Only the first IHDR is read
  there; an image whose decoder would see another size (a second IHDR chunk) is refused with 400.
* At most ``REQUEST_SLOTS`` (2) request bodies are read and held at once: one being scored, one
  waiting for it. Further clients wait before their bodies are read, so the server's memory is
  bounded by two bodies and one decoded chunk however many clients connect (each waiting client
  holds a thread and a connection). A body must arrive within ``BODY_SECONDS`` (30) plus one
  second per MiB, or its client is dropped, so a stalled client cannot hold a slot for long.
* Per-sample details are concatenated across chunks as they are: a value that is a position in
  the batch (an index) counts from the start of its chunk.
* With a token (``--token`` or ``OPD_REWARD_TOKEN``), every request must carry the header
  ``Authorization: Bearer TOKEN``; others get 401.
* Errors are ``{"error": "one line"}`` with status 400 (malformed JSON, fields or PNG header),
  401 (missing or wrong token), 404 (unknown path), 411 (no Content-Length), 413 (body over
  ``max_request_bytes`` or images over the pixel limits; a body over the limit by more than
  ``DISCARD_BYTES`` is not read, so its client may see the connection reset instead) or 500 (the
  reward raised; the message names the exception).
* A client that goes away before its reply is written costs one log line, not a traceback.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import struct
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8700
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Pixel limits, checked from the PNG headers before decoding. A blank PNG compresses about 700:1,
# so the byte limit alone lets 0.34 MB decode to 81 Mpx (a 9000x9000 image), and the `ocr` reward
# (3x bicubic upscale) needs ~340 bytes per pixel: 24 GB. The defaults keep the heaviest request
# to about 3 GB with that reward (docs/reward_server.md) while covering real use: 2048x2048 per
# image (FLUX's 1024x1024 four times over), 8 Mpx per request (8 images of 1024x1024, 32 of 512x512).
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048
DEFAULT_MAX_REQUEST_PIXELS = 8 * 1024 * 1024
TOKEN_ENV = "OPD_REWARD_TOKEN"  # the shared token, read by the CLI and the remote reward
REQUEST_SLOTS = 2  # request bodies held in memory at once: one scored, one read ahead
# A body must arrive within this many seconds plus one per MiB, or its client is dropped: a client
# that sends headers and then stalls would otherwise hold a request slot, and with two of them,
# all scoring (the socket's own timeout is per read, so a byte a minute would never end).
BODY_SECONDS = 30
DISCARD_BYTES = 1 << 20  # an over-limit body is read and dropped up to this size, so its client sees the 413


def check_token(token: str, where: str) -> None:
    """A token an HTTP header can carry: printable ASCII, no spaces (a trailing newline from a file
    is the usual slip). The message never shows the token."""
    if not isinstance(token, str) or not token or any(not ("!" <= c <= "~") for c in token):
        raise ValueError(f"{where} must be non-empty printable ASCII without spaces or line breaks "
                         "(a token read from a file keeps its newline: strip it)")

logger = logging.getLogger(__name__)

_DROPPED = object()  # marks a detail value JSON cannot hold


class RequestError(ValueError):
    """A malformed request (HTTP 400); the message says what is wrong and what to send."""

    status = 400


class RequestTooLargeError(RequestError):
    """Images over the server's pixel limits (HTTP 413)."""

    status = 413


# --------------------------------------------------------------------------------------------
# Images: PNG both ways, shared by the server and the client so the encoding is symmetric.
# --------------------------------------------------------------------------------------------


def encode_png_batch(images) -> list[str]:
    """``[B, 3, H, W]`` floats in [0, 1] -> B base64 PNG strings (uint8, rounded to nearest)."""
    from PIL import Image

    from opd_bench.rewards.base import to_uint8

    encoded = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        # Level 1: scores do not depend on compression and requests are mostly local.
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature (8 bytes), IHDR length and type (8), width, height, bit depth, colour type (10): the
# first 26 bytes, i.e. the first 36 base64 characters (a multiple of 4, so they decode alone).
_HEADER_BASE64_CHARS = 36


def png_size(index: int, text: Any) -> tuple[int, int]:
    """``(width, height)`` of a base64 PNG, read from its IHDR header without decoding the image.

    Also refuses anything that is not an 8-bit RGB PNG (bit depth 8, colour type 2), so only the
    header has been read when a request is refused.
    """
    if not isinstance(text, str):
        raise RequestError(f"images[{index}] is a {type(text).__name__}; send base64 PNG strings")
    try:
        head = base64.b64decode(text[:_HEADER_BASE64_CHARS], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"images[{index}] is not a base64 PNG ({error}); send base64 PNG strings") from None
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise RequestError(f"images[{index}] is not a base64 PNG (no PNG signature and IHDR header); send base64 PNG strings")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", head[16:26])
    if bit_depth != 8 or colour_type != 2:
        raise RequestError(
            f"images[{index}] is a PNG of bit depth {bit_depth} and colour type {colour_type}; send 8-bit RGB PNGs"
        )
    if width == 0 or height == 0:
        raise RequestError(f"images[{index}] is {width}x{height}; send non-empty images")
    return width, height


def check_pixel_limits(encoded: Sequence[Any], max_image_pixels: int, max_request_pixels: int) -> tuple[int, int]:
    """Check a request's images from their PNG headers alone; returns their common ``(width, height)``.

    Raises ``RequestTooLargeError`` (413) for an image over ``max_image_pixels`` or a request
    over ``max_request_pixels``, ``RequestError`` (400) for a bad header or mixed sizes.
    """
    sizes = [png_size(index, text) for index, text in enumerate(encoded)]
    for index, (width, height) in enumerate(sizes):
        if width * height > max_image_pixels:
            raise RequestTooLargeError(
                f"images[{index}] is {width}x{height} = {width * height} pixels, over the server's limit of "
                f"{max_image_pixels} pixels per image; send smaller images or restart the server with a larger --max-image-pixels"
            )
    if len(set(sizes)) > 1:
        shown = sorted({(height, width) for width, height in sizes})
        raise RequestError(f"images have different sizes {shown} (height, width); send one size per request")
    total = sum(width * height for width, height in sizes)
    if total > max_request_pixels:
        raise RequestTooLargeError(
            f"request of {len(sizes)} images, {total} pixels, is over the server's limit of {max_request_pixels} "
            "pixels per request; send fewer images per request (RemoteReward(max_batch=...)) or restart the "
            "server with a larger --max-request-pixels"
        )
    return sizes[0]


def decode_png_batch(encoded: Sequence[str], size: tuple[int, int], first_index: int = 0):
    """B base64 PNG strings -> ``[B, 3, H, W]`` float32 tensor in [0, 1] (value / 255).

    ``size``: the ``(width, height)`` that ``check_pixel_limits`` read from the headers and
    allowed; an image that would decode to any other size is refused before it is decoded.
    ``first_index``: the request index of ``encoded[0]``, for error messages.
    """
    import numpy as np

    arrays = [_decode_png(index, text, size) for index, text in enumerate(encoded, start=first_index)]
    stacked = np.stack(arrays)
    del arrays  # one uint8 copy at a time
    # uint8 is made contiguous before the float copy, and divided in place: one float copy only.
    return _torch().from_numpy(stacked).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _decode_png(index: int, text: Any, size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    if not isinstance(text, str):
        raise RequestError(f"images[{index}] is a {type(text).__name__}; send base64 PNG strings")
    errors = (binascii.Error, OSError, ValueError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))  # reads the chunks before the pixels
    except errors as error:
        raise RequestError(f"images[{index}] is not a base64 PNG ({error}); send base64 PNG strings") from None
    # Pillow takes the size from the last IHDR chunk, the limits were checked on the first: a
    # second, larger IHDR would otherwise decode gigabytes from a request the limits allowed.
    if image.size != tuple(size):
        raise RequestError(f"images[{index}] declares {size[0]}x{size[1]} in its header but holds a "
                           f"{image.size[0]}x{image.size[1]} image; send PNGs with one IHDR chunk")
    try:
        image.load()
    except errors as error:
        raise RequestError(f"images[{index}] is not a base64 PNG ({error}); send base64 PNG strings") from None
    if image.format != "PNG" or image.mode != "RGB":
        raise RequestError(
            f"images[{index}] is {image.format} in mode {image.mode}; send 8-bit RGB PNGs"
        )
    return np.asarray(image, dtype=np.uint8)


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------------------------
# Scores and details: JSON-safe conversion and merging of chunks.
# --------------------------------------------------------------------------------------------


def scores_to_json(scores: Sequence[float]) -> list[float | None]:
    """Floats -> JSON values; NaN ("does not apply") becomes null."""
    return [None if math.isnan(score) else float(score) for score in scores]


def scores_from_json(values: Sequence[Any]) -> list[float]:
    """The inverse of ``scores_to_json``: null -> NaN."""
    return [math.nan if value is None else float(value) for value in values]


def json_safe_details(details: dict[str, Any]) -> dict[str, Any]:
    """Make a reward's details JSON-safe; keys of dropped values go to ``serve/dropped``."""
    dropped: list[str] = []
    safe = _json_safe(details, "", dropped)
    if dropped:
        safe["serve/dropped"] = dropped
    return safe


def _json_safe(value: Any, path: str, dropped: list[str]) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, arrays, numpy scalars
        return _json_safe(value.tolist(), path, dropped)
    if isinstance(value, dict):
        safe = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                dropped.append(f"{path}{key!r}")
                continue
            converted = _json_safe(item, f"{path}{key}/", dropped)
            if converted is _DROPPED:
                dropped.append(f"{path}{key}")
            else:
                safe[str(key)] = converted
        return safe
    if isinstance(value, (list, tuple)):
        # None keeps the other entries aligned with their samples.
        items = [_json_safe(item, f"{path}{i}/", dropped) for i, item in enumerate(value)]
        return [None if item is _DROPPED else item for item in items]
    return _DROPPED


def merge_chunk_details(chunks: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Merge the details of consecutive chunks ``(size, details)`` of one batch.

    Per-sample lists (length == chunk size in every chunk) are concatenated; other values are
    kept per chunk under ``"<key>/per_chunk"`` (None where a chunk lacks the key).
    """
    if len(chunks) == 1:
        return chunks[0][1]
    keys = list(dict.fromkeys(key for _, details in chunks for key in details))
    merged: dict[str, Any] = {}
    for key in keys:
        values = [details.get(key, _DROPPED) for _, details in chunks]
        per_sample = all(isinstance(v, list) and len(v) == size for v, (size, _) in zip(values, chunks))
        if per_sample:
            merged[key] = [item for value in values for item in value]
        else:
            merged[f"{key}/per_chunk"] = [None if value is _DROPPED else value for value in values]
    merged["chunk_sizes"] = [size for size, _ in chunks]
    return merged


def chunk_ranges(total: int, max_batch: int) -> list[range]:
    """``range`` objects covering ``0..total`` in order, each at most ``max_batch`` long."""
    return [range(start, min(start + max_batch, total)) for start in range(0, total, max_batch)]


# --------------------------------------------------------------------------------------------
# The server.
# --------------------------------------------------------------------------------------------


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward object; ``port`` and ``url`` once bound.

    Built by ``make_reward_server`` from a registered name; constructed directly it accepts
    any reward callable (tests use this for rewards that are not registered).
    """

    daemon_threads = True  # a hung client must not keep the process alive on shutdown

    def __init__(
        self,
        address: tuple[str, int],
        reward: Callable,
        *,
        name: str,
        options: dict[str, Any] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        token: str | None = None,
    ):
        limits = {"max_batch": max_batch, "max_request_bytes": max_request_bytes,
                  "max_image_pixels": max_image_pixels, "max_request_pixels": max_request_pixels}
        for key, value in limits.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if token is not None:
            check_token(token, "the reward server's --token (or OPD_REWARD_TOKEN)")
        self.reward = reward
        self.reward_name = name
        self.reward_options = dict(options or {})
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.token = token
        # Serialises reward calls (reward models are not thread safe) and the decoding of each
        # chunk, so at most one chunk of decoded pixels is in memory, whatever the concurrency.
        self.reward_lock = threading.Lock()
        self.request_slots = threading.BoundedSemaphore(REQUEST_SLOTS)
        self.score_requests = 0  # POST /score requests received, counted for tests and logs
        super().__init__(address, _RewardRequestHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}/"

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            # A client that timed out or went away is routine: one line, no traceback.
            logger.warning("client %s went away before its reply was sent (%s)", client_address[0], type(error).__name__)
        else:  # anything else is a bug in the server: keep the traceback
            logger.error("request from %s failed", client_address[0], exc_info=True)

    def authorised(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always true without a token)."""
        if self.token is None:
            return True
        scheme, _, credentials = (header or "").strip().partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right. The
        # scheme's case does not matter in HTTP ("bearer" is "Bearer").
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("utf-8"),
                                                                   self.token.encode("utf-8"))

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "reward": self.reward_name,
            "options": json_safe_details(self.reward_options),
            "protocol": PROTOCOL_VERSION,
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_request_pixels": self.max_request_pixels,
            "token": self.token is not None,
        }

    def score(self, payload: Any) -> dict[str, Any]:
        """Validate a decoded ``/score`` body, score it chunk by chunk, return the reply."""
        encoded, prompts, metadata = _parse_score_request(payload)
        if not encoded:
            return {"scores": [], "details": {}}
        # Headers only: an oversized request is refused before a single pixel is decoded.
        size = check_pixel_limits(encoded, self.max_image_pixels, self.max_request_pixels)
        scores: list[float] = []
        chunks = []
        for part in chunk_ranges(len(encoded), self.max_batch):
            chunk_scores, details = self._score_chunk(part.start, size, encoded[part.start : part.stop],
                                                      prompts[part.start : part.stop], metadata[part.start : part.stop])
            scores.extend(chunk_scores)
            chunks.append((len(part), json_safe_details(details)))
        return {"scores": scores_to_json(scores), "details": merge_chunk_details(chunks)}

    def _score_chunk(self, start: int, size: tuple[int, int], encoded: list[str], prompts: list[str],
                     metadata: list[dict]) -> tuple[list[float], dict]:
        with self.reward_lock:
            images = decode_png_batch(encoded, size, first_index=start)
            output = self.reward(images, prompts, metadata)
            del images  # before the next request's chunk is decoded
        scores = output.scores.tolist()
        if len(scores) != len(prompts):
            raise RuntimeError(f"reward {self.reward_name!r} returned {len(scores)} scores for {len(prompts)} images")
        if any(math.isinf(score) for score in scores):
            raise RuntimeError(f"reward {self.reward_name!r} returned an infinite score; scores must be finite or NaN")
        return scores, output.details


def _parse_score_request(payload: Any) -> tuple[list, list[str], list[dict]]:
    usage = 'send {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}'
    if not isinstance(payload, dict):
        raise RequestError(f"the request body is a JSON {type(payload).__name__}, not an object; {usage}")
    unknown = sorted(set(payload) - {"images", "prompts", "metadata"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; {usage}")
    encoded, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(encoded, list) or not isinstance(prompts, list):
        raise RequestError(f'"images" and "prompts" must both be lists; {usage}')
    metadata = payload.get("metadata", [{} for _ in encoded])
    if not isinstance(metadata, list):
        raise RequestError(f'"metadata" must be a list of objects; {usage}')
    if not len(encoded) == len(prompts) == len(metadata):
        raise RequestError(
            f"got {len(encoded)} images, {len(prompts)} prompts and {len(metadata)} metadata records; "
            "send one prompt and one (possibly empty) metadata object per image"
        )
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise RequestError(f'every entry of "prompts" must be a string; {usage}')
    if not all(isinstance(record, dict) for record in metadata):
        raise RequestError(f'every entry of "metadata" must be an object; {usage}')
    return encoded, prompts, metadata


class _RewardRequestHandler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 300  # seconds a silent client may hold a connection (and a thread)
    server_version = "opd-bench-reward/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._check_token():
            return
        if self.path.split("?")[0].rstrip("/") == "/health":
            self._send_json(200, self.server.health())
        else:
            self._send_error(404, f"no GET {self.path}; use GET /health or POST /score")

    def do_POST(self) -> None:  # noqa: N802
        if not self._check_token():
            return
        if self.path.split("?")[0].rstrip("/") != "/score":
            self._send_error(404, f"no POST {self.path}; use POST /score")
            return
        self.server.score_requests += 1
        with self.server.request_slots:  # bodies wait in their sockets, not in this process
            self._score()

    def _score(self) -> None:
        body = self._read_body()
        if body is None:
            return
        try:
            reply = self.server.score(_parse_json(body))
        except RequestError as error:
            self._send_error(error.status, str(error))
            return
        except Exception as error:  # noqa: BLE001 - any reward failure becomes a 500 reply
            logger.exception("reward %s failed", self.server.reward_name)
            first_line = (str(error).splitlines() or [""])[0]
            self._send_error(500, f"reward {self.server.reward_name!r} raised {type(error).__name__}: {first_line}")
            return
        del body
        self._send_json(200, reply)

    def _check_token(self) -> bool:
        """False after a 401 reply to a request without the server's token."""
        header = self.headers.get("Authorization")
        if self.server.authorised(header):
            return True
        # Read a small enough body first, so that the client sees the 401 and not a reset.
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) <= DISCARD_BYTES:  # the remote reward's GET /health has none
            self._discard(int(length))
        what = "no token" if not header else "a wrong token"
        self._send_error(
            401,
            f"this reward server needs its token and the request has {what}; pass token=... to the remote "
            f"reward or set {TOKEN_ENV} to the server's token",
        )
        return False

    def _read_body(self) -> bytes | None:
        """The request body, or None after an error reply (411 / 413)."""
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.strip().isdigit():
            self._send_error(411, "the request needs a Content-Length header (chunked bodies are not supported)")
            return None
        length = int(length_header)
        limit = self.server.max_request_bytes
        if length > limit:
            # Read and discard the body first: closing a socket with unread data resets the
            # connection, and the client would see "connection reset" instead of this reply. A
            # body far over the limit is not read at all (it could be gigabytes); its client may
            # see the reset (the remote reward checks the limit before it sends).
            if length <= limit + DISCARD_BYTES:
                self._discard(length)
            self._send_error(
                413,
                f"request of {length} bytes is over the server's limit of {limit} bytes; send fewer "
                "images per request (RemoteReward(max_batch=...)) or restart the server with a larger --max-request-mb",
            )
            return None
        return self._receive(length, keep=True)

    def _discard(self, length: int) -> None:
        self._receive(length, keep=False)

    def _receive(self, length: int, keep: bool) -> bytes:
        """``length`` bytes of the body (kept or dropped), within ``BODY_SECONDS`` plus a second per
        MiB; a client that is slower, or closes the connection mid-body, is dropped (routine: one
        log line, no reply, as nobody waits for one)."""
        deadline = time.monotonic() + BODY_SECONDS + length / 2**20
        parts, received = [], 0
        try:
            while received < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"body not received within {BODY_SECONDS} s plus 1 s per MiB")
                self.connection.settimeout(min(left, self.timeout))
                data = self.rfile.read1(min(length - received, 1 << 20))
                if not data:  # the client closed the connection mid-body: nobody to reply to
                    raise ConnectionAbortedError(f"body ended after {received} of {length} bytes")
                received += len(data)
                if keep:
                    parts.append(data)
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unknown method, a bad request line) as ``{"error": ...}``
        too, where they were HTML pages."""
        self.close_connection = True
        text = f"{message or HTTPStatus(code).phrase}; this server answers GET /health and POST /score"
        if self.command == "HEAD":
            self.send_response(code)
            self.end_headers()
            return
        self._send_error(code, text)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="opd-bench reward server"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        logger.info("%s %s", self.address_string(), format % args)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    # ValueError: an integer past Python's digit limit; RecursionError: thousands of nested brackets
    except (ValueError, RecursionError) as error:
        raise RequestError(
            f"the request body is not valid JSON ({error}); send "
            '{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}'
        ) from None


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


def make_reward_server(
    name: str,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    **settings: Any,
) -> RewardServer:
    """Build the reward registered as ``name`` and bind a server to it (``port=0``: any free port).

    ``settings``: ``RewardServer``'s limits (``max_batch``, ``max_request_bytes``,
    ``max_image_pixels``, ``max_request_pixels``) and ``token``. The server is not started; call
    ``serve_forever()`` (or use ``serve_reward``).
    """
    from opd_bench import rewards

    options = dict(options or {})
    if name == "remote":
        raise ValueError("serving the 'remote' reward would only forward requests; serve the reward itself")
    try:
        reward = rewards.get(name, **options)
    except TypeError as error:  # the options' names are checked by rewards.get: a value the reward cannot take
        raise ValueError(f"reward {name!r} could not be built with options {sorted(options)} ({error})") from None
    try:
        return RewardServer((host, port), reward, name=name, options=options, **settings)
    except OSError as error:
        fix = ("choose another --port or stop what uses it" if error.errno == errno.EADDRINUSE
               else "give --host an IPv4 address of this machine (127.0.0.1, or 0.0.0.0 for all)")
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); {fix}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback interface (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve_reward(
    name: str,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    on_ready: Callable[[RewardServer], None] | None = None,
    **settings: Any,
) -> None:
    """Serve the reward ``name`` until interrupted (Ctrl-C); ``on_ready`` is called once bound.

    ``settings`` are ``make_reward_server``'s (limits and ``token``).
    """
    server = make_reward_server(name, options, host, port, **settings)
    if server.token is None and not is_loopback(host):
        logger.warning(
            "listening on %s without a token: anyone who reaches port %d can use this server; set %s (or --token)",
            host, server.port, TOKEN_ENV,
        )
    with server:
        if on_ready is not None:
            on_ready(server)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            logger.info("stopping the reward server at %s", server.url)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when possible, else kept as strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"option {pair!r} is not key=value; write e.g. --option target=[1,0,0]")
        if key in options:
            raise ValueError(f"option {key!r} is given twice; give each option once")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m opd_bench.serve NAME ...``: the CLI command for environments without click."""
    import argparse

    from opd_bench.registry import UnknownNameError

    parser = argparse.ArgumentParser(prog="python -m opd_bench.serve", description="Serve a registered reward over HTTP.")
    parser.add_argument("name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS)
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None, help=f"default: ${TOKEN_ENV}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        serve_reward(
            args.name, parse_options(args.option), args.host, args.port, max_batch=args.max_batch,
            max_request_bytes=int(args.max_request_mb * 2**20), max_image_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels, token=args.token,
            on_ready=lambda server: print(f"serving reward {args.name} at {server.url} (Ctrl-C to stop)", flush=True),
        )
    except (ValueError, UnknownNameError, OSError, OverflowError, RuntimeError) as error:  # bad input: one line, no traceback
        parser.exit(1, f"error: {str(error).splitlines()[0]}\n")


if __name__ == "__main__":
    main()
