"""Every example in a docstring runs and prints what it says."""

import doctest
import importlib
import pkgutil

import masasurgery.passes
import pytest
import torch

import masasurgery

# masasurgery.passes lives in passes/, so walk both packages
MODULES = sorted(
    info.name
    for package in (masasurgery, masasurgery.passes)
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(
        module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in {name}"
    )


def test_the_passes_are_walked():
    assert "masasurgery.passes.find_attention" in MODULES


def test_the_public_api_is_documented_with_examples():
    missing = [
        name
        for name in masasurgery.__all__
        if callable(getattr(masasurgery, name))
        and not isinstance(getattr(masasurgery, name), type)
        and "Example" not in (getattr(masasurgery, name).__doc__ or "")
    ]
    assert missing == []
