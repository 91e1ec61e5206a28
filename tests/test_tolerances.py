import pytest
import torch

from masasurgery.tolerances import TOLERANCES, Tolerance, tolerance_for


def test_the_tolerance_table_covers_training_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for device in ("cpu", "cuda"):
            assert tolerance_for(dtype, device).rtol > 0
    with pytest.raises(ValueError, match="no tolerance for dtype torch.int64"):
        tolerance_for(torch.int64, "cpu")


def test_devices_other_than_cuda_read_the_cpu_row():
    assert tolerance_for(torch.float32, "cuda:1") == TOLERANCES[torch.float32, "cuda"]
    assert tolerance_for(torch.float32, "meta") == TOLERANCES[torch.float32, "cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_excess_follows_the_rule_of_assert_close(dtype):
    tol = tolerance_for(dtype, "cpu")
    expected = torch.randn(1000).to(dtype)
    for scale in (0.5, 2.0):
        # Every element sits at `scale` times its own bound
        bound = tol.atol + tol.rtol * expected.double().abs()
        actual = (expected.double() + scale * bound).to(dtype)
        close = True
        try:
            torch.testing.assert_close(
                actual, expected, atol=tol.atol, rtol=tol.rtol, check_dtype=False
            )
        except AssertionError:
            close = False
        assert (tol.excess(actual, expected) <= 0) == close == (scale < 1)


def test_excess_of_empty_tensors_passes():
    assert Tolerance(0.0, 0.0).excess(torch.empty(0), torch.empty(0)) == 0.0
