"""Post-processing: threshold, small components, holes, and the lesion report."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.postprocess import component_report, postprocess

SPACING = (2.0, 1.0, 1.0)  # z, y, x mm: one voxel is 0.002 cc


def blank() -> np.ndarray:
    return np.zeros((20, 60, 60), np.float32)


def test_threshold_removes_small_and_orders_by_size():
    prob = blank()
    prob[2:12, 5:25, 5:25] = 0.9  # 4000 voxels = 8 cc
    prob[14:18, 40:50, 40:50] = 0.7  # 400 voxels = 0.8 cc
    prob[5:7, 40:45, 5:10] = 0.8  # 50 voxels = 0.1 cc: kept at the default 0.1 cc
    prob[10, 50:53, 50:53] = 0.95  # 9 voxels = 0.018 cc: removed
    prob[15:18, 5:10, 40:45] = 0.49  # below threshold
    out = postprocess(prob, SPACING)
    assert out.dtype == np.uint8
    assert [int((out == k).sum()) for k in (1, 2, 3)] == [4000, 400, 50]
    assert out.max() == 3
    assert out[10, 51, 51] == 0 and out[16, 7, 42] == 0
    assert postprocess(prob, SPACING, keep=1).max() == 1
    assert postprocess(prob, SPACING, min_component_cc=0.5).max() == 2
    assert postprocess(prob, SPACING, threshold=0.8).max() == 2


def test_holes_filled_in_3d_and_per_slice():
    prob = blank()
    prob[4:14, 10:30, 10:30] = 1.0
    prob[8:10, 18:22, 18:22] = 0.0  # enclosed cavity (3D hole)
    prob[2:16, 40:55, 40:55] = 1.0
    prob[2:16, 45:50, 45:50] = 0.0  # a tunnel open at both ends: a hole in every axial slice
    out = postprocess(prob, SPACING)
    assert (out[4:14, 10:30, 10:30] > 0).all()
    assert (out[2:16, 40:55, 40:55] > 0).all()


def test_components_touching_diagonally_are_one_lesion():
    prob = blank()
    prob[5:8, 10:15, 10:15] = 1.0
    prob[8:11, 15:20, 15:20] = 1.0  # shares only a corner with the first block
    out = postprocess(prob, SPACING, min_component_cc=0.0)
    assert out.max() == 1


def test_component_report_measures():
    labels = np.zeros((20, 60, 60), np.int32)
    labels[2:12, 5:25, 8:20] = 1
    labels[14:16, 40:43, 40:44] = 2
    suv = np.ones_like(labels, dtype=np.float32)
    suv[5, 10, 10] = 12.0
    rep = component_report(labels, suv, SPACING, origin=(-30.0, -20.0, 100.0))
    assert [r["label"] for r in rep] == [1, 2]
    first = rep[0]
    assert first["voxels"] == 10 * 20 * 12
    assert first["volume_cc"] == pytest.approx(10 * 20 * 12 * 0.002)
    assert first["suv_max"] == 12.0
    assert first["suv_mean"] == pytest.approx((2400 - 1 + 12) / 2400, rel=1e-4)
    assert first["si_extent_mm"] == 20.0 and first["ap_extent_mm"] == 20.0 and first["lr_extent_mm"] == 12.0
    assert first["centroid_voxel_zyx"] == [6.5, 14.5, 13.5]
    assert first["centroid_mm_lps"] == [-30.0 + 13.5, -20.0 + 14.5, 100.0 + 13.0]


def test_report_from_bool_mask_and_feet_first_direction():
    mask = np.zeros((20, 60, 60), bool)
    mask[3:5, 10:12, 10:16] = True
    suv = np.full(mask.shape, 2.0, np.float32)
    ffs = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    rep = component_report(mask, suv, SPACING, origin=(0.0, 0.0, 0.0), direction=ffs)
    assert len(rep) == 1
    assert rep[0]["lr_extent_mm"] == 6.0 and rep[0]["si_extent_mm"] == 4.0
    assert rep[0]["centroid_mm_lps"] == [-12.5, 10.5, -7.0]


def test_empty_and_bad_input():
    assert postprocess(blank(), SPACING).max() == 0
    assert component_report(np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 4)), (1, 1, 1)) == []
    with pytest.raises(ValueError):
        postprocess(np.zeros((3, 3)), SPACING)
    with pytest.raises(ValueError):
        component_report(np.zeros((2, 3, 4), bool), np.zeros((2, 3, 3)), (1, 1, 1))


def test_confidence_order_keeps_the_surest_component_first():
    prob = blank()
    prob[2:12, 5:25, 5:25] = 0.6  # large but uncertain
    prob[14:18, 40:50, 40:50] = 0.95  # small and confident
    by_volume = postprocess(prob, SPACING, keep=1)
    by_confidence = postprocess(prob, SPACING, keep=1, order_by="confidence")
    assert int((by_volume == 1).sum()) == 4000
    assert int((by_confidence == 1).sum()) == 400 and by_confidence[16, 45, 45] == 1
    both = postprocess(prob, SPACING, order_by="confidence")
    assert both[16, 45, 45] == 1 and both[5, 10, 10] == 2
    with pytest.raises(ValueError, match="order_by"):
        postprocess(prob, SPACING, order_by="size")


def test_uptake_order_keeps_the_most_fdg_avid_component_first():
    prob = blank()
    prob[2:12, 5:25, 5:25] = 0.7  # the network's less certain component ...
    prob[14:18, 40:50, 40:50] = 0.95
    suv = np.zeros_like(prob)
    suv[6, 15, 15] = 4.0  # ... holds the hottest voxel
    suv[15, 45, 45] = 1.5
    by_uptake = postprocess(prob, SPACING, keep=1, order_by="uptake", suv=suv)
    assert by_uptake[6, 15, 15] == 1 and by_uptake[16, 45, 45] == 0
    both = postprocess(prob, SPACING, order_by="uptake", suv=suv)
    assert both[6, 15, 15] == 1 and both[16, 45, 45] == 2
    with pytest.raises(ValueError, match="SUV volume"):
        postprocess(prob, SPACING, order_by="uptake")


def test_postprocess_with_applies_each_setting():
    from pipeline.postprocess import postprocess_with
    from pipeline.settings import ProcessSettings

    prob = blank()
    prob[2:12, 5:25, 5:25] = 0.6  # 8 cc, uncertain
    prob[14:18, 40:50, 40:50] = 0.95  # 0.8 cc, confident
    prob[5:7, 40:45, 5:10] = 0.8  # 0.1 cc
    default = postprocess_with(prob, SPACING, ProcessSettings(), 0.5)  # keep 1, the largest
    assert default.max() == 1 and default[5, 15, 15] == 1 and default[16, 45, 45] == 0
    surest = postprocess_with(prob, SPACING, ProcessSettings(lesion_order="confidence"), 0.5)
    assert surest.max() == 1 and surest[16, 45, 45] == 1 and surest[5, 15, 15] == 0
    wide = ProcessSettings(keep_components=3, lesion_order="volume", min_component_cc=0.5)
    assert np.array_equal(postprocess_with(prob, SPACING, wide, 0.5),
                          postprocess(prob, SPACING, threshold=0.5, min_component_cc=0.5, keep=3, order_by="volume"))
    assert postprocess_with(prob, SPACING, wide, 0.5).max() == 2  # the 0.1 cc component is dropped
    assert postprocess_with(prob, SPACING, wide, 0.7).max() == 1  # the threshold is the one given


def test_delineation_threshold_outlines_the_lesion_the_threshold_found():
    from pipeline.postprocess import postprocess_with
    from pipeline.settings import ProcessSettings

    prob = blank()
    prob[2:12, 5:25, 5:25] = 0.35  # a lesion found at 0.3 ...
    prob[4:10, 10:20, 10:20] = 0.8  # ... whose confident core (600 voxels) is the outline at 0.5
    prob[14:18, 40:50, 40:50] = 0.4  # a less confident lesion, never above 0.5
    found = postprocess(prob, SPACING, threshold=0.3, keep=2, order_by="confidence")
    outlined = postprocess(prob, SPACING, threshold=0.3, keep=2, order_by="confidence", delineation_threshold=0.5)
    assert int((found == 1).sum()) == 4000 and int((outlined == 1).sum()) == 600
    assert outlined[6, 15, 15] == 1 and outlined[3, 6, 6] == 0
    # the faint lesion nowhere reaches 0.5: it keeps its outline at the threshold
    assert int((outlined == 2).sum()) == int((found == 2).sum()) == 400
    # a delineation threshold at or below the threshold changes nothing
    assert np.array_equal(postprocess(prob, SPACING, threshold=0.3, keep=2, delineation_threshold=0.3),
                          postprocess(prob, SPACING, threshold=0.3, keep=2))
    # which lesion is kept is still decided at the threshold (mean probability over the whole component)
    prob[14:18, 40:50, 40:50] = 0.6
    assert postprocess(prob, SPACING, threshold=0.3, keep=1, order_by="confidence",
                       delineation_threshold=0.5)[6, 15, 15] == 0
    settings = ProcessSettings(keep_components=2)
    assert settings.delineation_threshold == 0.5
    assert np.array_equal(postprocess_with(prob, SPACING, settings, 0.3),
                          postprocess(prob, SPACING, threshold=0.3, keep=2, order_by="volume",
                                      delineation_threshold=0.5))
