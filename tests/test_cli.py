import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from click.testing import CliRunner

from opd_bench.cli import main


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from click.testing import CliRunner; from opd_bench.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_rewards():
    result = CliRunner().invoke(main, ["list", "rewards"])
    assert result.exit_code == 0 and "toy/brightness" in result.output


def test_sample_writes_a_grid_and_refuses_to_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(tiny_dir), "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    from PIL import Image

    assert Image.open(out).size == (128, 64)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 1 and "pass --force" in second.output
    in_bf16 = CliRunner().invoke(main, [*args, "--dtype", "bfloat16", "--force"])
    assert in_bf16.exit_code == 0, in_bf16.output
    wrong = CliRunner().invoke(main, [*args, "--dtype", "float16", "--force"])
    assert wrong.exit_code == 2 and "'float16' is not one of 'auto', 'float32', 'bfloat16'" in wrong.output
    smaller = CliRunner().invoke(main, [*args, "--resolution", "32", "--force"])
    assert smaller.exit_code == 0, smaller.output
    assert Image.open(out).size == (64, 32)
    odd = CliRunner().invoke(main, [*args, "--resolution", "33", "--force"])
    assert odd.exit_code == 1 and odd.output.strip().count("\n") == 0 and "must be multiples of" in odd.output, odd.output
    # the tiny stand-in's position embedding covers 64 px: a larger side is named, with the setting to change
    large = CliRunner().invoke(main, [*args, "--resolution", "128", "--force"])
    assert large.exit_code == 1 and large.output.strip().count("\n") == 0, large.output
    assert "128x128 px is larger than this pipeline's transformer draws (at most 64 px per side); ask for at most 64" in large.output


def test_bad_model_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output


def test_build_tiny_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["build-tiny", str(tmp_path)])
    assert result.exit_code == 1 and "--force" in result.output


def test_list_benchmarks_shows_the_suites_benchmarks():
    result = CliRunner().invoke(main, ["list", "benchmarks"])
    assert result.exit_code == 0 and "tiny/geneval" in result.output and "tiny/ocr" in result.output
    assert "sd/geneval" in result.output


def _run_seeds(monkeypatch, args):
    """The seeds `opd-bench run ARGS` would train, without training."""
    seen = {}

    class FakeHarness:
        def __init__(self, out, **kwargs):
            seen.update(kwargs)

        def run(self):
            return None  # as a non-zero rank: nothing to print

    monkeypatch.setattr("opd_bench.harness.Harness", FakeHarness)
    result = CliRunner().invoke(main, ["run", *args])
    return result, seen.get("seeds")


def test_smoke_runs_one_seed_by_default_and_standard_three(monkeypatch, tmp_path):
    assert _run_seeds(monkeypatch, ["--preset", "smoke", "--out", str(tmp_path / "a")])[1] == [0]
    assert _run_seeds(monkeypatch, ["--out", str(tmp_path / "b")])[1] == [0, 1, 2]
    assert _run_seeds(monkeypatch, ["--preset", "smoke", "--seeds", "3,4", "--out", str(tmp_path / "c")])[1] == [3, 4]


def test_a_run_in_the_working_directory_writes_its_report_under_its_folder_name(monkeypatch, tmp_path):
    """`--out .` has an empty name: the report goes to reports/<the folder's name>, as `opd-bench
    report .` writes it, not into reports/ itself."""
    from fake_results import make_results

    class FakeHarness:
        results_unchanged = False

        def __init__(self, out, **kwargs):
            pass

        def run(self, **kwargs):
            return make_results()

    written = []
    monkeypatch.setattr("opd_bench.harness.Harness", FakeHarness)
    monkeypatch.setattr("opd_bench.report.build_report", lambda run_dir, target: written.append(target))
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", "."])
    assert result.exit_code == 0, result.output
    assert written == [Path("reports") / "my-run"] and "report: reports/my-run/index.html" in result.output


def test_repeated_or_bad_seeds_are_one_line_errors(monkeypatch, tmp_path):
    for seeds, message in (("0,0", "seed 0 is given twice"), ("1,2,1", "seed 1 is given twice"),
                           (",", "no seed is given"), ("0,x", "not a comma-separated list of integers"),
                           ("0,-1", "seed -1 is negative; seeds are integers >= 0"),
                           ("0,,1", "has an empty item"), ("0,", "has an empty item")):
        result, trained = _run_seeds(monkeypatch, ["--seeds", seeds, "--out", str(tmp_path / "r")])
        assert result.exit_code == 1 and trained is None, result.output
        assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_pretrain_base_set_names_an_unknown_field_and_the_known_ones(tmp_path):
    result = CliRunner().invoke(main, ["pretrain", "base", "--out", str(tmp_path / "m"), "--set", "latent_chanels=4"])
    assert result.exit_code != 0
    assert "no field 'latent_chanels'" in result.output and "latent_channels" in result.output
    assert not (tmp_path / "m").exists()
    for pair, option in (("device=cuda", "--device"), ("seed=3", "--seed")):  # the option's own check, not skipped
        result = CliRunner().invoke(main, ["pretrain", "base", "--out", str(tmp_path / "m"), "--set", pair])
        assert result.exit_code == 2 and f"--set {pair.split('=')[0]}: use {option} instead" in result.output
    assert not (tmp_path / "m").exists()


def test_pretrain_set_parses_json_values_into_the_fields_types():
    from opd_bench.presets import OverrideError, set_fields
    from opd_bench.tiny.pretrain import PretrainConfig

    got = set_fields(PretrainConfig(), ["vae_channels=[8,32]", "vae_kl=1e-3", "char_tokens=false", "device=cuda"])
    assert (got.vae_channels, got.vae_kl, got.char_tokens, got.device) == (type(PretrainConfig().vae_channels)([8, 32]), 1e-3, False, "cuda")
    with pytest.raises(OverrideError, match="takes an integer"):
        set_fields(PretrainConfig(), ["latent_channels=4.5"])


def test_eval_loads_the_model_in_the_asked_precision_and_records_it(tiny_dir, tmp_path):
    args = ["eval", "--model", str(tiny_dir), "--benchmarks", "pref", "--limit", "2", "--images-per-prompt", "1"]
    for dtype, expected in (("auto", "float32"), ("bfloat16", "bfloat16")):
        result = CliRunner().invoke(main, [*args, "--dtype", dtype, "--out", str(tmp_path / dtype)])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / dtype / "results.json").read_text())["dtype"] == expected
    per_image = [json.loads((tmp_path / d / "results.json").read_text())["per_image"]["pref"] for d in ("auto", "bfloat16")]
    assert per_image[0] != per_image[1]  # the images themselves differ with the precision


def _kill_evaluations_at_ocr(monkeypatch, times: int = 1) -> list[str]:
    """Make `opd-bench eval` die in its ocr benchmark (as a killed process would) the first
    ``times`` times it gets there; returns the benchmarks started, in order."""
    import opd_bench.evaluate as evaluate

    real, calls = evaluate.evaluate_benchmark, []

    def killed_at_ocr(spec, *a, **k):
        calls.append(spec.name)
        if spec.name == "ocr" and calls.count("ocr") <= times:
            raise KeyboardInterrupt  # the process dies during the second benchmark
        return real(spec, *a, **k)

    monkeypatch.setattr(evaluate, "evaluate_benchmark", killed_at_ocr)
    return calls


def test_a_killed_evaluation_resumes_from_its_finished_benchmarks(tmp_path, monkeypatch):
    """`opd-bench eval` saves each benchmark as it ends; a rerun with the same settings reuses them
    (and scores what is missing), one with other settings is refused, --force starts over."""
    args = ["eval", "--model", "renderer", "--benchmarks", "geneval,ocr", "--limit", "2", "--images-per-prompt", "1"]
    whole = CliRunner().invoke(main, args + ["--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert not (tmp_path / "whole" / "parts").exists()  # joined into results.json, then removed

    calls = _kill_evaluations_at_ocr(monkeypatch)
    out = tmp_path / "resumed"
    CliRunner().invoke(main, args + ["--out", str(out)])
    assert not (out / "results.json").exists() and (out / "parts" / "geneval.json").is_file()
    other = CliRunner().invoke(main, args + ["--seed", "1", "--out", str(out)])
    assert other.exit_code != 0 and "unfinished evaluation with other settings" in other.output
    saved = (out / "parts" / "geneval.json").read_text()
    for damaged in ("[]", '{"depends_on": {}}'):  # JSON, but no finished benchmark's record
        (out / "parts" / "geneval.json").write_text(damaged)
        refused = CliRunner().invoke(main, args + ["--out", str(out)])
        assert refused.exit_code == 1 and "geneval.json is not a finished benchmark's record (depends_on and result); " \
            "delete it to evaluate that benchmark again" in refused.output, refused.output
    (out / "parts" / "geneval.json").write_text(saved)
    resumed = CliRunner().invoke(main, args + ["--out", str(out)])
    assert resumed.exit_code == 0 and "resuming: geneval already evaluated" in resumed.output, resumed.output
    assert calls == ["geneval", "ocr", "ocr"]  # geneval was not drawn again
    record, reference = (json.loads((folder / "results.json").read_text()) for folder in (out, tmp_path / "whole"))
    assert record["per_image"] == reference["per_image"] and record["scores"] == reference["scores"]
    assert not (out / "parts").exists()


def test_an_evaluation_at_another_resolution_does_not_reuse_the_finished_benchmarks(tmp_path, monkeypatch):
    """The image side (the sd config's `resolution`) decides the scores as the seed does: a rerun at
    another one is refused, not joined with benchmarks drawn at the old one."""
    from opd_bench.suites import Suite

    _kill_evaluations_at_ocr(monkeypatch, times=10**6)
    out = tmp_path / "e"
    args = ["eval", "--model", "renderer", "--benchmarks", "geneval,ocr", "--limit", "1", "--images-per-prompt", "1",
            "--out", str(out)]
    CliRunner().invoke(main, args)
    # at the suite's own side nothing is recorded, so parts saved before the key existed still resume
    assert "resolution" not in json.loads((out / "parts" / "geneval.json").read_text())["depends_on"]
    monkeypatch.setattr(Suite, "image_side", lambda self: 32)  # as an sd config's "resolution": 32 would
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "unfinished evaluation with other settings (resolution" in refused.output, refused.output


# ------------------------------------------------------------------ bad input: one line, nothing lost
def test_a_device_this_machine_lacks_is_one_line_error_before_anything_loads(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("gpu", "'gpu' is not a device"), ("cuda", "no usable CUDA GPU")):
        for command in (["sample", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "s.png")],
                        ["eval", "--out", str(tmp_path / "e")], ["run", "--preset", "smoke", "--out", str(tmp_path / "r")]):
            result = CliRunner().invoke(main, [*command, "--device", device])
            assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_eval_refuses_zero_counts_and_bad_benchmarks_before_loading_the_model(tmp_path):
    missing = str(tmp_path / "no-model")  # never loaded: the checks come first
    for option in ("--images-per-prompt", "--steps", "--batch-size"):
        result = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), "--model", missing, option, "0"])
        assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output, result.output
    typo = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), "--model", missing, "--benchmarks", "genevall"])
    assert typo.exit_code == 1 and "Did you mean 'geneval'?" in typo.output
    twice = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), "--model", missing, "--benchmarks", "ocr,ocr"])
    assert twice.exit_code == 1 and "'ocr' is given twice" in twice.output


def test_a_mistyped_model_alias_gets_a_did_you_mean():
    from opd_bench import suites

    with pytest.raises(FileNotFoundError, match="Did you mean 'tiny'"):
        suites.resolve_model("tinyy")
    assert suites.resolve_model("org/some-model") == "org/some-model"  # a hub id is left to the loader


def test_an_adapter_of_another_model_shape_is_one_line_error(policy, tmp_path):
    from opd_bench import suites
    from opd_bench.policy import ModelLoadError, Policy

    policy.add_adapter("other", rank=4, alpha=8)
    folder = policy.save_adapter("other", tmp_path / "adapter")
    shipped = Policy.from_pretrained(suites.resolve_model("tiny"))
    with pytest.raises(ModelLoadError, match="trained on a model of another shape"):
        shipped.load_adapter("other", folder)


def test_a_damaged_adapter_is_one_line_error_naming_it(policy, tmp_path):
    from opd_bench.policy import ModelLoadError

    policy.add_adapter("kept", rank=4, alpha=8)
    folder = policy.save_adapter("kept", tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ModelLoadError, match="adapter .* cannot be read .*damaged"):
        policy.load_adapter("cut", folder)
    result = CliRunner().invoke(main, ["sample", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "s.png"),
                                       "--adapter", str(folder)])
    assert result.exit_code == 1 and "cannot be read" in result.output and "Traceback" not in result.output


def test_drop_t5_on_a_model_without_t5_says_so(tiny_dir):
    from opd_bench.policy import ModelLoadError, Policy

    with pytest.raises(ModelLoadError, match="has no T5 text encoder"):
        Policy.from_pretrained(str(tiny_dir), drop_t5=True)


def test_build_tiny_force_replaces_only_a_pipeline(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    result = CliRunner().invoke(main, ["build-tiny", str(tmp_path), "--force"])
    assert result.exit_code == 1 and "holds no pipeline" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_sample_writes_the_format_its_name_asks_for(tiny_dir, tmp_path):
    args = ["sample", "--model", str(tiny_dir), "--prompt", "a red circle", "--steps", "1", "--images-per-prompt", "1"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "grid.jpg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    gif = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "grid.gif")])
    assert gif.exit_code == 2 and ".png, .jpg or .webp" in gif.output


def test_nan_guidance_and_a_misspelt_tracker_are_refused_before_anything_runs(tmp_path):
    nan = CliRunner().invoke(main, ["sample", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "s.png"), "--guidance", "nan"])
    assert nan.exit_code == 2 and "nan is not a finite number" in nan.output
    below = CliRunner().invoke(main, ["sample", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "s.png"), "--noise-level", "-1"])
    assert below.exit_code == 2 and "--noise-level" in below.output and "-1.0 is negative; give 0 or more" in below.output
    dry = CliRunner().invoke(main, ["run", "--preset", "smoke", "--dry-run", "--log-to", "tensorbord"])
    assert dry.exit_code == 1 and "Did you mean 'tensorboard'?" in dry.output


def test_the_recorded_command_is_the_one_typed_through_the_script_or_python_m():
    from opd_bench.cli import typed_command

    assert typed_command(["/venv/bin/opd-bench", "run", "--set", "opd.lr=[1, 2]"]) == "opd-bench run --set 'opd.lr=[1, 2]'"
    assert typed_command(["/repo/opd_bench/__main__.py", "run", "--model", "my model"]) == "opd-bench run --model 'my model'"
    assert typed_command(["/venv/bin/pytest", "-q"]) is None and typed_command([]) is None


def test_commands_after_a_run_name_an_unfinished_run_and_a_folder_without_one(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text(json.dumps({"preset": "smoke", "suite": "tiny", "model": "my base", "plan": {}}))
    for command in (["report"], ["verify"], ["submit", "--name", "x", "--root", str(tmp_path / "board")]):
        empty = CliRunner().invoke(main, [command[0], str(tmp_path / "empty"), *command[1:]])
        assert empty.exit_code == 1 and "holds no opd-bench run; pass the --out folder of an `opd-bench run`" in empty.output
        half = CliRunner().invoke(main, [command[0], str(tmp_path / "half"), *command[1:]])
        assert half.exit_code == 1 and "holds an unfinished run (no results.json yet); finish it first: " \
            f"`opd-bench run --suite tiny --model 'my base' --preset smoke --out {tmp_path / 'half'}`" in half.output, half.output
    assert not (tmp_path / "board").exists()


def test_a_rebuilt_local_model_folder_is_another_model(tiny_dir, tmp_path, monkeypatch):
    """A local folder's transformer weights are fingerprinted: work done on its old weights (a
    run's cells, an evaluation's finished benchmarks) is not reused after it is rebuilt in place."""
    import shutil

    from safetensors.torch import load_file, save_file

    from opd_bench import suites

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    before = suites.model_fingerprint(str(folder))
    assert before is not None and before == suites.model_fingerprint(str(tiny_dir))  # the same bytes: the same model
    assert suites.model_fingerprint("org/some-hub-model") is None
    _kill_evaluations_at_ocr(monkeypatch, times=10**6)
    args = ["eval", "--model", str(folder), "--benchmarks", "geneval,ocr", "--limit", "1", "--images-per-prompt", "1",
            "--out", str(tmp_path / "e")]
    CliRunner().invoke(main, args)
    assert json.loads((tmp_path / "e" / "parts" / "geneval.json").read_text())["depends_on"]["model_sha256"] == before
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, weights)  # rebuilt in place
    assert suites.model_fingerprint(str(folder)) not in (None, before)
    refused = CliRunner().invoke(main, args)  # geneval's scores were drawn by the old weights
    assert refused.exit_code == 1 and "unfinished evaluation with other settings (model_sha256" in refused.output, refused.output


def test_an_output_path_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    for command in (["eval", "--limit", "1", "--out"], ["pretrain", "pref", "--out"], ["build-tiny"],
                    ["sample", "--prompt", "a red circle", "--out"], ["run", "--preset", "smoke", "--out"]):
        target = tmp_path / "afile" / ("grid.png" if command[0] == "sample" else "sub")
        result = CliRunner().invoke(main, [*command, str(target)])
        assert result.exit_code == 2 and f"{tmp_path / 'afile'} is a file, not a folder; name a path under a folder" in result.output
    assert (tmp_path / "afile").read_text() == "x"


def test_a_file_system_error_is_one_line_naming_the_path():
    from opd_bench.cli import _friendly

    @_friendly
    def write():
        raise PermissionError(13, "Permission denied", "/data/run/results.json")

    with pytest.raises(click.ClickException) as error:
        write()
    assert error.value.message == ("Permission denied: /data/run/results.json; check that path (a file where a folder is "
                                   "needed, no permission, a full disk) and rerun")
