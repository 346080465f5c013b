import json
import math
import subprocess
import sys

import pytest
import torch

from opd_bench import benchmarks, rewards
from opd_bench.benchmarks import BenchmarkSpec, PromptFileError, aggregate, read_prompts
from opd_bench.registry import Registry, UnknownNameError
from opd_bench.rewards import RewardOutput


def test_unknown_reward_lists_names_and_suggests():
    with pytest.raises(UnknownNameError) as error:
        rewards.get("toy/brightnes")
    message = str(error.value)
    assert "Did you mean 'toy/brightness'" in message and "per-task" in message
    with pytest.raises(UnknownNameError, match="Did you mean 'toy/brightness'"):  # case aside, the same name
        rewards.get("TOY/Brightness")


def test_registry_is_lazy_and_refuses_duplicates():
    registry = Registry("thing")
    registry.register("lazy", "opd_bench.module_that_does_not_exist:thing")
    assert registry.names() == ["lazy"]  # registering imported nothing
    with pytest.raises(ModuleNotFoundError):
        registry.resolve("lazy")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("lazy", "x:y")


def test_suites_benchmarks_and_rewards_list_without_torch():
    """`list benchmarks`, `list rewards` and a mistyped --suite answer before torch loads (1-2 s), as
    the registry promises."""
    code = (
        "import sys; from click.testing import CliRunner; from opd_bench.cli import main;"
        "import opd_bench.suites, opd_bench.suites.sd; opd_bench.suites.get('tiny').benchmark('ocr').prompts();"
        "assert CliRunner().invoke(main, ['list', 'benchmarks']).exit_code == 0;"
        "assert CliRunner().invoke(main, ['list', 'rewards']).exit_code == 0;"
        "r = CliRunner().invoke(main, ['eval', '--suite', 'tnyi', '--out', 'never']);"
        "assert r.exit_code == 2 and \"Did you mean 'tiny'\" in r.output, r.output;"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reward_output_shape_is_checked():
    assert RewardOutput([0.5, 1.0]).scores.dtype == torch.float32
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        RewardOutput(torch.zeros(2, 2))


def test_rewards_share_one_signature():
    images = torch.zeros(3, 3, 8, 8)
    images[0] = 1.0
    images[1, 0] = 1.0
    prompts, metadata = ["a", "b", "c"], [{}, {}, {}]
    bright = rewards.get("toy/brightness")(images, prompts, metadata)
    red = rewards.get("toy/color", target=(1, 0, 0))(images, prompts, metadata)
    torch.testing.assert_close(bright.scores, torch.tensor([1.0, 1 / 3, 0.0]))
    assert red.scores.argmax() == 1 and red.scores.shape == (3,)
    with pytest.raises(ValueError, match="one prompt and one"):
        rewards.get("toy/brightness")(images, prompts[:2], metadata)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rewards.get("toy/brightness")(images[:, :1], prompts, metadata)


def test_per_task_reward_routes_and_marks_not_applicable_with_nan():
    reward = rewards.get("per-task", rewards={"a": "toy/brightness", "b": ("toy/color", {"target": (0, 0, 0)})})
    images = torch.full((3, 3, 4, 4), 0.25)
    out = reward(images, ["x", "y", "z"], [{"task": "a"}, {"task": "b"}, {"task": "c"}])
    assert out.scores[0] == pytest.approx(0.25)
    assert out.scores[1] == pytest.approx(0.75)
    assert math.isnan(out.scores[2])


def test_weighted_sum_reward():
    reward = rewards.get("weighted-sum", rewards={"b": "toy/brightness", "c": "toy/color"}, weights={"b": 2.0})
    out = reward(torch.ones(1, 3, 2, 2), ["x"], [{}])
    colour = rewards.get("toy/color")(torch.ones(1, 3, 2, 2), ["x"], [{}]).scores[0]
    assert out.scores[0] == pytest.approx(2.0 + colour)  # brightness 1 * 2; an unnamed weight is 1, as in reward_weights


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_errors_name_the_line(tmp_path):
    good = json.dumps({"prompt": "a red circle", "tag": "colors"})
    with pytest.raises(PromptFileError, match=r":2: not valid JSON"):
        read_prompts(_write(tmp_path / "a.jsonl", [good, "{oops"]))
    with pytest.raises(PromptFileError, match=r":1: missing field\(s\) \['prompt'\]"):
        read_prompts(_write(tmp_path / "b.jsonl", [json.dumps({"text": "x"})]))
    with pytest.raises(PromptFileError, match=":2: expected a JSON object"):
        read_prompts(_write(tmp_path / "c.jsonl", [good, "[1, 2]"]))
    with pytest.raises(PromptFileError, match="is a JSON array; a prompt file holds one JSON object per line"):
        read_prompts(_write(tmp_path / "array.json", ["[", good + ",", good, "]"]))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode())  # a byte-order mark, as some editors write
    assert read_prompts(bom)[0].text == "a red circle"
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    prompts = read_prompts(_write(tmp_path / "d.jsonl", [good, "", good]), task="geneval")
    assert len(prompts) == 2 and prompts[0].task == "geneval" and prompts[0].metadata["tag"] == "colors"
    # records the rewards would misread: routed to another task's reward, unhashable tags, a number for OCR text
    for record, problem in (({"prompt": "a", "task": "ocr"}, ":1: 'task' is 'ocr' in a geneval prompt file"),
                            ({"prompt": "a", "tag": ["colors"]}, ":1: 'tag' must be a string"),
                            ({"prompt": "a", "text": 12}, ":1: 'text' must be a string")):
        with pytest.raises(PromptFileError, match=problem):
            read_prompts(_write(tmp_path / "e.jsonl", [json.dumps(record)]), task="geneval")
    spec = BenchmarkSpec("geneval", "test-suite", "v1", str(_write(tmp_path / "f.jsonl", [
        json.dumps({"prompt": "a photo of red", "tag": "colors", "include": "red"})])), reward="toy/brightness", metric="geneval")
    with pytest.raises(PromptFileError, match="prompt 'a photo of red': "):  # GenEval's rules could not read it
        spec.prompts()


def test_benchmark_spec_registry_and_hash(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "hello"})])
    spec = BenchmarkSpec("echo", "test-suite", "v1", str(path), reward="toy/brightness", images_per_prompt=2)
    benchmarks.register(spec)
    assert benchmarks.get("test-suite/echo") is spec
    assert "test-suite/echo" in benchmarks.names("test-suite")
    assert len(spec.file_hash()) == 64 and spec.prompts()[0].task == "echo"
    assert spec.build_reward()(torch.ones(1, 3, 2, 2), ["x"], [{}]).scores[0] == 1
    with pytest.raises(UnknownNameError, match="Did you mean 'test-suite/echo'"):
        benchmarks.get("test-suite/ech")
    with pytest.raises(ValueError, match="metric"):
        BenchmarkSpec("x", "s", "v1", "f", reward="r", metric="median")


def test_geneval_metric_is_the_mean_of_tag_accuracies():
    scores = [1, 1, 1, 0, float("nan")]
    metadata = [{"tag": "colors"}, {"tag": "colors"}, {"tag": "counting"}, {"tag": "counting"}, {"tag": "x"}]
    result = aggregate("geneval", scores, metadata)
    assert result["per_tag"] == {"colors": 1.0, "counting": 0.5}
    assert result["score"] == pytest.approx(0.75) and result["count"] == 4
    assert aggregate("mean", scores, metadata)["score"] == pytest.approx(0.75)


def test_option_names_follow_options_passed_on_to_a_base_class():
    from opd_bench.registry import UnknownOptionError, check_options, option_names

    class Base:
        def __init__(self, size: int = 1, colour: str = "red"):
            pass

    class Child(Base):
        def __init__(self, strict: bool = True, **options):
            super().__init__(**options)

    class Plain:
        pass

    def forwards(**options):
        return options

    assert option_names(Child) == ["strict", "size", "colour"] and option_names(Plain) == [] and option_names(forwards) is None
    with pytest.raises(UnknownOptionError, match="'Child' has no option 'colur'. Did you mean 'colour'"):
        check_options("'Child'", Child, {"colur": "blue"})
    check_options("forwards", forwards, {"anything": 1})  # **options: the callee checks
