"""External programs of the tests (dcmtk, dciodvfy, plastimatch, Orthanc) found on PATH.

pynetdicom installs apps named like dcmtk's (storescp, storescu, echoscu, findscu, ...)
into the virtual environment's ``bin``; with the environment activated they come first
on PATH and reject dcmtk's options. The tests want the system's programs, so the
environment's ``bin`` is left out of the search.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def system_tool(name: str) -> str | None:
    """Path of program ``name`` on PATH outside this Python environment's ``bin``, or None."""
    own_bin = Path(sys.prefix, "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != own_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))


def dcmtk(name: str) -> str:
    """dcmtk's program ``name`` (not pynetdicom's app of the same name).

    Raises
    ------
    FileNotFoundError
        dcmtk is not installed (``apt-get install dcmtk``; ``.ci/run`` does).
    """
    path = system_tool(name)
    if path is None:
        raise FileNotFoundError(f"dcmtk's {name} is not installed (apt-get install dcmtk; see .ci/run)")
    return path
