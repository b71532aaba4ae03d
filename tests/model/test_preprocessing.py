import numpy as np
import pytest

from model.preprocessing import Preprocessing


def test_round_trip_through_dict():
    prep = Preprocessing(slices=3, pixel_spacing_mm=1.5, ct_window=(-900.0, 300.0))
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_slice_step_span_and_metadata():
    prep = Preprocessing(slices=5, slice_step=2)
    assert prep.span == 9 and Preprocessing().span == 5
    assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.to_dict()["slice_step"] == 2
    # the default is left out, so checkpoints and caches made before the option keep their keys
    assert "slice_step" not in Preprocessing().to_dict()
    assert Preprocessing.from_dict({"slices": 5}).slice_step == 1
    with pytest.raises(ValueError, match="slice_step"):
        Preprocessing(slice_step=0)


def test_unknown_keys_and_even_k_are_rejected():
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({"slices": 5, "bogus": 1})
    with pytest.raises(ValueError, match="odd"):
        Preprocessing(slices=4)


def test_normalisation_ranges():
    prep = Preprocessing()
    ct = prep.normalise_ct(np.array([-3000.0, -1000.0, -300.0, 400.0, 3000.0]))
    np.testing.assert_allclose(ct, [-1, -1, 0, 1, 1], atol=1e-6)
    pet = prep.normalise_pet(np.array([-1.0, 0.0, prep.suv_max, 100.0]))
    np.testing.assert_allclose(pet, [0, 0, 1, 1], atol=1e-6)
    assert ct.dtype == np.float32 and pet.dtype == np.float32
    # monotone in SUV, so a hotter lesion always looks hotter to the network
    s = prep.normalise_pet(np.linspace(0, 20, 50))
    assert np.all(np.diff(s) > 0)
