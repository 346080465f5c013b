"""The miniature SD3 pipeline used by the embedded ``tiny`` suite and by the tests."""

from opd_bench.tiny.build import TinyConfig, build_pipeline, save_tiny

__all__ = ["TinyConfig", "build_pipeline", "save_tiny"]
