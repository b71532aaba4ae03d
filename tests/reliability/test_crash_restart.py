"""kill -9 of a real ``igtv-node serve`` at four points; restart; nothing acknowledged is lost.

One trial per case (``benchmarks/crash_trials.py --trials N`` runs more).
"""

from __future__ import annotations

import random

import pytest
import relhelpers  # noqa: F401  (import paths)
from crash_trials import CASES, make_study, reference_uids, run_trial

pytestmark = [pytest.mark.slow, pytest.mark.peers]


@pytest.fixture(scope="module")
def crash_study(tmp_path_factory):
    """A tiny PET/CT study and the result UIDs of an uninterrupted run."""
    work = tmp_path_factory.mktemp("crash")
    study = make_study(work / "study", n_ct=16, n_pet=8)
    return study, reference_uids(study, work / "reference")


@pytest.mark.parametrize("case", CASES)
def test_kill9_and_restart_loses_nothing(case, crash_study, tmp_path):
    study, reference = crash_study
    assert len(reference) == 2
    res = run_trial(case, study, tmp_path / case, reference, random.Random(CASES.index(case)))
    assert not res.problems, res.problems
    assert res.acknowledged > 0 and res.stored == res.acknowledged and not res.lost
    assert res.job_done and res.same_uids
    assert not res.foreign_exports
