"""The GPU benchmarks' SD3.5-Medium-sized stand-in is drawn on the device it will run on (issue 11, item 5).

Built on the CPU first, its 2.2B random weights took longer than an H200 run's budget. On the meta
device nothing is allocated, so this checks in seconds that no parameter or buffer is created
anywhere else, which is what makes ``--device cuda`` draw them on the GPU.
"""

import pytest


def test_sd35m_stand_in_is_created_on_the_requested_device(benchmark_script):
    bench_rollout = benchmark_script("bench_rollout")

    pipe = bench_rollout.build("sd35m", "meta")

    devices = {
        name: {t.device.type for t in [*module.parameters(), *module.buffers()]}
        for name, module in pipe.components.items() if hasattr(module, "parameters")
    }
    assert sum(p.numel() for p in pipe.transformer.parameters()) == pytest.approx(2.24e9, rel=0.01)
    assert devices == {name: {"meta"} for name in devices}
