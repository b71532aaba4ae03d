"""JSON report: lesion fields, totals, timings, UIDs, tolerance of extra keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.writers.report import LESION_KEYS, build_report, uid_entries, write_report
from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg
from tests.pipeline.writers.ct_factory import ellipsoid_mask


def components():
    return [
        {
            "volume_cc": np.float32(30.0),
            "suv_max": np.float64(11.5),
            "suv_mean": 6.0,
            "si_extent_mm": 42.0,
            "ap_extent_mm": 35.5,
            "lr_extent_mm": 31.0,
            "centroid_mm_lps": np.array([-80.5, 20.0, -310.25]),
            "label": np.int64(1),
            "touches_border": False,
        },
        {
            "volume_cc": 10.0,
            "suv_max": 4.0,
            "suv_mean": 2.0,
            "si_extent_mm": 20.0,
            "ap_extent_mm": 18.0,
            "lr_extent_mm": 17.0,
            "centroid_mm_lps": (30.0, 40.0, -300.0),
        },
    ]


def test_report_fields_totals_and_round_trip(tmp_path):
    report = build_report(
        components(),
        {"load": 1.5, "predict": 2.25},
        {"version": "ckpt-2024.1"},
        {"source": {"study_instance_uid": "1.2.3"}},
    )
    path = write_report(report, tmp_path / "out" / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded == report
    assert loaded["lesion_count"] == 2 and loaded["target_found"] is True
    first = loaded["lesions"][0]
    assert first["volume_cc"] == 30.0 and first["suv_max"] == 11.5
    assert first["centroid_mm_lps"] == [-80.5, 20.0, -310.25]
    assert (first["si_extent_mm"], first["ap_extent_mm"], first["lr_extent_mm"]) == (
        42.0,
        35.5,
        31.0,
    )
    assert first["label"] == 1 and first["touches_border"] is False  # extra keys kept
    assert loaded["total"]["volume_cc"] == 40.0
    assert loaded["total"]["suv_max"] == 11.5
    assert loaded["total"]["suv_mean"] == pytest.approx((30 * 6.0 + 10 * 2.0) / 40)
    assert loaded["timings_s"] == {"load": 1.5, "predict": 2.25, "total": 3.75}
    assert loaded["model_version"] == "ckpt-2024.1"
    assert loaded["source"] == {"study_instance_uid": "1.2.3"}


def test_no_target_and_missing_or_bad_values():
    report = build_report([], {}, {"version": "v"}, {})
    assert report["target_found"] is False and report["lesions"] == []
    assert report["total"] == {"volume_cc": 0.0, "suv_max": None, "suv_mean": None}
    partial = build_report([{"volume_cc": 2.0, "suv_max": float("nan")}], {}, {}, {})
    assert partial["lesions"][0]["suv_max"] is None
    assert partial["lesions"][0]["centroid_mm_lps"] is None
    json.dumps(partial, allow_nan=False)


def test_extra_may_not_overwrite_report_keys():
    with pytest.raises(ValueError, match="lesions"):
        build_report([], {}, {}, {"lesions": []})


def test_uid_entries_name_sources_and_results(small_ct, info):
    mask = ellipsoid_mask(
        small_ct.volume.array.shape, small_ct.spacing_zyx, (18.0, 45.0, 40.0), (9.0, 14.0, 12.0)
    )
    seg = write_seg(mask, small_ct.volume, info)
    rtstruct = write_rtstruct(mask, small_ct.volume, info)
    entries = uid_entries(small_ct.volume, None, {"seg": seg, "rtstruct": rtstruct})
    assert entries["source"]["ct_series_instance_uid"] == small_ct.volume.series_instance_uid
    assert entries["results"]["seg"]["sop_instance_uid"] == seg.SOPInstanceUID
    assert entries["results"]["rtstruct"]["series_instance_uid"] == rtstruct.SeriesInstanceUID
    report = build_report([], {}, {}, entries)
    assert report["results"]["rtstruct"]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.481.3"


def test_every_lesion_key_is_filled_from_component_report():
    from pipeline.postprocess import component_report

    mask = np.zeros((8, 16, 16), bool)
    mask[2:6, 4:10, 5:12] = True
    lesions = component_report(mask, mask * 3.0, (2.0, 1.0, 1.0), origin=(-8.0, -8.0, -100.0),
                               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    lesion = build_report(lesions, {}, {}, {})["lesions"][0]
    missing = [key for key in LESION_KEYS if lesion[key] is None]
    assert not missing, f"report keys that component_report does not fill: {missing}"
