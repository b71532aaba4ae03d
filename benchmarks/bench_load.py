"""Load: N concurrent dcmtk storescu associations, each sending a different study, to one ``serve``.

Checks that every instance is stored and every job is done, measures C-ECHO latency from a
separate thread all the while (must stay under 1 s: inference must not starve the listener),
and reports the node's peak RSS (listener process plus worker processes).

Usage::

    PYTHONPATH=. python benchmarks/bench_load.py [--studies 16] [--ct 40] [--pet 20] [--rows 256]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodeharness import NODE_TESTS, NodeProcess, dcmtk, peak_rss_mb, wait_for  # noqa: E402


def _echo_loop(port: int, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    from pacs_node.export import EchoError, echo_peer

    while not stop.is_set():
        try:
            latencies.append(echo_peer(f"IGTV@127.0.0.1:{port}", calling_ae="ECHOSCU", timeout=10) / 1000.0)
        except EchoError as exc:
            errors.append(str(exc))
        stop.wait(0.2)


def run_load(work: Path, studies: int, n_ct: int, n_pet: int, rows: int, process_delay_s: float = 1.0) -> dict:
    """Run the load scenario in ``work``; return counts, echo latencies, peak RSS and durations."""
    if str(NODE_TESTS) not in sys.path:
        sys.path.insert(0, str(NODE_TESTS))
    from nodetest_helpers import make_study

    made = [make_study(work / f"study{i:02d}", n_ct=n_ct, n_pet=n_pet, rows=rows) for i in range(studies)]
    node = NodeProcess(work / "node", stable_age_s=1.0, process_delay_s=process_delay_s, log_level="WARNING")
    node.start()
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    echo = threading.Thread(target=_echo_loop, args=(node.port, stop, latencies, errors), daemon=True)
    echo.start()
    try:
        t0 = time.monotonic()

        def send(study) -> int:
            cmd = [dcmtk("storescu"), "-aet", "LOADSCU", "-aec", "IGTV", "-to", "30", "-ta", "30", "-td", "60",
                   "127.0.0.1", str(node.port), *map(str, study.files)]
            return subprocess.run(cmd, capture_output=True, timeout=600).returncode

        with ThreadPoolExecutor(studies) as pool:
            codes = list(pool.map(send, made))
        sent_s = time.monotonic() - t0
        expected = {s.study_uid: len(s.files) for s in made}

        def all_done() -> bool:
            return all((j := node.jobs(uid)) and j[-1]["state"] in ("done", "failed") for uid in expected)

        wait_for(all_done, 60 + 10 * studies * max(process_delay_s, 1.0), "all jobs", 0.5)
        total_s = time.monotonic() - t0
        rss = peak_rss_mb(node.proc.pid) if node.proc else 0.0
        stored = {uid: len(node.query("SELECT 1 FROM instances WHERE study_uid=?", (uid,))) for uid in expected}
        done = sum(node.jobs(uid)[-1]["state"] == "done" for uid in expected)
    finally:
        stop.set()
        echo.join(15)
        node.stop()
    return {
        "studies": studies, "instances": sum(expected.values()), "storescu_failures": sum(c != 0 for c in codes),
        "stored": sum(stored.values()), "missing": {u: expected[u] - n for u, n in stored.items() if n != expected[u]},
        "jobs_done": done, "send_s": sent_s, "total_s": total_s, "echo_count": len(latencies),
        "echo_max_s": max(latencies) if latencies else float("nan"),
        "echo_median_s": sorted(latencies)[len(latencies) // 2] if latencies else float("nan"),
        "echo_errors": errors, "peak_rss_mb": rss,
    }


def table(r: dict) -> str:
    return "\n".join([
        "| studies | instances | stored | jobs done | send s | all done s | C-ECHO n | echo median ms | echo max ms "
        "| echo errors | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['studies']} | {r['instances']} | {r['stored']} | {r['jobs_done']} | {r['send_s']:.1f} | "
        f"{r['total_s']:.1f} | {r['echo_count']} | {r['echo_median_s'] * 1000:.0f} | {r['echo_max_s'] * 1000:.0f} | "
        f"{len(r['echo_errors'])} | {r['peak_rss_mb']:.0f} |",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=16)
    ap.add_argument("--ct", type=int, default=40)
    ap.add_argument("--pet", type=int, default=20)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--delay", type=float, default=1.0, help="fake inference seconds per study")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="igtv-load-"))
    try:
        r = run_load(work, args.studies, args.ct, args.pet, args.rows, args.delay)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(r))
    ok = (r["stored"] == r["instances"] and r["jobs_done"] == r["studies"] and not r["echo_errors"]
          and r["echo_max_s"] < 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
