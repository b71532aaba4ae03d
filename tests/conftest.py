"""Shared session fixtures: small synthetic PET/CT studies, built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def synthetic_study_factory(tmp_path_factory) -> Callable[..., Path]:
    """Callable ``(seed, **options) -> Path`` of a written study folder (cached per arguments).

    Options are :class:`pipeline.synth.generate.SynthOptions` fields; ``small`` defaults to True.
    """
    from pipeline.synth.generate import SynthOptions, generate_study, write_study

    root = tmp_path_factory.mktemp("synth")
    cache: dict[tuple, Path] = {}

    def make(seed: int, **options) -> Path:
        options.setdefault("small", True)
        key = (seed, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in cache:
            folder = root / f"study-{len(cache):03d}-seed-{seed}"
            cache[key] = write_study(generate_study(seed, SynthOptions(**options)), folder)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def small_study(synthetic_study_factory) -> Path:
    """Folder of a small breathing study (seed 7): CT/, PT/, truth/."""
    return synthetic_study_factory(7, motion="breathing")


@pytest.fixture(scope="session")
def small_static_study(synthetic_study_factory) -> Path:
    """Folder of a small static study (seed 7, GTV == IGTV)."""
    return synthetic_study_factory(7, motion="static")
