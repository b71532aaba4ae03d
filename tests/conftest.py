"""Shared session fixtures: small synthetic PET/CT studies, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _synth_cache(tmp_path_factory):
    """Session cache of generated studies: key -> (SyntheticStudy, folder)."""
    from pipeline.synth.generate import SynthOptions, generate_study, write_study

    root = tmp_path_factory.mktemp("synth")
    cache: dict[tuple, tuple] = {}

    def get(seed: int, **options):
        options.setdefault("small", True)
        key = (seed, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in cache:
            study = generate_study(seed, SynthOptions(**options))
            folder = write_study(study, root / f"study-{len(cache):03d}-seed-{seed}")
            cache[key] = (study, folder)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def synthetic_study_factory(_synth_cache) -> Callable[..., Path]:
    """Callable ``(seed, **options) -> Path`` of a written study folder (cached per arguments).

    Options are :class:`pipeline.synth.generate.SynthOptions` fields; ``small`` defaults to True.
    Folder layout: ``CT/*.dcm``, ``PT/*.dcm``, ``truth/seg_gtv.dcm``, ``truth/seg_igtv.dcm``,
    ``truth/rtstruct_gtv.dcm``, ``truth/rtstruct_igtv.dcm``,
    ``truth/case.json``.
    """
    return lambda seed, **options: _synth_cache(seed, **options)[1]


@pytest.fixture(scope="session")
def synthetic_study_object_factory(_synth_cache) -> Callable:
    """Callable ``(seed, **options) -> SyntheticStudy`` (in memory; same cache as the folders)."""
    return lambda seed, **options: _synth_cache(seed, **options)[0]


@pytest.fixture(scope="session")
def small_study(synthetic_study_factory) -> Path:
    """Folder of a small breathing study (seed 7): CT/, PT/, truth/."""
    return synthetic_study_factory(7, motion="breathing")


@pytest.fixture(scope="session")
def small_static_study(synthetic_study_factory) -> Path:
    """Folder of a small static study (seed 7, same patient and tumour, GTV == IGTV)."""
    return synthetic_study_factory(7, motion="static")
