import json
import re

import pytest

from fake_results import ALL_METHODS, make_results, make_run
from opd_bench.report import SECTION_TITLES, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    from PIL import Image

    assert path.read_bytes().startswith(PNG_MAGIC), path
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    make_run(root / "run")
    return root / "run", build_report(root / "run", root / "out")


def test_full_report_writes_markdown_html_and_plots(full_report):
    run_dir, written = full_report
    md = written["report.md"].read_text()
    page = written["index.html"].read_text()
    for name in ("curves_geneval.png", "curves_ocr.png", "curves_pref_oracle.png", "gradient_variance.png",
                 "variance_ratio.png", "cascade_forgetting.png"):
        assert name in written, name
    for path in written.values():
        assert path.is_file() and path.parent == run_dir.parent / "out"
        if path.suffix == ".png":
            _check_png(path)
    for title in SECTION_TITLES.values():
        assert f"## {title}" in md
        assert f">{title}</h2>" in page
    assert "could not be built" not in md  # no section failed
    # The scores table lists every method, with the best of each column in bold and a starred student.
    results = json.loads((run_dir / "results.json").read_text())
    for method in ALL_METHODS:
        assert f"| {method} |" in md
        assert f"<td>{method}</td>" in page
    assert "| method | geneval | ocr | pref | pref_oracle | overall |" in md
    best = max(ALL_METHODS, key=lambda m: results["results"][m]["geneval"]["mean"])
    assert f"**{results['results'][best]['geneval']['mean']:.3f}" in md
    assert "★" in md and "<strong>" in page
    assert results["command"] in md and results["command"] in page
    assert "<details><summary>config" in page


def test_html_is_self_contained(full_report):
    _, written = full_report
    page = written["index.html"].read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == 6 + len(ALL_METHODS)  # plots + one sample grid per method


def test_partial_results_with_only_opd_still_build(tmp_path):
    results = make_results(methods=["opd"], seeds=[0])
    for key in ("variance", "cascade_stages", "gradient_variance", "per_tag", "environment", "config"):
        results.pop(key)
    make_run(tmp_path / "run", results)
    written = build_report(tmp_path / "run", tmp_path / "out")
    md = written["report.md"].read_text()
    for title in SECTION_TITLES.values():
        assert f"## {title}" in md
    assert "could not be built" not in md
    assert "No variance experiment" in md and "No cascade RL curves" in md and "No gradient-variance" in md
    assert "curves_geneval.png" in written and "cascade_forgetting.png" not in written
    assert 'src="http' not in written["index.html"].read_text()


def test_minimal_and_odd_results_never_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "schema_version": 1,
        "results": {"opd": {"geneval": {"mean": None, "std": None, "per_seed": []}}},
        "curves": {"opd": {"0": [{"step": 0}, {"step": "x"}]}},
        "samples": {"prompts": ["p"], "grids": {"opd": "../../etc/passwd", "cascade": "samples/missing.png"}},
        "variance": None,
    }))
    written = build_report(run, tmp_path / "out")
    md = written["report.md"].read_text()
    assert "n/a" in md and "not inside the run directory" in md and "is missing" in md
    assert set(written) == {"report.md", "index.html"}


def test_missing_results_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        build_report(tmp_path, tmp_path / "out")
