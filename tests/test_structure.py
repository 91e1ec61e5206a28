import pytest
import torch
from custom_models import Untraceable
from masasurgery.passes.structure import RULES, find_by_structure

import masasurgery


def test_models_no_graph_captures_are_read_by_structure_and_verify():
    model = Untraceable().eval()
    x = torch.randn(2, 5, 32)
    expected = model(x)
    conversion = masasurgery.convert(model, atoms=3, example_inputs=x)

    analysis = conversion.analysis
    assert analysis.capture_path == "structure"
    assert set(analysis.capture_failures) == {"fx", "export"}
    assert [g.num_blocks for g in analysis.groups] == [3]
    assert conversion.verification.passed and conversion.lossless
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_structure_rules_split_fused_rows_and_check_widths():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    site = find_by_structure(model).sites[0]
    assert site.kind == "structure:Attention"
    assert site.projection_of("v").roles == {
        "q": (0, 192),
        "k": (192, 384),
        "v": (384, 576),
    }
    assert all(rule.children for rule in RULES)


def test_a_model_without_conventional_names_still_fails_with_every_reason():
    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 12), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x) if x.sum().item() > 0 else self.a(x)

    with pytest.raises(masasurgery.CaptureError, match=r"(?s)fx: .*export: "):
        masasurgery.analyze(Hidden(), torch.randn(2, 4))
