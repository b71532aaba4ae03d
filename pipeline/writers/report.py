"""The JSON report of one result: lesions, totals, model, timings and UIDs."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from pipeline.volume import SeriesVolume

SCHEMA = "igtv-node.report/1"
LESION_KEYS = (
    "volume_cc",
    "suv_max",
    "suv_mean",
    "si_extent_mm",
    "ap_extent_mm",
    "lr_extent_mm",
    "centroid_mm_lps",
)


def build_report(
    components: list[dict],
    timings: dict[str, float],
    model_info: dict,
    extra: dict,
) -> dict:
    """Assemble the report of one study.

    Parameters
    ----------
    components:
        One dict per kept lesion, largest first, as from
        ``pipeline.postprocess.component_report`` (volume_cc, suv_max, suv_mean,
        si/ap/lr_extent_mm, centroid_mm_lps); further keys are kept as they are and
        missing ones become null.
    timings:
        Seconds per stage (e.g. load, predict, write); a "total" is added when absent.
    model_info:
        Model identity (version, architecture, checkpoint hash, ...).
    extra:
        Further top-level entries, e.g. source series UIDs and result UIDs. They
        must not reuse the report's own keys.

    Returns
    -------
    dict
        JSON-ready: numpy scalars and arrays, tuples and paths converted;
        non-finite numbers become null.
    """
    lesions = []
    for index, component in enumerate(components, start=1):
        lesion: dict[str, Any] = {"index": index}
        lesion.update({key: component.get(key) for key in LESION_KEYS})
        lesion.update({k: v for k, v in component.items() if k not in lesion})
        lesions.append(lesion)
    timings_s = {str(k): float(v) for k, v in timings.items()}
    if timings_s and "total" not in timings_s:
        timings_s["total"] = sum(timings_s.values())
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "target_found": bool(lesions),
        "lesion_count": len(lesions),
        "total": _totals(lesions),
        "lesions": lesions,
        "model": dict(model_info),
        "model_version": model_info.get("version", model_info.get("model_version")),
        "timings_s": timings_s,
    }
    clash = sorted(set(extra) & set(report))
    if clash:
        raise ValueError(f"report extra entries reuse reserved keys: {', '.join(clash)}")
    report.update(extra)
    return _jsonable(report)


def uid_entries(ct: SeriesVolume, pet: SeriesVolume | None, results: Mapping[str, Dataset]) -> dict:
    """Report entries naming the source series and the result objects.

    Parameters
    ----------
    ct, pet:
        Source volumes (PET may be None).
    results:
        Result datasets by kind, e.g. ``{"seg": seg, "rtstruct": rtstruct}``.

    Returns
    -------
    dict
        ``{"source": {...}, "results": {kind: {series/SOP instance UIDs}}}``, to
        pass as ``extra`` to :func:`build_report`.
    """
    source = {
        "study_instance_uid": ct.study_instance_uid,
        "frame_of_reference_uid": ct.frame_of_reference_uid,
        "ct_series_instance_uid": ct.series_instance_uid,
        "ct_slices": len(ct.headers),
    }
    if pet is not None:
        source["pet_series_instance_uid"] = pet.series_instance_uid
    return {
        "source": source,
        "results": {
            kind: {
                "sop_class_uid": str(ds.SOPClassUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
            }
            for kind, ds in results.items()
        },
    }


def _totals(lesions: list[dict]) -> dict[str, Any]:
    """Sum of volumes, highest SUVmax and volume-weighted SUVmean over all lesions."""
    volumes = [_number(lesion.get("volume_cc")) for lesion in lesions]
    maxima = [_number(lesion.get("suv_max")) for lesion in lesions]
    means = [_number(lesion.get("suv_mean")) for lesion in lesions]
    known_volumes = [v for v in volumes if v is not None]
    weighted = [
        (v, m) for v, m in zip(volumes, means, strict=True) if v is not None and m is not None
    ]
    weight = sum(v for v, _ in weighted)
    return {
        "volume_cc": sum(known_volumes) if known_volumes else (0.0 if not lesions else None),
        "suv_max": max((m for m in maxima if m is not None), default=None),
        "suv_mean": sum(v * m for v, m in weighted) / weight if weight > 0 else None,
    }


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """Convert numpy types, tuples, paths and dates into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (Path, dt.date, dt.time)):
        return value.isoformat() if not isinstance(value, Path) else str(value)
    return value


def write_report(report: dict, path: Path) -> Path:
    """Write ``report`` as indented JSON to ``path`` atomically; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
