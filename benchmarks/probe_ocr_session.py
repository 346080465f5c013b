"""Do onnxruntime's session options make the OCR reward's text detector faster, without changing it?

    python benchmarks/probe_ocr_session.py [--reps 15]

Times RapidOCR's PP-OCRv6 detector on one 256 x 256 input (the size the OCR reward feeds it), one
thread, under the options RapidOCR sets (memory arena off) and two others (arena on; arena on and
thread spinning off), checks that their outputs are bit-identical, and prints where one run's time
goes by operator type (onnxruntime's profiler). One JSON line per setting, then one per operator.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort
import rapidocr

MODEL = os.path.join(os.path.dirname(rapidocr.__file__), "models", "PP-OCRv6_det_small.onnx")


def session(arena: bool, spinning: bool = True, profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as RapidOCR
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    settings = {"rapidocr (arena off)": session(False), "arena on": session(True), "arena on, no spinning": session(True, False)}
    reference = None
    for name, sess in settings.items():
        feed = {sess.get_inputs()[0].name: image}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            out = sess.run(None, feed)[0]
            times.append(time.perf_counter() - start)
        reference = out if reference is None else reference
        print(json.dumps({"setting": name, "ms_median": round(1e3 * statistics.median(times), 1),
                          "max_abs_diff_to_rapidocr": float(np.abs(out - reference).max())}))
    with tempfile.TemporaryDirectory() as folder:
        sess = session(False, profile_prefix=os.path.join(folder, "ort"))
        feed = {sess.get_inputs()[0].name: image}
        for _ in range(args.reps):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"].get("op_name")] += event["dur"]
    total = sum(per_op.values())
    for op, micros in per_op.most_common(6):
        print(json.dumps({"op": op, "ms_per_run": round(micros / args.reps / 1e3, 2), "share": round(micros / total, 3)}))


if __name__ == "__main__":
    main()
