"""Dice, HD95 and volume ratio on known shapes."""

from __future__ import annotations

import numpy as np

from model.metrics import dice, hd95, volume_ratio


def test_dice_values():
    a = np.zeros((4, 10, 10), bool)
    b = a.copy()
    a[1:3, 2:6, 2:6] = True
    b[1:3, 2:6, 4:8] = True
    assert dice(a, a) == 1.0
    assert abs(dice(a, b) - 0.5) < 1e-12
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_hd95_of_shifted_box_is_shift_in_mm():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=2)
    assert abs(hd95(a, b, (3.0, 1.0, 0.5)) - 1.0) < 1e-6  # 2 voxels x 0.5 mm
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) == float("inf")


def test_volume_ratio():
    a = np.zeros(10, bool)
    a[:4] = True
    b = np.zeros(10, bool)
    b[:2] = True
    assert volume_ratio(b, a) == 0.5
    assert volume_ratio(a, a) == 1.0
