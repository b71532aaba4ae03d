"""Kill -9 the node at four points and restart it; check nothing acknowledged is lost.

Cases:

* ``association``: in the middle of a C-STORE association (after a random number of acks);
* ``before_job``: the study is received, the stable age has not passed, no job runs yet;
* ``inference``: while the worker process runs the (slow fake) processing;
* ``export``: while a slow destination is receiving the results.

After the kill the node is restarted, which replays its ack journal before it listens; then
the index and spool are checked (every instance the SCU saw acknowledged must be in both,
byte-exact; "from journal" counts those that were only in the journal at the kill), the
sender re-sends the whole study (as a PACS does after a failed association), and the job
must complete with the same result UIDs as an uninterrupted run; the destination must have
received only those UIDs.

Usage::

    PYTHONPATH=. python benchmarks/crash_trials.py --trials 10 [--cases association,export]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodeharness import NODE_TESTS, AckingScu, NodeProcess, RecordingScp, wait_for  # noqa: E402

CASES = ("association", "before_job", "inference", "export")


@dataclass
class TrialResult:
    """One trial's counts and problems."""

    case: str
    acknowledged: int = 0
    stored: int = 0
    from_journal: int = 0
    lost: list[str] = field(default_factory=list)
    job_done: bool = False
    same_uids: bool = False
    foreign_exports: list[str] = field(default_factory=list)
    resent: int = 0  # instances the sender sent again after a lost response (see AckingScu.send)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost and self.job_done and self.same_uids and not self.foreign_exports and not self.problems


def make_study(root: Path, n_ct: int = 24, n_pet: int = 12):
    """A tiny PET/CT study (the node tests' generator)."""
    if str(NODE_TESTS) not in sys.path:
        sys.path.insert(0, str(NODE_TESTS))
    from nodetest_helpers import make_study as _make

    return _make(root, n_ct=n_ct, n_pet=n_pet)


def _sha(path: Path) -> str:
    """Hash of the data set bytes after the file meta (the receiver writes its own meta)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return hashlib.sha256(fh.read()).hexdigest()


def reference_uids(study, work: Path) -> list[str]:
    """Result UIDs of an uninterrupted run."""
    dest = RecordingScp()
    node = NodeProcess(work, stable_age_s=0.3, destinations=[f"DEST={dest.spec}"])
    try:
        node.start()
        scu = AckingScu(node.port)
        scu.send(study.files)
        job = node.finished_job(study.study_uid)
        if job["state"] != "done":
            raise RuntimeError(f"reference run failed: {job['reason']}\n{node.log_tail()}")
        wait_for(lambda: node.query("SELECT 1 FROM exports WHERE state='done'"), 30, "reference export")
        import json

        return sorted(json.loads(job["result_uids"]))
    finally:
        node.stop()
        dest.stop()


def run_trial(case: str, study, work: Path, reference: list[str], rng: random.Random) -> TrialResult:
    """Run one crash trial of ``case`` in ``work`` (a fresh data dir)."""
    import json

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    t0 = time.monotonic()
    res = TrialResult(case)
    dest = RecordingScp(delay_s=1.5 if case == "export" else 0.0)
    node = NodeProcess(
        work,
        stable_age_s=4.0 if case == "before_job" else 0.3,
        process_delay_s=4.0 if case == "inference" else 0.0,
        destinations=[f"DEST={dest.spec}"],
    )
    originals = {}
    for p in study.files:
        from pydicom import dcmread

        originals[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = _sha(p)
    try:
        node.start()
        # 1. send, and kill at the case's point
        if case == "association":
            kill_after = rng.randint(1, len(study.files) - 2)
            jitter = rng.uniform(0.0, 0.03)
            killed = threading.Event()

            def on_ack(n: int) -> None:
                if n == kill_after:
                    def _kill() -> None:
                        time.sleep(jitter)
                        node.kill9()
                        killed.set()
                    threading.Thread(target=_kill, daemon=True).start()

            scu = AckingScu(node.port, on_ack=on_ack, timeout=5)
            acked = scu.send(study.files)
            killed.wait(30)
        else:
            scu = AckingScu(node.port)
            acked = scu.send(study.files, resend_unanswered=True)
            res.resent = scu.resent
            if len(acked) != len(study.files):
                res.problems.append(f"only {len(acked)}/{len(study.files)} acknowledged without a crash: {scu.error}")
            if case == "before_job":
                if node.jobs(study.study_uid):
                    res.problems.append("a job was queued before the stable age passed (case not exercised)")
            elif case == "inference":
                wait_for(lambda: any(j["state"] == "running" for j in node.jobs(study.study_uid)), 30, "job running")
                time.sleep(rng.uniform(0.3, 2.0))
            elif case == "export":
                wait_for(dest.first_store.is_set, 60, "the first result at the destination")
                time.sleep(rng.uniform(0.0, 0.5))
            node.kill9()
        res.acknowledged = len(acked)
        at_kill = node.indexed_uids() & set(node.spool_files())
        if case == "inference" and not any(j["state"] == "running" for j in node.jobs(study.study_uid)):
            res.problems.append("the job was not running at the kill (case not exercised)")
        if case == "export" and not node.query("SELECT 1 FROM exports WHERE state='pending'"):
            res.problems.append("no export was pending at the kill (case not exercised)")
        # 2. restart (the ack journal is replayed before the node listens); nothing acknowledged is lost
        dest.delay_s = 0.0
        node.process_delay_s = 0.0
        node.stable_age_s = 0.3
        node.start()
        indexed = node.indexed_uids()
        files = node.spool_files()
        for uid in acked:
            if uid not in indexed or uid not in files:
                res.lost.append(uid)
            elif _sha(files[uid]) != originals[uid]:
                res.problems.append(f"{uid}: spooled bytes differ from the sent file")
        res.stored = len([u for u in acked if u in indexed and u in files])
        res.from_journal = len([u for u in acked if u not in at_kill and u in indexed and u in files])
        # 3. the sender re-sends what it could not deliver
        if case == "association":
            scu2 = AckingScu(node.port)
            scu2.send(study.files)
            if len(scu2.acked) != len(study.files):
                res.problems.append(f"re-send after restart: {len(scu2.acked)}/{len(study.files)} acked ({scu2.error})")
        job = node.finished_job(study.study_uid)
        res.job_done = job["state"] == "done"
        if not res.job_done:
            res.problems.append(f"job {job['state']}: {job['reason']}")
        got = sorted(json.loads(job["result_uids"] or "[]"))
        res.same_uids = got == reference
        wait_for(lambda: dest.uids() >= set(reference), 30, "the results at the destination")
        res.foreign_exports = sorted(dest.uids() - set(reference))
        missing = set(originals) - node.indexed_uids()
        if missing:
            res.problems.append(f"{len(missing)} instance(s) not in the index after the re-send")
    except Exception as exc:  # report, keep going with the other trials
        res.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        node.stop()
        dest.stop()
    if not res.ok:  # the node's log (both runs) says what it was doing
        res.problems.append("node log:\n" + node.log_tail(25))
    res.seconds = time.monotonic() - t0
    return res


def table(results: list[TrialResult]) -> str:
    """Markdown table: one row per case."""
    lines = ["| case | trials | acknowledged | stored | from journal | lost | jobs completed | same result UIDs | "
             "foreign exports | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        rs = [r for r in results if r.case == case]
        if not rs:
            continue
        lines.append(
            f"| {case} | {len(rs)} | {sum(r.acknowledged for r in rs)} | {sum(r.stored for r in rs)} | "
            f"{sum(r.from_journal for r in rs)} | "
            f"{sum(len(r.lost) for r in rs)} | {sum(r.job_done for r in rs)} | {sum(r.same_uids for r in rs)} | "
            f"{sum(len(r.foreign_exports) for r in rs)} | {sum(not r.ok for r in rs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="igtv-crash-"))
    results: list[TrialResult] = []
    try:
        study = make_study(work / "study")
        reference = reference_uids(study, work / "reference")
        print(f"reference result UIDs: {reference}", flush=True)
        for i in range(args.trials):
            for case in cases:
                r = run_trial(case, study, work / f"{case}-{i:03d}", reference, rng)
                results.append(r)
                print(f"trial {i} {case}: acked {r.acknowledged}, stored {r.stored} ({r.from_journal} from the journal), "
                      f"lost {len(r.lost)}, " + (f"{r.resent} sent again after a lost response, " if r.resent else "") +
                      f"job {'done' if r.job_done else 'NOT done'}, {'ok' if r.ok else 'FAIL'} "
                      f"({r.seconds:.1f} s){'' if r.ok else ' ' + '; '.join(r.problems)}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
