"""Turnaround: last acknowledged instance -> SEG and RTSTRUCT acknowledged by the destination, by stage.

A full-size synthetic study is sent by dcmtk storescu to ``igtv-node serve`` (real pipeline; the
model is ``model.predict.Predictor`` when shipped, else a threshold stand-in, and the table says
which); a pynetdicom SCP in this process is the destination. The stable age is subtracted.

Usage::

    PYTHONPATH=. python benchmarks/bench_turnaround.py [--study DIR] [--stable-age 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import DEFAULT_STUDY, ensure_study, send  # noqa: E402
from nodeharness import NodeProcess, RecordingScp, peak_rss_mb, wait_for  # noqa: E402


def run(files: list[Path], stable_age: float, work: Path) -> dict:
    dest = RecordingScp()
    node = NodeProcess(work, stable_age_s=stable_age, destinations=[f"DEST={dest.spec}"],
                       process_function="nodeharness:pipeline_process", log_level="WARNING")
    try:
        node.start()
        time.sleep(3.0)  # let the worker process finish importing (it does so once, at start)
        send(node.port, files, "IGTV")
        t_ack = time.time()
        wait_for(lambda: {m for _, m, _ in dest.received} >= {"SEG", "RTSTRUCT"} or
                 any(j["state"] == "failed" for j in node.query("SELECT state FROM jobs")), 900,
                 "SEG and RTSTRUCT at the destination", 0.1)
        t_dest = max(t for _, _, t in dest.received) if dest.received else float("nan")
        (job,) = node.query("SELECT * FROM jobs ORDER BY id DESC LIMIT 1")
        if job["state"] == "failed":
            raise RuntimeError(f"job failed: {job['reason']}\n{node.log_tail()}")
        (export,) = node.query("SELECT * FROM exports WHERE job_id=?", (job["id"],))
        study = node.query("SELECT last_received FROM studies")[0]
        report = json.loads(job["report"] or "{}")
        rss = peak_rss_mb(node.proc.pid)
    finally:
        node.stop()
        dest.stop()
    processed_at = export["next_at"] if export["attempts"] <= 1 else export["updated"]
    stages = {
        "completion scan after stable age": job["created"] - study["last_received"] - stable_age,
        "queue -> worker start": job["started"] - job["created"],
        "worker (pipeline total)": processed_at - job["started"],
        "export to destination": t_dest - processed_at,
    }
    return {
        "model": _model_description(),
        "instances": len(files), "stable_age_s": stable_age,
        "turnaround_s": t_dest - t_ack - stable_age, "stages": stages,
        "pipeline_timings": report.get("timings") or report.get("timings_s") or {}, "peak_rss_mb": rss,
    }


def _model_description() -> str:
    from nodeharness import load_predictor

    from pipeline.settings import ProcessSettings

    return load_predictor(ProcessSettings())[1]


def table(r: dict) -> str:
    lines = [f"Model: {r['model']}; {r['instances']} instances; stable age {r['stable_age_s']:.0f} s (subtracted); "
             f"peak RSS {r['peak_rss_mb']:.0f} MB.", "",
             f"**Turnaround: {r['turnaround_s']:.1f} s** (goal <= 20 s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["stages"].items()]
    lines += [f"| &nbsp;&nbsp;pipeline: {k} | {float(v):.2f} |" for k, v in r["pipeline_timings"].items()
              if isinstance(v, (int, float))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    ap.add_argument("--stable-age", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    files = ensure_study(args.study)
    work = Path(tempfile.mkdtemp(prefix="igtv-turnaround-"))
    try:
        r = run(files, args.stable_age, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
