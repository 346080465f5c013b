"""The reward server (opd_bench/serve.py) and its client, the "remote" reward, on loopback."""

import base64
import contextlib
import io
import json
import logging
import math
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest
import torch
from click.testing import CliRunner

from opd_bench import rewards
from opd_bench.cli import main
from opd_bench.rewards import RewardOutput
from opd_bench.rewards.remote import RemoteRewardError
from opd_bench.serve import TOKEN_ENV, RewardServer, make_reward_server, parse_options

FAST_RETRY = {"retries": 3, "backoff": 0.01, "timeout": 5.0}


@contextlib.contextmanager
def running(server: RewardServer):
    """Serve in a background thread; shut down and close the socket on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve(name, options=None, **limits):
    return running(make_reward_server(name, options, "127.0.0.1", 0, **limits))


def random_batch(size, seed=0, height=8, width=8):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, height, width, generator=generator)
    return images, [f"prompt {i}" for i in range(size)], [{"index": i} for i in range(size)]


def png_rounded(images):
    """What the server sees: images after the client's uint8 PNG round trip."""
    return (images.clamp(0, 1) * 255).round() / 255


def post_raw(url, body: bytes, headers=None):
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + "score", data=body, method="POST", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_remote_scores_equal_local_scores_after_png_round_trip():
    images, prompts, metadata = random_batch(5)
    with serve("toy/brightness") as server:
        remote = rewards.get("remote", url=server.url, **FAST_RETRY)
        got = remote(images, prompts, metadata)
    expected = rewards.get("toy/brightness")(png_rounded(images), prompts, metadata)
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.scores, expected.scores)


def test_reward_options_and_details_travel():
    images, prompts, metadata = random_batch(3, seed=1)
    options = {"target": [0.0, 1.0, 0.0]}
    with serve("toy/color", options) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
    expected = rewards.get("toy/color", **options)(png_rounded(images), prompts, metadata)
    assert torch.equal(got.scores, expected.scores)
    assert got.details["mean_rgb"] == expected.details["mean_rgb"]


def test_nan_survives_the_round_trip():
    # per-task gives NaN to samples of a task it has no reward for.
    options = {"rewards": {"a": "toy/brightness"}}
    images, prompts, _ = random_batch(3, seed=2)
    metadata = [{"task": "a"}, {"task": "b"}, {"task": "a"}]
    with serve("per-task", options) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
    assert math.isnan(got.scores[1]) and not math.isnan(got.scores[0]) and not math.isnan(got.scores[2])
    expected = rewards.get("per-task", **options)(png_rounded(images), prompts, metadata)
    assert torch.equal(got.scores[[0, 2]], expected.scores[[0, 2]])


def test_a_diverged_image_is_sent_as_its_png_and_scores_as_in_process():
    """A NaN pixel is black, as call_reward hands it to an in-process reward (it used to be left
    unsent and score NaN, which an evaluation's mean leaves out)."""
    from opd_bench.rewards.base import call_reward

    images, prompts, metadata = random_batch(3, seed=3)
    images[1, 0, 2, 2] = float("nan")
    with serve("toy/color", {"target": [1, 0, 0]}) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
    black = images.nan_to_num(0.0)
    local = call_reward(rewards.get("toy/color", target=[1, 0, 0]), "toy/color", png_rounded(black), prompts, metadata)
    assert torch.equal(got.scores, local.scores) and got.details["mean_rgb"] == local.details["mean_rgb"]


def test_the_client_checks_the_served_reward_before_sending_images():
    images, prompts, metadata = random_batch(2)
    with serve("toy/brightness") as server:
        assert rewards.get("remote", url=server.url, reward="toy/brightness", **FAST_RETRY)(images, prompts, metadata).scores.shape == (2,)
        wrong = rewards.get("remote", url=server.url, reward="toy/color", **FAST_RETRY)
        before = server.score_requests
        with pytest.raises(RemoteRewardError, match=r"serves the reward 'toy/brightness', not 'toy/color'; point url"):
            wrong(images, prompts, metadata)
        assert server.score_requests == before  # refused before any image was sent


def test_a_server_of_another_protocol_is_refused_before_images_are_sent(monkeypatch):
    monkeypatch.setattr("opd_bench.serve.PROTOCOL_VERSION", 99)  # what the server reports in /health
    with serve("toy/brightness") as server:
        with pytest.raises(RemoteRewardError, match=r"speaks protocol 99, this opd-bench 1; is it an `opd-bench serve-reward`"):
            rewards.get("remote", url=server.url, **FAST_RETRY)(*random_batch(2))
        assert server.score_requests == 0


def test_something_else_on_the_port_is_named_not_told_to_start_a_server():
    with socket.socket() as listener:  # answers every connection with an SSH banner
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def banner():
            for _ in range(3):
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    connection.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")

        thread = threading.Thread(target=banner, daemon=True)
        thread.start()
        with pytest.raises(RemoteRewardError) as error:
            rewards.get("remote", url=f"http://127.0.0.1:{port}/", **FAST_RETRY).health()
        thread.join(timeout=5)
    assert "something that is not HTTP" in str(error.value) and "serve-reward" not in str(error.value)


def test_http_servers_own_refusals_are_json_too():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with serve("toy/brightness") as server:
        with pytest.raises(urllib.error.HTTPError) as put:
            opener.open(urllib.request.Request(server.url + "score", data=b"{}", method="PUT"), timeout=5)
        assert put.value.code == 501 and "this server answers GET /health and POST /score" in json.loads(put.value.read())["error"]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
            reply = raw.recv(65536).decode()
        assert '{"error": "Bad request version' in reply and "this server answers" in reply  # was an HTML page
        with opener.open(server.url + "health?probe=1", timeout=5) as response:  # a query string is not another path
            assert json.loads(response.read())["status"] == "ok"


def test_health_reports_reward_options_and_protocol():
    with serve("toy/color", {"target": [0, 0, 1]}, max_batch=4) as server:
        health = rewards.get("remote", url=server.url, **FAST_RETRY).health()
    assert health["status"] == "ok" and health["reward"] == "toy/color" and health["protocol"] == 1
    assert health["options"] == {"target": [0, 0, 1]} and health["max_batch"] == 4


def test_large_request_is_split_into_chunks_in_order():
    images, prompts, metadata = random_batch(7, seed=3)
    with serve("toy/color", {"target": [1, 1, 0]}, max_batch=3) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
    expected = rewards.get("toy/color", target=[1, 1, 0])(png_rounded(images), prompts, metadata)
    assert torch.equal(got.scores, expected.scores)
    assert got.details["chunk_sizes"] == [3, 3, 1]
    assert len(got.details["mean_rgb"]) == 7  # per-sample details are concatenated in order


def test_client_side_max_batch_sends_several_requests():
    images, prompts, metadata = random_batch(5, seed=4)
    with serve("toy/brightness") as server:
        got = rewards.get("remote", url=server.url, max_batch=2, **FAST_RETRY)(images, prompts, metadata)
        assert server.score_requests == 3
    expected = rewards.get("toy/brightness")(png_rounded(images), prompts, metadata)
    assert torch.equal(got.scores, expected.scores)


def test_too_large_request_is_refused_clearly_and_server_stays_up():
    images, prompts, metadata = random_batch(4, seed=5, height=16, width=16)
    with serve("toy/brightness", max_request_bytes=2000) as server:
        remote = rewards.get("remote", url=server.url, **FAST_RETRY)
        # the client knows the server's limit from /health and does not send what it would refuse
        with pytest.raises(RemoteRewardError, match=r"is \d+ bytes, over the limit of the server .*\(2000 bytes\); lower max_batch"):
            remote(images, prompts, metadata)
        assert server.score_requests == 0
        assert remote(images[:1], prompts[:1], metadata[:1]).scores.shape == (1,)
        status, reply = post_raw(server.url, score_body([blank_png(16, 16)] * 40))  # any other client: 413
        assert status == 413 and "over the server's limit of 2000 bytes" in reply["error"]
        assert remote(images[:1], prompts[:1], metadata[:1]).scores.shape == (1,)  # and it still serves


def test_a_body_far_over_the_limit_is_answered_without_being_read():
    with serve("toy/brightness", max_request_bytes=2000) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 2147483648\r\n\r\n")  # 2 GiB declared, none sent
            reply = client.makefile("rb").read()  # before the fix: the server waited for 2 GiB (time-out here)
        assert reply.startswith(b"HTTP/1.0 413") and b"over the server's limit of 2000 bytes" in reply


def test_the_client_splits_a_batch_to_fit_the_servers_pixel_limit():
    images, prompts, metadata = random_batch(5, seed=4)  # 8x8 images: 64 pixels each
    with serve("toy/brightness", max_request_pixels=130) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
        assert server.score_requests == 3  # 2 + 2 + 1 images
    assert torch.equal(got.scores, rewards.get("toy/brightness")(png_rounded(images), prompts, metadata).scores)
    with serve("toy/brightness", max_image_pixels=63) as server:
        with pytest.raises(RemoteRewardError, match=r"images of 64 pixels are over the limit .*--max-image-pixels"):
            rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
        assert server.score_requests == 0
    with serve("toy/brightness", max_request_pixels=32) as server:  # not even one image per request fits
        with pytest.raises(RemoteRewardError, match=r"\(32 pixels per request\); restart it with a larger --max-request-pixels"):
            rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
        assert server.score_requests == 0


def test_clients_that_stall_mid_body_are_dropped_and_scoring_goes_on(monkeypatch):
    """Two clients that send their headers and then nothing held both request slots for as long as
    they liked (the socket timeout is per read), and every other request waited."""
    monkeypatch.setattr("opd_bench.serve.BODY_SECONDS", 0.5)
    with serve("toy/brightness") as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        try:
            for client in stalled:
                client.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n")
            deadline = time.monotonic() + 5
            while server.score_requests < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            got = rewards.get("remote", url=server.url, **FAST_RETRY)(*random_batch(2))
            assert got.scores.shape == (2,) and server.score_requests == 3
            assert all(client.recv(1) == b"" for client in stalled)  # dropped without a reply
        finally:
            for client in stalled:
                client.close()


def test_malformed_requests_get_400_with_a_clear_message():
    with serve("toy/brightness") as server:
        status, reply = post_raw(server.url, b"{not json")
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply = post_raw(server.url, json.dumps({"images": ["!!"], "prompts": ["x"]}).encode())
        assert status == 400 and "images[0] is not a base64 PNG" in reply["error"]
        status, reply = post_raw(server.url, json.dumps({"images": [], "prompts": ["x"]}).encode())
        assert status == 400 and "0 images, 1 prompts" in reply["error"]
        # JSON the parser refuses after reading (past Python's digit limit, nested past its recursion
        # limit) is the client's error, 400, not the reward's 500 (which the client would retry)
        for body in (b'{"images": [' + b"1" * 5000 + b"]}", b"[" * 100_000):
            status, reply = post_raw(server.url, body)
            assert status == 400 and "not valid JSON" in reply["error"]
        status, _ = post_raw(server.url, json.dumps({"images": [], "prompts": []}).encode())
        assert status == 200  # still serving after the bad requests


class FlakyReward:
    """Raises on its first call, then scores brightness: a server that fails once."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("model still warming up")
        return RewardOutput(images.mean(dim=(1, 2, 3)))


def test_client_retries_server_errors_then_succeeds():
    flaky = FlakyReward()
    images, prompts, metadata = random_batch(2, seed=6)
    with running(RewardServer(("127.0.0.1", 0), flaky, name="flaky")) as server:
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
        assert server.score_requests == 2 and got.scores.shape == (2,)


def test_reward_exception_becomes_500_naming_it():
    def broken(images, prompts, metadata):
        raise RuntimeError("weights missing\nsecond line")

    images, prompts, metadata = random_batch(1)
    with running(RewardServer(("127.0.0.1", 0), broken, name="broken")) as server:
        remote = rewards.get("remote", url=server.url, retries=2, backoff=0.01)
        with pytest.raises(RemoteRewardError, match=r"failed 2 tries \(HTTP 500: reward 'broken' raised RuntimeError: weights missing\)"):
            remote(images, prompts, metadata)


def test_client_fails_clearly_when_nothing_listens():
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = rewards.get("remote", url=f"http://127.0.0.1:{port}", **FAST_RETRY)
    with pytest.raises(RemoteRewardError) as error:
        remote(*random_batch(1))
    message = str(error.value)
    assert f"reward server at http://127.0.0.1:{port}/ is not reachable after 3 tries" in message
    assert f"opd-bench serve-reward NAME --port {port}" in message and "\n" not in message


def test_bad_client_and_server_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        rewards.get("remote", url="127.0.0.1:8700")
    with pytest.raises(ValueError, match="retries"):
        rewards.get("remote", url="http://127.0.0.1:8700", retries=0)
    with pytest.raises(ValueError, match="'toy/brightness' has no option 'nope'"):
        make_reward_server("toy/brightness", {"nope": 1}, port=0)
    with pytest.raises(ValueError, match="no option 'procesor_path'. Did you mean 'processor_path'"):
        rewards.get("pickscore", procesor_path="/w")
    with pytest.raises(ValueError, match="max_batch"):
        make_reward_server("toy/brightness", port=0, max_batch=0)
    with pytest.raises(ValueError, match="reward 'remote' needs the option 'url'"):
        rewards.get("remote")
    with pytest.raises(ValueError, match="timeout must be a number"):
        rewards.get("remote", url="http://127.0.0.1:8700", timeout="5")
    with pytest.raises(ValueError, match="port outside 0-65535"):
        rewards.get("remote", url="http://127.0.0.1:99999/")
    # a token a header cannot carry, named without showing it (a newline from a file is the usual slip)
    for make in (lambda: rewards.get("remote", url="http://127.0.0.1:8700", token="sekrit\n"),
                 lambda: make_reward_server("toy/brightness", port=0, token="sek rit")):
        with pytest.raises(ValueError, match="printable ASCII without spaces or line breaks") as error:
            make()
        assert "sek" not in str(error.value)


def test_option_parsing_reads_json_else_strings():
    assert parse_options(["target=[1,0,0]", "name=ocr", "weight=0.5", "flag=true"]) == {
        "target": [1, 0, 0], "name": "ocr", "weight": 0.5, "flag": True,
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_options(["target"])
    with pytest.raises(ValueError, match="given twice"):
        parse_options(["a=1", "a=2"])


def test_cli_reports_bad_input_in_one_line():
    result = CliRunner().invoke(main, ["serve-reward", "toy/brightnes", "--port", "0"])
    assert result.exit_code == 1 and "Did you mean 'toy/brightness'" in result.output
    assert result.output.strip().count("\n") == 0
    result = CliRunner().invoke(main, ["serve-reward", "toy/color", "--port", "0", "--option", "target"])
    assert result.exit_code == 1 and "not key=value" in result.output


def test_serve_module_imports_only_the_standard_library():
    code = (
        "import sys, opd_bench.serve;"
        "heavy = [m for m in ('torch', 'numpy', 'PIL', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slow_server_gives_a_timeout_message():
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(timeout=5)
        return RewardOutput(images.mean(dim=(1, 2, 3)))

    with running(RewardServer(("127.0.0.1", 0), slow, name="slow")) as server:
        remote = rewards.get("remote", url=server.url, timeout=0.2, retries=3)
        try:  # one try: a second copy would queue behind the first on a server that scores one at a time
            with pytest.raises(RemoteRewardError, match=r"did not answer within 0.2 s \(a request that timed out is not sent again\); raise timeout="):
                remote(*random_batch(1))
            assert server.score_requests == 1
        finally:
            release.set()


def test_at_most_two_request_bodies_are_read_however_many_clients_wait(monkeypatch):
    from opd_bench.serve import _RewardRequestHandler

    reads = []
    read_body = _RewardRequestHandler._read_body
    monkeypatch.setattr(_RewardRequestHandler, "_read_body", lambda self: reads.append(1) or read_body(self))
    entered, release = threading.Event(), threading.Event()

    def slow(images, prompts, metadata):
        entered.set()
        release.wait(timeout=10)
        return RewardOutput(images.mean(dim=(1, 2, 3)))

    with running(RewardServer(("127.0.0.1", 0), slow, name="slow")) as server:
        replies = []
        clients = [threading.Thread(target=lambda: replies.append(post_raw(server.url, score_body([blank_png(8, 8)]))))
                   for _ in range(4)]
        for client in clients:
            client.start()
        assert entered.wait(5)
        deadline = time.monotonic() + 5
        while server.score_requests < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert server.score_requests == 4 and len(reads) == 2  # one scored, one read ahead, two waiting unread
        release.set()
        for client in clients:
            client.join(timeout=10)
    assert len(reads) == 4 and [status for status, _ in replies] == [200] * 4


class _FakeServer(contextlib.AbstractContextManager):
    """Answers /health like a reward server and /score with a fixed body: a server of another version."""

    def __init__(self, score_body: bytes):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self._reply(json.dumps({"status": "ok", "reward": "x", "protocol": 1}).encode())

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self._reply(score_body)

            def _reply(self, body):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("body, refusal", [
    (b"\x80\x81 not text", "sent a reply that is not JSON"),
    (b'{"scores": ["abc"]}', "returned 1 scores for 1 images, not one number or null each"),
    (b'{"scores": [[1.0]]}', "returned 1 scores for 1 images, not one number or null each"),
    (b'{"scores": []}', "returned 0 scores for 1 images"),
])
def test_a_reply_that_is_not_scores_is_one_clear_error(body, refusal):
    with _FakeServer(body) as fake:
        with pytest.raises(RemoteRewardError, match=refusal):
            rewards.get("remote", url=fake.url, **FAST_RETRY)(*random_batch(1))


# --------------------------------------------------------------------------------------------
# Limits, token and dropped clients (issue 12).
# --------------------------------------------------------------------------------------------


def blank_png(width: int, height: int, colour_type: int = 2) -> bytes:
    """A valid all-black 8-bit PNG built row by row, so a huge one never exists in memory here."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {2: 3, 6: 4}[colour_type]
    row = bytes(1 + width * channels)  # filter byte 0, then zero pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def score_body(pngs, prompts=None) -> bytes:
    images = [base64.b64encode(png).decode("ascii") for png in pngs]
    return json.dumps({"images": images, "prompts": prompts or ["x"] * len(images)}).encode()


class CountingReward:
    """Brightness, counting its calls: a request refused before scoring leaves calls unchanged."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        return RewardOutput(images.mean(dim=(1, 2, 3)))


def test_decompression_bomb_is_refused_from_its_header_and_the_server_keeps_serving():
    from PIL import Image

    bomb = blank_png(9000, 9000)
    assert len(bomb) < 500_000  # the 0.34 MB request...
    assert Image.open(io.BytesIO(bomb)).size == (9000, 9000)  # ...is a real 81-megapixel PNG
    reward = CountingReward()
    with running(RewardServer(("127.0.0.1", 0), reward, name="counting")) as server:
        start = time.perf_counter()
        status, reply = post_raw(server.url, score_body([bomb]))
        elapsed = time.perf_counter() - start
        assert status == 413 and "images[0] is 9000x9000 = 81000000 pixels" in reply["error"]
        assert "\n" not in reply["error"] and "--max-image-pixels" in reply["error"]
        assert reward.calls == 0
        assert elapsed < 5.0  # decoding it alone takes seconds and GBs; the header takes microseconds
        # the same bomb behind a small first IHDR: Pillow decodes the last IHDR's size
        hidden = blank_png(8, 8)[:33] + bomb[8:]
        assert Image.open(io.BytesIO(hidden)).size == (9000, 9000)
        status, reply = post_raw(server.url, score_body([hidden]))
        assert status == 400 and "declares 8x8 in its header but holds a 9000x9000 image" in reply["error"]
        assert reward.calls == 0
        images, prompts, metadata = random_batch(2)
        got = rewards.get("remote", url=server.url, **FAST_RETRY)(images, prompts, metadata)
        assert got.scores.shape == (2,) and reward.calls == 1


def test_pixels_per_request_are_capped_and_bad_headers_refused():
    reward = CountingReward()
    with running(RewardServer(("127.0.0.1", 0), reward, name="counting", max_request_pixels=100)) as server:
        status, reply = post_raw(server.url, score_body([blank_png(8, 8)] * 2))
        assert status == 413 and "2 images, 128 pixels, is over the server's limit of 100 pixels per request" in reply["error"]
        status, reply = post_raw(server.url, score_body([blank_png(8, 8), blank_png(4, 4, colour_type=6)]))
        assert status == 400 and "images[1] is a PNG of bit depth 8 and colour type 6; send 8-bit RGB PNGs" in reply["error"]
        status, reply = post_raw(server.url, score_body([blank_png(8, 8), blank_png(4, 4)]))
        assert status == 400 and "different sizes" in reply["error"]
        assert reward.calls == 0
        status, reply = post_raw(server.url, score_body([blank_png(8, 8)]))
        assert status == 200 and reply["scores"] == [0.0] and reward.calls == 1
        assert rewards.get("remote", url=server.url, **FAST_RETRY).health()["max_request_pixels"] == 100


def test_a_server_with_a_token_refuses_requests_without_it(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    images, prompts, metadata = random_batch(2)
    reward = CountingReward()
    with running(RewardServer(("127.0.0.1", 0), reward, name="counting", token="s3cret")) as server:
        for token in (None, "wrong"):
            remote = rewards.get("remote", url=server.url, token=token, **FAST_RETRY)
            with pytest.raises(RemoteRewardError, match=r"HTTP 401.*needs its token.*OPD_REWARD_TOKEN") as error:
                remote(images, prompts, metadata)
            assert "s3cret" not in str(error.value)
            with pytest.raises(RemoteRewardError, match="HTTP 401"):
                remote.health()  # health shows the options (paths): token needed too
        status, reply = post_raw(server.url, score_body([blank_png(8, 8)]), {"Authorization": "Bearer wrong"})
        assert status == 401 and "a wrong token" in reply["error"]
        assert reward.calls == 0
        status, _ = post_raw(server.url, score_body([blank_png(8, 8)]), {"Authorization": "bearer s3cret"})
        assert status == 200 and reward.calls == 1  # HTTP's auth scheme is case-insensitive
        reward.calls = 0
        assert rewards.get("remote", url=server.url, token="s3cret", **FAST_RETRY)(images, prompts, metadata).scores.shape == (2,)
        monkeypatch.setenv(TOKEN_ENV, "s3cret")  # the client reads the environment variable too
        assert rewards.get("remote", url=server.url, **FAST_RETRY).health()["token"] is True
        assert reward.calls == 1


def test_cli_reads_the_token_from_the_environment(monkeypatch):
    seen = {}

    def fake_serve_reward(name, options, host, port, **settings):
        seen.update(settings)

    monkeypatch.setattr("opd_bench.serve.serve_reward", fake_serve_reward)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    result = CliRunner().invoke(main, ["serve-reward", "toy/brightness", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert seen["token"] == "from-env" and seen["max_image_pixels"] == 2048 * 2048


def test_each_dropped_client_costs_one_log_line(caplog):
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(timeout=5)
        return RewardOutput(images.mean(dim=(1, 2, 3)))

    def drop(payload: bytes):
        client = socket.create_connection(server_address)
        client.sendall(payload)
        # Linger 0: close sends a reset at once, so the server's write fails deterministically.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    def went_away():
        return [r for r in caplog.records if "went away" in r.getMessage()]

    body = score_body([blank_png(8, 8)])
    caplog.set_level(logging.INFO, logger="opd_bench.serve")
    with running(RewardServer(("127.0.0.1", 0), slow, name="slow")) as server:
        server_address = ("127.0.0.1", server.port)
        # 1: gone while the reward runs (the reply's write fails); 2: gone in the middle of its body.
        drop(b"POST /score HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.2)
        release.set()
        drop(b"POST /score HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        deadline = time.monotonic() + 5
        while len(went_away()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # a second line per client, if any, would arrive now
        assert rewards.get("remote", url=server.url, **FAST_RETRY).health()["status"] == "ok"
    lines = went_away()
    assert len(lines) == 2, [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"
