"""compress_report: how the Compression record prints."""

from masasurgery.budget import Choice
from masasurgery.compress_report import _removed


def test_a_fit_dearer_than_dense_says_what_it_adds_not_minus_zero():
    assert _removed(Choice(3, 0, 109, 100, 0.0)) == "+9 params"
    assert _removed(Choice(1, 4, 40, 100, 0.5)) == "60.0%"
    assert _removed(Choice(0, 0, 100, 100, 0.5)) == "0.0%"
