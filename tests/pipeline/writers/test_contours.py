"""Pixel-boundary contour tracing: the loops give the mask back under both fill rules."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.writers.contours import fill_even_odd, signed_area, trace_slice


def fill_union(loops, shape):
    """OR of every loop filled on its own (how plastimatch combines contours by default)."""
    out = np.zeros(shape, dtype=bool)
    for loop in loops:
        out |= fill_even_odd([loop], shape)
    return out


def random_masks(count: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = (int(rng.integers(1, 24)), int(rng.integers(1, 24)))
        yield rng.random(shape) < rng.random()


@pytest.mark.parametrize("keyhole", [True, False])
def test_even_odd_fill_gives_the_mask_back(keyhole):
    for mask in random_masks(400):
        loops = trace_slice(mask, keyhole=keyhole)
        np.testing.assert_array_equal(fill_even_odd(loops, mask.shape), mask)


def test_keyhole_loops_also_survive_union_fill():
    for mask in random_masks(400, seed=11):
        loops = trace_slice(mask, keyhole=True)
        assert not any(loop.is_hole for loop in loops)
        np.testing.assert_array_equal(fill_union(loops, mask.shape), mask)


def test_separate_holes_run_the_other_way():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:8, 1:8] = True
    mask[3:5, 3:6] = False
    loops = trace_slice(mask, keyhole=False)
    assert [loop.is_hole for loop in loops] == [False, True]
    assert signed_area(loops[0].points) == pytest.approx(49.0)
    assert signed_area(loops[1].points) == pytest.approx(-6.0)
    # Union of separate loops fills the hole: that is why keyhole is the default.
    assert fill_union(loops, mask.shape).sum() == 49


def test_square_is_four_corners_at_half_pixels():
    mask = np.zeros((6, 7), dtype=bool)
    mask[2:5, 1:4] = True
    (loop,) = trace_slice(mask)
    assert sorted(map(tuple, loop.points.tolist())) == sorted(
        [(1.5, 0.5), (1.5, 3.5), (4.5, 3.5), (4.5, 0.5)]
    )
    assert loop.area == pytest.approx(9.0)


def test_diagonal_neighbours_are_separate_regions():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 1] = mask[2, 2] = True
    loops = trace_slice(mask)
    assert len(loops) == 2
    assert all(loop.area == pytest.approx(1.0) for loop in loops)


def test_empty_slice_has_no_loops():
    assert trace_slice(np.zeros((5, 5), dtype=bool)) == []


def test_region_touching_the_border():
    mask = np.ones((3, 4), dtype=bool)
    mask[1, 1] = False
    loops = trace_slice(mask)
    assert len(loops) == 1
    np.testing.assert_array_equal(fill_even_odd(loops, mask.shape), mask)
    np.testing.assert_array_equal(fill_union(loops, mask.shape), mask)
