import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tiny_vit

import masasurgery
from masasurgery import SharedProjection, VerificationError
from masasurgery.tolerances import tolerance_for

DEPTH = 4


def _converted(atoms=2, **kwargs):
    model = tiny_vit(depth=DEPTH, **kwargs)
    x = image_batch()
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    return model, conversion, x


@pytest.mark.parametrize("atoms", range(1, DEPTH + 1))
def test_rewrite_is_exact_for_every_number_of_atoms(atoms):
    model, conversion, x = _converted(atoms)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.rewrite_exact and report.passed
    assert report.lossless == (atoms == DEPTH)
    assert len(report.layer_checks) == DEPTH * (
        4 * 2 + 2
    )  # weight+output per role, 2 biases
    if atoms < DEPTH:
        assert report.approximation.max_abs > 1e-3


def test_figures_agree_with_a_direct_computation():
    model = tiny_vit(depth=DEPTH)
    original = copy.deepcopy(model)
    x = image_batch()
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")

    with torch.no_grad():
        a, e = model(x).double(), original(x).double()
    diff = a - e
    approx = report.approximation
    assert approx.max_abs == pytest.approx(diff.abs().max().item(), rel=1e-6)
    assert approx.rel_l2 == pytest.approx((diff.norm() / e.norm()).item(), rel=1e-6)
    cosine = F.cosine_similarity(a.flatten(), e.flatten(), dim=0).item()
    assert approx.cosine == pytest.approx(cosine, rel=1e-6)

    errors = {(le.block, le.role): le.relative_error for le in report.layer_errors}
    w = original.blocks[2].attn.qkv.weight[192:384]
    w_hat = model.blocks[2].attn.qkv.weight[192:384]
    direct = ((w_hat - w).norm() / w.norm()).item()
    assert errors["blocks.2.attn", "k"] == pytest.approx(direct, rel=1e-4)


def _failures_of(model, conversion, x):
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert not report.rewrite_exact and not report.passed
    return "\n".join(report.failures)


def test_swapped_q_and_k_rows_fail_naming_layer_and_roles():
    model, conversion, x = _converted()
    model.blocks[1].attn.qkv.parts[:2] = ["k", "q"]
    failures = _failures_of(model, conversion, x)
    assert "blocks.1.attn.qkv role q (weight)" in failures
    assert "blocks.1.attn.qkv role k (output)" in failures
    assert "blocks.0.attn" not in failures


def test_a_transposed_weight_fails_naming_layer_and_role():
    model, conversion, x = _converted()
    proj = model.blocks[3].attn.proj
    proj.forward = lambda h: F.linear(h, proj.weight.T, proj.bias)
    failures = _failures_of(model, conversion, x)
    assert "blocks.3.attn.proj role o (output)" in failures
    assert "end to end" in failures


def test_a_wrong_bias_fails_naming_layer():
    model, conversion, x = _converted()
    with torch.no_grad():
        model.blocks[2].attn.qkv.bias[5] += 0.5
    failures = _failures_of(model, conversion, x)
    assert "blocks.2.attn.qkv role bias (bias)" in failures


def test_coefficients_of_the_wrong_layer_fail():
    model, conversion, x = _converted()
    with torch.no_grad():
        model.blocks[0].attn.proj.coefficients["o"].copy_(
            model.blocks[1].attn.proj.coefficients["o"]
        )
    assert "blocks.0.attn.proj role o (weight)" in _failures_of(model, conversion, x)


def test_convert_undoes_a_rewrite_that_fails_verification(monkeypatch):
    model = tiny_vit(depth=DEPTH)
    x = image_batch()
    expected = model(x)
    # Every replacement drops a row: the output no longer matches its reference
    monkeypatch.setattr(
        SharedProjection,
        "forward",
        lambda self, h: F.linear(h, self.weight.roll(1, dims=0), self.bias),
    )
    with pytest.raises(VerificationError, match="conversion was undone") as info:
        masasurgery.convert(model, atoms=2, example_inputs=x)
    assert "role bias" not in str(info.value) and "(output)" in str(info.value)
    assert not hasattr(model, "masa")
    assert torch.equal(model(x), expected)


def test_train_mode_with_dropout_verifies_and_stays_in_train_mode():
    model = tiny_vit(depth=DEPTH, attn_drop_rate=0.2, proj_drop_rate=0.2).train()
    x = image_batch()
    conversion = masasurgery.convert(model, atoms=DEPTH, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.passed and report.settings["training"] is True
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_tf32_flags_are_restored_and_recorded():
    model, conversion, x = _converted()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        report = masasurgery.verify(model, conversion, x, device="cpu")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert report.settings["cuda_matmul_tf32"] is False


def test_report_prints_and_serialises():
    model, conversion, x = _converted()
    report = masasurgery.verify(model, conversion, x, device="cpu")
    text = str(report)
    assert "part 1, rewrite exact: PASS" in text and "blocks.3.attn" in text
    data = report.to_dict()
    assert data["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert data["passed"] is True and len(data["layer_errors"]) == DEPTH * 4


def test_the_tolerance_table_covers_training_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for device in ("cpu", "cuda"):
            assert tolerance_for(dtype, device).rtol > 0
    with pytest.raises(ValueError, match="no tolerance for dtype torch.int64"):
        tolerance_for(torch.int64, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verification_runs_on_cuda_and_moves_the_model_back():
    model, conversion, x = _converted(atoms=DEPTH)
    report = masasurgery.verify(model, conversion, x)
    assert report.device.startswith("cuda") and report.passed
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(
        p.device.type == "cpu"
        for m in conversion.rewrite.originals.values()
        for p in m.parameters()
    )
