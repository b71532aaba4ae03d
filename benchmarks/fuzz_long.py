"""Long fuzz run of the ingest header parser, the pipeline reader and the STOW multipart parser.

The same properties as ``tests/reliability/test_fuzz.py`` with a large budget (hypothesis,
random seed each run unless ``--seed``). Exit status 1 and the falsifying example on failure.

Usage::

    PYTHONPATH=. python benchmarks/fuzz_long.py [--examples 20000] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))


def main(argv: list[str] | None = None) -> int:
    from fuzz_targets import (
        IngestTarget,
        check_multipart,
        check_reader,
        multipart_bodies,
        mutated_instances,
    )
    from hypothesis import HealthCheck, given, seed, settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    budget = settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
    target = IngestTarget()
    props = {
        "ingest": given(mutated_instances())(lambda blob: target.check(blob)),
        "reader": given(mutated_instances())(check_reader),
        "multipart": given(multipart_bodies())(lambda case: check_multipart(*case)),
    }
    failed = 0
    try:
        for name, prop in props.items():
            prop = budget(prop)
            if args.seed is not None:
                prop = seed(args.seed)(prop)
            t0 = time.monotonic()
            try:
                prop()
                print(f"{name}: {args.examples} examples ok ({time.monotonic() - t0:.0f} s)", flush=True)
            except Exception as exc:  # report and continue with the next target
                failed += 1
                print(f"{name}: FAILED after {time.monotonic() - t0:.0f} s: {type(exc).__name__}: {exc}", flush=True)
    finally:
        target.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
