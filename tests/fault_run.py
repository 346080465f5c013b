"""Run one comparison on a test-only preset in this process, optionally SIGKILLing itself.

Used by tests/test_fault_injection.py:  python fault_run.py OUT [KILL_AT MODE]

The preset (``fault-test``) is the smoke preset made smaller still (2-step sampler in training, one
test prompt per benchmark), so that several killed runs fit in a test; it exists only here.
``KILL_AT = n``: the process kills itself with SIGKILL at its n-th write event, i.e. every atomic
file write (run.json, configs, checkpoint state, DONE, evaluations, grids, variance, results) and
every metrics line; MODE ``before``: the event's write does not happen, ``after``: it does and
nothing after it. SIGKILL gives the process no chance to clean up, as a crash or `kill -9` would.
On success it prints ``events N``, the number of write events of the run.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace

from opd_bench import harness, io, presets, training


def fault_preset() -> presets.RunPlan:
    smoke = presets.plan("smoke")
    small = dict(num_steps=2, eval_every=1, checkpoint_every=1)
    return replace(
        smoke,
        teacher=replace(smoke.teacher, **small),
        opd=replace(smoke.opd, **small),
        eval_limit=1, eval_images_per_prompt=1, train_eval_limit=1,
        variance_batches=(1, 2), variance_noise_levels=(0.7,), variance_repeats=2, variance_reference=(2, 0.7),
        sample_prompts_per_task=1,
    )


def main() -> None:
    out = sys.argv[1]
    kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    mode = sys.argv[3] if len(sys.argv) > 3 else "before"
    count = 0

    def counted(write):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            if count == kill_at and mode == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = write(*args, **kwargs)
            if count == kill_at and mode == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    # atomic_write_json and save_grid call io.atomic_write_bytes through the module, so this catches them too
    io.atomic_write_bytes = counted(io.atomic_write_bytes)
    training.MetricsLog.write = counted(training.MetricsLog.write)
    presets.PRESETS["fault-test"] = fault_preset
    harness.Harness(out, preset="fault-test", seeds=[0], method="opd", progress=False).run()
    print(f"events {count}")


if __name__ == "__main__":
    main()
