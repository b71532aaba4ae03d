"""``igtv-node replay``: the worker path on a folder, without a listener."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pacs_node.config import Destination, NodeConfig, validate_destinations
from pacs_node.export import ExportError, send_with_retries
from pacs_node.worker import run_study

log = logging.getLogger(__name__)


def dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursively) that carry the DICOM Part-10 signature."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            try:
                with open(path, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM":
                found.append(path)
    return found


def run_replay(study_dir: Path, out: Path, dest_specs: list[str], cfg: NodeConfig) -> int:
    """Process the study in ``study_dir`` into ``out`` and optionally send the results.

    Returns 0 on success, 2 on expected bad input (message on standard error, no
    traceback), 1 when processing succeeded but sending failed.
    """
    study_dir, out = Path(study_dir), Path(out)
    destinations = [Destination.parse(d) for d in dest_specs] if dest_specs else []
    validate_destinations(destinations)
    if not study_dir.is_dir():
        return _error(f"{study_dir} is not a folder")
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} exists and is not a folder")
    files = dicom_files(study_dir)
    print(f"{study_dir}: {len(files)} DICOM file(s)")
    if not files:
        return _error("no DICOM files found (files need the 'DICM' Part-10 signature)")
    result = run_study(cfg.worker.process_function, [str(p) for p in files], str(out), cfg.processing)
    if not result["ok"]:
        print(f"error: {result['reason']}", file=sys.stderr)
        if not result["expected"]:
            log.debug("%s", result.get("traceback", ""))
        return 2 if result["expected"] else 1
    for item in result["found"]:
        print(f"found:    {item}")
    for desc, reason in result["skipped"]:
        print(f"skipped:  {desc}: {reason}")
    for path in result["outputs"]:
        print(f"produced: {path}")
    code = 0
    calling_ae = cfg.export.calling_ae_title or cfg.listener.ae_title
    files_out = [Path(p) for p in result["dicom_outputs"]]
    for dest in destinations:
        try:
            sent = send_with_retries(dest, files_out, cfg.export, calling_ae)
        except ExportError as exc:
            print(f"not sent: {dest.name}: {exc}")
            code = 1
            continue
        print(f"sent:     {len(sent)} object(s) to {dest.name} ({', '.join(sent)})")
    return code


def _error(message: str) -> int:
    """Print an expected error on standard error; the exit code of bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2
