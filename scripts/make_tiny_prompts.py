#!/usr/bin/env python
"""Generate the tiny suite's prompt files (deterministic: the same seed gives the same bytes).

    python scripts/make_tiny_prompts.py --seed 0
    python scripts/make_tiny_prompts.py --seed 0 --out /tmp/prompts

Writes {geneval,ocr,pref}_{train,test}.jsonl into --out (default
opd_bench/suites/tiny/prompts/). See opd_bench/world/prompts.py for the formats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd_bench.world import prompts, spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=prompts.DEFAULT_DIR)
    args = parser.parse_args(argv)
    for path in prompts.write_all(args.out, seed=args.seed):
        n = sum(1 for _ in open(path, encoding="ascii"))
        print(f"{path}: {n} records")
    print(f"prompt set {spec.PROMPTS_VERSION}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
