"""A reward scored by a reward server (``opd-bench serve-reward``) in another process or machine.

``rewards.get("remote", url="http://127.0.0.1:8700/")`` has the signature of every other reward,
so trainers and evaluators cannot tell the difference. Images travel as 8-bit PNGs: the server
scores ``round(image * 255) / 255`` of the image clipped to [0, 1], not the float image; a NaN or
infinite pixel is sent as ``call_reward`` hands it to every reward (``base.png_values``: NaN black).
Protocol: ``opd_bench/serve.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import torch

from opd_bench.rewards.base import RewardOutput, check_batch, png_values
from opd_bench.serve import (
    PROTOCOL_VERSION, TOKEN_ENV, check_token, chunk_ranges, encode_png_batch, merge_chunk_details, scores_from_json,
)

# Failures worth another try: the server is starting, restarting, overloaded or the network hiccuped.
_TRANSIENT_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class RemoteRewardError(RuntimeError):
    """The reward server refused a request, failed, or could not be reached."""


class RemoteReward:
    """Score images with the reward server at ``url``.

    * ``timeout``: seconds to wait for one HTTP reply (a reward on a large batch may be slow).
    * ``retries``: how many times a request is tried in all, for connection errors and 5xx
      replies; 4xx replies (a bad request) and timeouts (the server may still be busy with it)
      are not retried.
    * ``backoff``: seconds before the second try, doubled before each further try.
    * ``max_batch``: at most this many images per request (None: the whole batch in one);
      lower it when the server answers 413 (request too large).
    * ``token``: the server's shared token (``opd-bench serve-reward --token``), sent as
      ``Authorization: Bearer TOKEN``; None reads ``OPD_REWARD_TOKEN`` (unset: no token).
    * ``reward``: the reward the server must serve (its ``/health`` name), checked with its
      protocol version before the first images are sent; None checks the protocol only. A
      server of another reward would otherwise score, say, GenEval images with PickScore.

    Environment proxies (``http_proxy``) are ignored: a reward server is your own service.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int | None = None,
        token: str | None = None,
        reward: str | None = None,
    ):
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote reward url must look like http://HOST:PORT/, got {url!r}")
        try:
            parsed.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            raise ValueError(f"remote reward url {url!r} has a port outside 0-65535") from None
        if not _is_number(timeout) or not timeout > 0:
            raise ValueError(f"remote reward timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(retries, int) or retries < 1:
            raise ValueError(f"remote reward retries is the number of tries in all and must be >= 1, got {retries!r}")
        if not _is_number(backoff) or not backoff >= 0:
            raise ValueError(f"remote reward backoff must be a number of seconds >= 0, got {backoff!r}")
        if reward is not None and not isinstance(reward, str):
            raise ValueError(f"remote reward 'reward' names the served reward (e.g. \"sd/geneval-mmdet\"), got {reward!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"remote reward max_batch must be a positive integer or None, got {max_batch!r}")
        self.url = str(url).rstrip("/") + "/"
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_batch = max_batch
        token = os.environ.get(TOKEN_ENV) if token is None else token
        if token:
            check_token(token, f"the remote reward's token (token=... or {TOKEN_ENV})")
        self._token = token or None  # kept out of repr and error messages
        self.expected_reward = reward
        self._limits: dict[str, Any] = {}  # the server's /health limits, read before the first images go out
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        check_batch(images, prompts, metadata)
        total = images.shape[0]
        if total == 0:
            return RewardOutput(torch.empty(0))
        images = png_values(images)  # a PNG cannot hold NaN: sent as it scores in-process
        scores = torch.full((total,), float("nan"))
        self._check_server()
        chunks = []
        for part in chunk_ranges(total, self._images_per_request(images.shape[-2] * images.shape[-1], total)):
            chunk = slice(part.start, part.stop)
            reply = self._score_request(images[chunk], list(prompts[chunk]), list(metadata[chunk]))
            scores[chunk] = torch.tensor(reply["scores"], dtype=torch.float32)
            chunks.append((len(part), reply["details"]))
        return RewardOutput(scores, merge_chunk_details(chunks))

    def _images_per_request(self, pixels: int, count: int) -> int:
        """``max_batch``, lowered to what the server's pixel limit per request takes (its 413
        otherwise); an image over its per-image limit is refused here, before anything is sent."""
        for key, per in (("max_image_pixels", "image"), ("max_request_pixels", "request")):
            limit = self._limits.get(key)
            if _is_number(limit) and pixels > limit:  # not even one image fits
                raise RemoteRewardError(f"images of {pixels} pixels are over the limit of the server at {self.url} "
                                        f"({limit} pixels per {per}); restart it with a larger --max-{per}-pixels")
        per_request, most = self._limits.get("max_request_pixels"), self.max_batch or count
        return min(most, int(per_request // pixels)) if _is_number(per_request) else most

    def _check_server(self) -> None:
        """Once: the server speaks this protocol and, where ``reward`` was given, serves that reward."""
        if self._limits:
            return
        health = self.health()
        served = health.get("reward") if isinstance(health, dict) else None
        protocol = health.get("protocol") if isinstance(health, dict) else None
        if protocol != PROTOCOL_VERSION:
            raise RemoteRewardError(f"the server at {self.url} speaks protocol {protocol!r}, this opd-bench "
                                    f"{PROTOCOL_VERSION}; is it an `opd-bench serve-reward` server of the same version?")
        if self.expected_reward is not None and served != self.expected_reward:
            raise RemoteRewardError(f"the server at {self.url} serves the reward {served!r}, not {self.expected_reward!r}; "
                                    "point url at the right server, or change reward=...")
        self._limits = {key: health.get(key) for key in ("max_request_bytes", "max_image_pixels", "max_request_pixels")}

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` reply: reward name, options, protocol version, limits."""
        return self._request("health", None)

    def _score_request(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, Any]:
        body = _json_body(
            {"images": encode_png_batch(images), "prompts": list(prompts), "metadata": list(metadata)}
        )
        limit = self._limits.get("max_request_bytes")
        if _is_number(limit) and len(body) > limit:  # the server would not read it, and a reset is all we would see
            raise RemoteRewardError(f"a request of {len(images)} images is {len(body)} bytes, over the limit of the "
                                    f"server at {self.url} ({limit} bytes); lower max_batch=... of the remote reward "
                                    "or restart the server with a larger --max-request-mb")
        reply = self._request("score", body)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if (not isinstance(scores, list) or len(scores) != len(prompts)
                or not all(value is None or _is_number(value) for value in scores)):
            count = f"{len(scores)} scores" if isinstance(scores, list) else "no scores"
            raise RemoteRewardError(
                f"reward server at {self.url} returned {count} for {len(prompts)} images, not one number or null "
                "each; is it an `opd-bench serve-reward` server of the same version?"
            )
        return {"scores": scores_from_json(scores), "details": reply.get("details") or {}}

    def _request(self, path: str, body: bytes | None) -> dict[str, Any]:
        """One HTTP exchange with retries; returns the decoded JSON reply."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST", headers=headers)
        failure = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _server_message(error)
                if error.code < 500:
                    raise RemoteRewardError(f"reward server at {self.url} refused the request (HTTP {error.code}): {message}") from None
                failure = f"failed {self.retries} tries (HTTP {error.code}: {message})"
            except _TRANSIENT_ERRORS as error:
                failure = self._transport_failure(error)
                if isinstance(getattr(error, "reason", None) or error, TimeoutError):
                    break  # not sent again: the server may still be scoring it, and a second copy queues behind it
            except ValueError:  # not JSON, or not text at all
                raise RemoteRewardError(f"reward server at {self.url} sent a reply that is not JSON; is the url right?") from None
        raise RemoteRewardError(f"reward server at {self.url} {failure}")

    def _transport_failure(self, error: Exception) -> str:
        """Why no reply came, and what to do about it."""
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, TimeoutError):
            return (
                f"did not answer within {self.timeout:g} s (a request that timed out is not sent again); "
                "raise timeout=... or lower max_batch=... of the remote reward"
            )
        text = (str(reason) or type(reason).__name__).splitlines()[0]
        tries = f"{self.retries} {'try' if self.retries == 1 else 'tries'}"
        parsed = urllib.parse.urlsplit(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if isinstance(reason, ConnectionRefusedError):
            return f"is not reachable after {tries} ({text}); start it with `opd-bench serve-reward NAME --port {port}`"
        if isinstance(reason, socket.gaierror):
            return f"is not reachable after {tries} ({text}); the host name is not known: check the url"
        if isinstance(reason, ssl.SSLError):
            return f"is not reachable after {tries} ({text}); a reward server speaks plain HTTP: use http://"
        if isinstance(reason, http.client.BadStatusLine):
            return f"answered {tries} times with something that is not HTTP ({text}); is the url's port the reward server's?"
        return f"is not reachable after {tries} ({text}); check the url and that the server runs"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_body(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ValueError(f"remote reward metadata must be JSON-serialisable ({error}); pass plain dicts of str, numbers, lists") from None


def _server_message(error: urllib.error.HTTPError) -> str:
    """The server's one-line ``{"error": ...}`` text, or the HTTP reason when there is none."""
    try:
        return str(json.loads(error.read())["error"])
    except Exception:  # noqa: BLE001 - any unreadable body falls back to the reason phrase
        return str(error.reason)

