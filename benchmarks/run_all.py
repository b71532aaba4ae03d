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
from nodeharness import dcmtk  # noqa: E402

INGEST_NOTES = """What the node does per instance, and what changed:

- One flush per acknowledgement (`pacs_node/journal.py`, `pacs_node/materialiser.py`). Each
  instance used to cost three flushes before its C-STORE response: the spool file's `fsync`,
  its folder's `fsync` after the rename, and a SQLite WAL commit (`synchronous=FULL`). On this
  shared virtual disk any flush costs the same, 1 ms when the host is quiet and 4 ms when it is
  busy (printed with each run), so the node's time followed the disk. Now the instance is
  appended to the ack journal (preallocated segments, reused; concurrent appends share a flush)
  and `fdatasync`ed, then acknowledged; a background thread writes the spool file and the index
  row moments later and flushes spool files once the burst is over; only then are the journal
  records freed. The release of an association is answered once spool and index hold
  everything acknowledged. The journal is replayed at startup after a crash; a new instance's
  index commit no longer fsyncs (WAL, `synchronous=NORMAL`) and startup reconciliation
  (`pacs_node/reconcile.py`) indexes any spool file the index lacks. `spool.journal = false`
  flushes the spool file and its folder before each acknowledgement instead (two flushes;
  `--no-journal` measures it).
- No idle waits in pynetdicom's DUL reactor (`pacs_node/dulwake.py`): it slept 1 ms between
  polls, so each C-STORE waited about 0.5 ms before it was read and its response 0.5 ms before
  it was sent. It now waits in `select` on the socket and on a socket pair written when a
  response is queued. The association reactor's own 1 ms poll (hard-coded in pynetdicom) is
  left: 0.6 ms per instance.
- Less CPU on the acknowledgement path: the File Meta Information is encoded directly
  (`pacs_node/part10.py`, byte-identical to pynetdicom's), not through pydicom datasets.
- Earlier: `TCP_QUICKACK` after every read (dcmtk leaves Nagle on, and Linux delayed each
  message's last segment by up to 40 ms), `TCP_NODELAY`, `recv_into`, 256 kB maximum PDU
  (`pacs_node/dulguard.py`). dcmtk storescu sends at most 128 kB PDUs: 4 data PDUs per CT slice.
- The node is sent the study once it is idle: after `/health` its worker process spends
  1-2 s of CPU importing the processing function, which the first measurement included.
- Where a CT instance's 6-7 ms go now (quiet machine, in-process timeline): storescu's turn and
  loopback 0.5 ms; reading 4 PDUs and reassembling the message in pynetdicom 1.2-1.5 ms; the
  association reactor's poll 0.6-0.7 ms; our handler 2.2-2.5 ms (header parse 0.8, journal
  write and `fdatasync` 1.0-1.3, checks and events 0.3); pynetdicom encoding and sending the
  response 1.2-1.8 ms (the background thread competes for the interpreter lock here). All but
  the flush is CPU in one Python process, so when other work loads the 2 cores the node slows
  more than pynetdicom's app, whose time is mostly sleeps.
"""


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    version = subprocess.run([dcmtk("storescu"), "--version"], capture_output=True, text=True).stdout.splitlines()
    import pydicom
    import pynetdicom

    fsync = bench_ingest.flush_ms()
    return (f"- CPU: {cpu}, {os.cpu_count()} cores (shared with other work while measuring)\n"
            f"- memory: {int(mem) / 1024 / 1024:.1f} GiB; python {platform.python_version()}, "
            f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
            f"{(version[0] if version else 'dcmtk ?').strip(' $').replace('$dcmtk: ', 'dcmtk ')}\n"
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
    ingest = bench_ingest.run(files, args.ingest_repeat, no_journal=True)
    sections += ["## Ingest (dcmtk storescu, one association, loopback)", "",
                 f"`PYTHONPATH=. python benchmarks/bench_ingest.py --repeat {args.ingest_repeat} --no-journal`", "",
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
