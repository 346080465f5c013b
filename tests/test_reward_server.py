"""The reward server (opd_bench/serve.py) and its client, the "remote" reward, on loopback."""

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch
from click.testing import CliRunner

from opd_bench import rewards
from opd_bench.cli import main
from opd_bench.rewards import RewardOutput
from opd_bench.rewards.remote import RemoteRewardError
from opd_bench.serve import RewardServer, make_reward_server, parse_options

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


def post_raw(url, body: bytes):
    request = urllib.request.Request(url + "score", data=body, method="POST", headers={"Content-Type": "application/json"})
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
        with pytest.raises(RemoteRewardError, match=r"HTTP 413.*over the server's limit of 2000 bytes"):
            remote(images, prompts, metadata)
        assert server.score_requests == 1  # a 4xx reply is not retried
        assert remote(images[:1], prompts[:1], metadata[:1]).scores.shape == (1,)


def test_malformed_requests_get_400_with_a_clear_message():
    with serve("toy/brightness") as server:
        status, reply = post_raw(server.url, b"{not json")
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply = post_raw(server.url, json.dumps({"images": ["!!"], "prompts": ["x"]}).encode())
        assert status == 400 and "images[0] is not a base64 PNG" in reply["error"]
        status, reply = post_raw(server.url, json.dumps({"images": [], "prompts": ["x"]}).encode())
        assert status == 400 and "0 images, 1 prompts" in reply["error"]
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
    with pytest.raises(ValueError, match="does not accept options"):
        make_reward_server("toy/brightness", {"nope": 1}, port=0)
    with pytest.raises(ValueError, match="max_batch"):
        make_reward_server("toy/brightness", port=0, max_batch=0)


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
        remote = rewards.get("remote", url=server.url, timeout=0.2, retries=1)
        try:
            with pytest.raises(RemoteRewardError, match=r"did not answer within 0.2 s in 1 tries; raise timeout="):
                remote(*random_batch(1))
        finally:
            release.set()
