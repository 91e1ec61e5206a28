"""Every timm family with attention converts losslessly, or fails as documented.

One small variant per timm family (``masasurgery/zoo/timm_families.json``, written
by ``benchmarks/coverage.py --refresh``), plus torchvision and transformers models
with tiny configs. Each converts at ``atoms = 10**6``, so every group gets as many
atoms as blocks and the converted model must verify within the fp32 tolerance. A
family in ``UNSUPPORTED`` must still fail with its documented reason.
"""

import pytest
import torch
from custom_models import ChannelsFirst
from torch import nn

import masasurgery
from masasurgery.zoo import catalog
from masasurgery.zoo.catalog import UNSUPPORTED
from masasurgery.zoo.extra_models import EXTRA_MODELS

FAMILIES = catalog.timm_families()
LOSSLESS = 10**6  # more atoms than any group has blocks: capped to L per group


def _convert_and_check(model: nn.Module, inputs) -> None:
    conversion = masasurgery.convert(model, atoms=LOSSLESS, example_inputs=inputs)
    assert conversion.lossless
    assert conversion.verification.passed, conversion.verification.failures


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's caches under export
@pytest.mark.parametrize("family", FAMILIES, ids=[f.family for f in FAMILIES])
def test_timm_family_converts_or_fails_as_documented(family):
    torch.manual_seed(0)
    model, x = family.create(), torch.randn(1, *family.input_size)
    unsupported = UNSUPPORTED.get(family.family)
    if unsupported is None:
        _convert_and_check(model, x)
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(unsupported.error, match=unsupported.match):
        masasurgery.convert(model, atoms=LOSSLESS, example_inputs=x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # transformers' notes on bos/eos token ids
@pytest.mark.parametrize("extra", EXTRA_MODELS, ids=[e.name for e in EXTRA_MODELS])
def test_torchvision_and_transformers_models_convert(extra):
    model, inputs = extra.build()
    _convert_and_check(model, inputs)


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ChannelsFirst(16), ChannelsFirst(16)])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_1x1_conv_projections_convert_verify_and_materialize():
    model = _Convs().eval()
    x = torch.randn(1, 16, 4, 4)
    expected = model(x)
    conversion = masasurgery.convert(model, atoms=LOSSLESS, example_inputs=x)
    assert conversion.verification.passed and conversion.lossless
    assert type(model.blocks[0].qkv[0]).__name__ == "SharedConv2d"
    assert model.blocks[0].qkv[0].weight.shape == (32, 16, 1, 1)

    # Back to plain 1x1 convolutions with the same outputs
    done = masasurgery.materialize(model)
    assert set(done.layouts.values()) == {"conv1x1"}
    assert type(model.blocks[0].qkv[0]) is nn.Conv2d
    # Lossless in fp32: atoms reproduce the weights to rounding
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
