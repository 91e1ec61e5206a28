"""Whitening: exact factor of X^T X, jitter on singular statistics, clear errors."""

import logging

import pytest
import torch

from masasurgery.errors import FitError
from masasurgery.whiten import whitening


def test_output_error_equals_the_whitened_weight_error():
    x = torch.randn(500, 12, dtype=torch.float64) @ torch.randn(12, 12).double()
    delta = torch.randn(7, 12, dtype=torch.float64)
    w = whitening(x.T @ x)
    scale = (x.T @ x).diagonal().mean()
    assert w.jitter == 0.0
    torch.testing.assert_close(
        w.apply(delta).norm() ** 2, (delta @ x.T).norm() ** 2 / scale
    )
    torch.testing.assert_close(w.unapply(w.apply(delta)), delta)


def test_singular_statistics_get_a_logged_jitter(caplog):
    x = torch.randn(100, 6, dtype=torch.float64)
    x = x - x.mean(dim=1, keepdim=True)  # rows sum to zero: rank 5, like LayerNorm
    with caplog.at_level(logging.INFO, logger="masasurgery.whiten"):
        w = whitening(x.T @ x, name="blocks.0.attn.qkv")
    assert w.jitter > 0.0
    assert "blocks.0.attn.qkv" in caplog.text and "jitter" in caplog.text
    assert torch.isfinite(w.factor).all()


def test_bad_statistics_fail_clearly():
    with pytest.raises(FitError, match="square"):
        whitening(torch.zeros(3, 4))
    with pytest.raises(FitError, match="non-finite"):
        whitening(torch.full((3, 3), float("nan")))
    with pytest.raises(FitError, match="not positive definite"):
        whitening(-torch.eye(3))
