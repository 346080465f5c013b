"""A reward scored by a reward server (``opd-bench serve-reward``) in another process or machine.

``rewards.get("remote", url="http://127.0.0.1:8700/")`` has the signature of every other reward,
so trainers and evaluators cannot tell the difference. Images travel as 8-bit PNGs: the server
scores ``round(image * 255) / 255``, not the float image. Protocol: ``opd_bench/serve.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import torch

from opd_bench.rewards.base import RewardOutput, check_batch
from opd_bench.serve import TOKEN_ENV, chunk_ranges, encode_png_batch, merge_chunk_details, scores_from_json

# Failures worth another try: the server is starting, restarting, overloaded or the network hiccuped.
_TRANSIENT_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class RemoteRewardError(RuntimeError):
    """The reward server refused a request, failed, or could not be reached."""


class RemoteReward:
    """Score images with the reward server at ``url``.

    * ``timeout``: seconds to wait for one HTTP reply (a reward on a large batch may be slow).
    * ``retries``: how many times a request is tried in all, for connection errors, timeouts
      and 5xx replies; 4xx replies (a bad request) are never retried.
    * ``backoff``: seconds before the second try, doubled before each further try.
    * ``max_batch``: at most this many images per request (None: the whole batch in one);
      lower it when the server answers 413 (request too large).
    * ``token``: the server's shared token (``opd-bench serve-reward --token``), sent as
      ``Authorization: Bearer TOKEN``; None reads ``OPD_REWARD_TOKEN`` (unset: no token).

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
    ):
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote reward url must look like http://HOST:PORT/, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"remote reward timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(retries, int) or retries < 1:
            raise ValueError(f"remote reward retries is the number of tries in all and must be >= 1, got {retries!r}")
        if not backoff >= 0:
            raise ValueError(f"remote reward backoff must be >= 0 seconds, got {backoff!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"remote reward max_batch must be a positive integer or None, got {max_batch!r}")
        self.url = str(url).rstrip("/") + "/"
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_batch = max_batch
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._token = token or None  # kept out of repr and error messages
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        check_batch(images, prompts, metadata)
        total = images.shape[0]
        if total == 0:
            return RewardOutput(torch.empty(0))
        scores: list[float] = []
        chunks = []
        for part in chunk_ranges(total, self.max_batch or total):
            reply = self._score_request(images[part.start : part.stop], prompts[part.start : part.stop], metadata[part.start : part.stop])
            scores.extend(reply["scores"])
            chunks.append((len(part), reply["details"]))
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), merge_chunk_details(chunks))

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` reply: reward name, options, protocol version, limits."""
        return self._request("health", None)

    def _score_request(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, Any]:
        body = _json_body(
            {"images": encode_png_batch(images), "prompts": list(prompts), "metadata": list(metadata)}
        )
        reply = self._request("score", body)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            count = len(scores) if isinstance(scores, list) else "no"
            raise RemoteRewardError(
                f"reward server at {self.url} returned {count} scores for {len(prompts)} images; "
                "is it an `opd-bench serve-reward` server of the same version?"
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
            except json.JSONDecodeError:
                raise RemoteRewardError(f"reward server at {self.url} sent a reply that is not JSON; is the url right?") from None
        raise RemoteRewardError(f"reward server at {self.url} {failure}")

    def _transport_failure(self, error: Exception) -> str:
        """Why no reply came, and what to do about it."""
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, TimeoutError):
            return (
                f"did not answer within {self.timeout:g} s in {self.retries} tries; "
                "raise timeout=... or lower max_batch=... of the remote reward"
            )
        text = (str(reason) or type(reason).__name__).splitlines()[0]
        parsed = urllib.parse.urlsplit(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return (
            f"is not reachable after {self.retries} tries ({text}); "
            f"start it with `opd-bench serve-reward NAME --port {port}`"
        )


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

