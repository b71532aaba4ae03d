"""Ingest speed: one synthetic PET/CT study sent by dcmtk storescu to the node and to two reference SCPs.

Receivers (all on loopback, all writing every instance to disk):

1. ``igtv-node serve`` (durable: each instance is flushed to the ack journal before it is
   acknowledged; spool file and index row follow, and are in place before the release is answered);
2. pynetdicom's bundled app, ``python -m pynetdicom storescp`` (no fsync);
3. dcmtk ``storescp`` (no fsync).

Each receiver is started fresh per run; the node is sent the study once it is idle (after
``/health``, its worker process still spends a second or two importing the processing function).
Prints seconds, instances/s and MB/s per receiver (median of ``--repeat`` runs) and the ratios,
and the disk's flush latency before and after (it varies several-fold on a shared virtual disk,
and the node's time with it); ``--json`` writes the numbers for ``run_all.py``.

Usage::

    PYTHONPATH=. python benchmarks/bench_ingest.py [--study DIR] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodeharness import NodeProcess, dcmtk, free_port, wait_port  # noqa: E402

DEFAULT_STUDY = Path(tempfile.gettempdir()) / "igtv-bench-study-seed3-ct1.5"


def ensure_study(folder: Path, seed: int = 3, ct_slice_mm: float = 1.5) -> list[Path]:
    """Files of a full-size synthetic study (CT at ``ct_slice_mm``, ~300 slices), generated once."""
    files = sorted(p for p in folder.rglob("*.dcm") if "truth" not in p.parts) if folder.is_dir() else []
    if files:
        return files
    from pipeline.synth.generate import SynthOptions, generate_study, write_study

    print(f"generating the benchmark study in {folder} ...", flush=True)
    write_study(generate_study(seed, SynthOptions(ct_slice_mm=ct_slice_mm)), folder)
    return sorted(p for p in folder.rglob("*.dcm") if "truth" not in p.parts)


def send(port: int, files: list[Path], aec: str) -> float:
    """dcmtk storescu, one association; return wall seconds (raises when anything is not acked)."""
    cmd = [dcmtk("storescu"), "-aet", "BENCHSCU", "-aec", aec, "-to", "30", "-ta", "30", "-td", "60",
           "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu to port {port} failed ({res.returncode}): {res.stderr[-800:]}")
    return elapsed


def flush_ms(folder: Path | None = None, n: int = 30) -> float:
    """Median milliseconds to write and fsync a 512 kB file (the floor of one durable acknowledgement)."""
    data = os.urandom(512 * 1024)
    times = []
    with tempfile.TemporaryDirectory(dir=folder) as d:
        for i in range(n):
            t = time.perf_counter()
            with open(Path(d) / f"f{i}", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[n // 2]


def raw_loopback(files: list[Path]) -> float:
    """Seconds to push the same bytes through a loopback TCP connection (no DICOM)."""
    payload = [p.read_bytes() for p in files]
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    total = sum(map(len, payload))

    def sink() -> None:
        conn, _ = srv.accept()
        got = 0
        while got < total:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        conn.sendall(b"k")
        conn.close()

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        for b in payload:
            c.sendall(b)
        c.recv(1)
    elapsed = time.perf_counter() - t0
    t.join(5)
    srv.close()
    return elapsed


class Receiver:
    """A receiver started per run in a fresh output folder."""

    name = ""
    aec = "ANY"

    def start(self, work: Path) -> int:  # returns the port
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError


class NodeReceiver(Receiver):
    name = "igtv-node (durable)"
    aec = "IGTV"

    def __init__(self, journal: bool = True) -> None:
        self.journal = journal
        if not journal:
            self.name = "igtv-node (durable, spool.journal = false)"

    def start(self, work: Path) -> int:
        self.node = NodeProcess(work, stable_age_s=3600, log_level="WARNING",
                                extra_spool_toml="" if self.journal else "journal = false").start()
        self.node.wait_idle()  # the worker process finishes its start-up imports first
        return self.node.port

    def stop(self) -> None:
        self.node.stop()

    def stored(self) -> int:
        return len(self.node.indexed_uids())


class SubprocessReceiver(Receiver):
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv

    def start(self, work: Path) -> int:
        self.out = work / "out"
        self.out.mkdir(parents=True)
        port = free_port()
        argv = [a.replace("{port}", str(port)).replace("{out}", str(self.out)) for a in self.argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
        wait_port(port)
        return port

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def stored(self) -> int:
        return sum(1 for p in self.out.rglob("*") if p.is_file())


def receivers(no_journal: bool = False) -> list[Receiver]:
    return [
        NodeReceiver(),
        *([NodeReceiver(journal=False)] if no_journal else []),
        SubprocessReceiver("pynetdicom storescp app",
                           [sys.executable, "-m", "pynetdicom", "storescp", "{port}", "-od", "{out}"]),
        SubprocessReceiver("dcmtk storescp", [dcmtk("storescp"), "-od", "{out}", "{port}"]),
    ]


def run(files: list[Path], repeat: int, only: list[str] | None = None, no_journal: bool = False) -> dict:
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    results: dict[str, dict] = {}
    flush_before = flush_ms()
    for rcv in receivers(no_journal):
        if only and not any(rcv.name.startswith(o) for o in only):
            continue
        times = []
        for i in range(repeat):
            work = Path(tempfile.mkdtemp(prefix="igtv-bench-ingest-"))
            try:
                port = rcv.start(work)
                try:
                    times.append(send(port, files, rcv.aec))
                    stored = rcv.stored()
                finally:
                    rcv.stop()
                if stored != len(files):
                    raise RuntimeError(f"{rcv.name}: stored {stored} of {len(files)} instances")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"  {rcv.name}: run {i + 1}: {times[-1]:.2f} s", flush=True)
        med = statistics.median(times)
        results[rcv.name] = {"seconds": med, "runs": times, "instances_per_s": len(files) / med,
                             "mb_per_s": total_mb / med}
    return {"instances": len(files), "megabytes": total_mb, "raw_loopback_s": raw_loopback(files),
            "flush_ms": [flush_before, flush_ms()], "receivers": results}


def table(res: dict) -> str:
    node = res["receivers"].get("igtv-node (durable)", {}).get("seconds", float("nan"))
    flush = res.get("flush_ms", [float("nan")] * 2)
    lines = [f"Study: {res['instances']} instances, {res['megabytes']:.1f} MB; raw loopback for the same bytes: "
             f"{res['raw_loopback_s']:.3f} s; disk write + fsync of 512 kB: {flush[0]:.1f} ms before, "
             f"{flush[1]:.1f} ms after.", "",
             "| receiver | seconds (median) | instances/s | MB/s | node speed-up vs this |", "|---|---|---|---|---|"]
    for name, r in res["receivers"].items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['instances_per_s']:.1f} | {r['mb_per_s']:.1f} | "
                     f"{r['seconds'] / node:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study folder (generated when empty)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default="", help="comma-separated receiver name prefixes (e.g. igtv,pynetdicom)")
    ap.add_argument("--limit", type=int, default=0, help="send only the first N files (quick experiments)")
    ap.add_argument("--no-journal", action="store_true",
                    help="also measure the node with spool.journal = false (two flushes per acknowledgement)")
    args = ap.parse_args(argv)
    files = ensure_study(args.study)
    if args.limit:
        files = files[: args.limit]
    only = [o for o in args.only.split(",") if o]
    res = run(files, args.repeat, only, args.no_journal)
    print()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
