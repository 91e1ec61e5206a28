"""convert on half-precision, meta-device and already converted models."""

import pytest
import torch
from conftest import image_batch, tiny_vit

import masasurgery
from masasurgery import AlreadyConvertedError, ConfigError, SharedProjection
from masasurgery.tolerances import tolerance_for


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("atoms", [3, 1], ids=["lossless", "one-atom"])
def test_half_precision_models_fit_in_float64_and_stay_in_their_dtype(dtype, atoms):
    model = tiny_vit(depth=3).to(dtype)
    x = image_batch().to(dtype)
    expected = model(x)

    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x)

    report = conversion.verification
    assert report.rewrite_exact and report.passed
    assert report.tolerance == tolerance_for(dtype, "cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(f.eigenvalues.dtype == torch.float64 for f in conversion.fits.values())
    if atoms == 3:
        tol = tolerance_for(dtype, "cpu")
        torch.testing.assert_close(model(x), expected, atol=tol.atol, rtol=tol.rtol)


def test_a_meta_device_model_is_refused_before_anything_runs():
    with torch.device("meta"):
        model = tiny_vit(depth=3)
    with pytest.raises(ConfigError, match="on the meta device .first: 'cls_token'"):
        masasurgery.convert(model, atoms=2)
    assert not hasattr(model, "masa")
    assert all(p.is_meta for p in model.parameters())


def test_converting_twice_is_refused_before_the_analysis():
    model = tiny_vit(depth=3)
    masasurgery.convert(model, atoms=2, example_inputs=image_batch(), verify=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AlreadyConvertedError, match="materialize"):
        masasurgery.convert(model, atoms=1, example_inputs=image_batch())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert sum(isinstance(m, SharedProjection) for m in model.modules()) == 6
