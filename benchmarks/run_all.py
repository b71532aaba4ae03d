"""Run every reliability and performance benchmark once and write ``docs/benchmarks.md``.

Usage::

    PYTHONPATH=. python benchmarks/run_all.py [--crash-trials 10] [--ingest-repeat 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ingest  # noqa: E402
import bench_load  # noqa: E402
import bench_turnaround  # noqa: E402
import crash_trials  # noqa: E402

INGEST_NOTES = """Where the listener waited, and what changed (`pacs_node/dulguard.py`):

- dcmtk >= 3.6.2 leaves Nagle's algorithm on, so the last partial TCP segment of every C-STORE
  waits for the receiver's ACK, and Linux delays that ACK by up to 40 ms. With one message in
  flight per association this, not the disk, bounded ingest: 94 PET instances took 5.8 s before
  and 2.1 s after. The listener now re-arms `TCP_QUICKACK` after every read (and sets
  `TCP_NODELAY` for its own responses), reads PDUs with `recv_into` instead of pynetdicom's
  4 kB `recv` loop, and keeps the node's 256 kB maximum PDU (a 16 kB PDU, the pynetdicom and
  dcmtk default, added about 4 ms of protocol time per 512 x 512 CT instance in our runs).
- pynetdicom's 1 ms reactor sleeps (`DULServiceProvider._run_loop_delay`, the association
  reactor's `time.sleep(0.001)`) cost about 1-3 ms per instance; lowering the DUL delay to 0.1 ms
  made no measurable difference next to the disk, so it is left at the default.
- What remains is durability: each acknowledged instance costs a file `fsync`, a directory
  `fsync` after the rename, and a SQLite WAL commit (`synchronous=FULL`), about 10-16 ms on this
  shared virtual disk (see "Machine"): about 4-5 s of the node's time for this study. The
  pynetdicom app and dcmtk storescp do not fsync at all.
"""


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()
    import pydicom
    import pynetdicom

    fsync = bench_ingest.flush_ms()
    return (f"- CPU: {cpu}, {os.cpu_count()} cores (shared with other work while measuring)\n"
            f"- memory: {int(mem) / 1024 / 1024:.1f} GiB; python {platform.python_version()}, "
            f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
            f"{(dcmtk[0] if dcmtk else 'dcmtk ?').strip(' $').replace('$dcmtk: ', 'dcmtk ')}\n"
            f"- disk: write + fsync of a 512 kB file, median {fsync:.1f} ms (the floor of a durable ack)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crash-trials", type=int, default=10)
    ap.add_argument("--ingest-repeat", type=int, default=3)
    ap.add_argument("--study", type=Path, default=bench_ingest.DEFAULT_STUDY)
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    files = bench_ingest.ensure_study(args.study)
    sections: list[str] = []

    print("ingest ...", flush=True)
    ingest = bench_ingest.run(files, args.ingest_repeat)
    sections += ["## Ingest (dcmtk storescu, one association, loopback)", "",
                 f"`PYTHONPATH=. python benchmarks/bench_ingest.py --repeat {args.ingest_repeat}`", "",
                 bench_ingest.table(ingest), "", INGEST_NOTES]

    print("turnaround ...", flush=True)
    work = Path(tempfile.mkdtemp(prefix="igtv-runall-"))
    try:
        turn = bench_turnaround.run(files, 2.0, work / "turnaround")
        sections += ["## Turnaround (last ack -> SEG and RTSTRUCT acknowledged by the destination)", "",
                     "`PYTHONPATH=. python benchmarks/bench_turnaround.py --stable-age 2`", "",
                     bench_turnaround.table(turn), ""]

        print("load ...", flush=True)
        load = bench_load.run_load(work / "load", 16, 40, 20, 256, 1.0)
        sections += ["## Load (16 concurrent storescu associations, one study each, fake 1 s inference)", "",
                     "`PYTHONPATH=. python benchmarks/bench_load.py --studies 16 --ct 40 --pet 20 --rows 256`", "",
                     bench_load.table(load), ""]

        print("crash trials ...", flush=True)
        study = crash_trials.make_study(work / "crash-study")
        reference = crash_trials.reference_uids(study, work / "crash-ref")
        rng = random.Random(0)
        results = [crash_trials.run_trial(case, study, work / f"crash-{case}-{i}", reference, rng)
                   for i in range(args.crash_trials) for case in crash_trials.CASES]
        sections += ["## Crash and restart (kill -9 of the node's process group, then restart)", "",
                     f"`PYTHONPATH=. python benchmarks/crash_trials.py --trials {args.crash_trials}`", "",
                     crash_trials.table(results), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = ["# igtv-node benchmarks", "", f"Generated by `benchmarks/run_all.py` on {started}.", "",
            "## Machine", "", machine(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + sections) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
