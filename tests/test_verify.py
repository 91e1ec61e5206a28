import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, set_fused_attn, tiny_vit
from custom_models import Block, SeparateQKV
from torch import nn
from torch.nn.attention import SDPBackend

import masasurgery
from masasurgery import ConfigError, MasaWarning, SharedProjection, VerificationError
from masasurgery._state import pinned_kernels
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


# ---------------------------------------------------------------------------
# Part 2 by task: classifiers and language models


class TinyLM(nn.Module):
    """Token embedding, attention blocks and an LM head; returns ``{"logits"}``."""

    def __init__(self, vocab: int = 50, dim: int = 32, depth: int = DEPTH):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(
            *[Block(SeparateQKV(dim), dim) for _ in range(depth)]
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.blocks(self.embed(input_ids)))}


def _converted_lm(atoms):
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (3, 7))
    conversion = masasurgery.convert(
        model, atoms=atoms, example_inputs={"input_ids": ids}, verify=False
    )
    return model, conversion, ids


def _kl(p_logits, q_logits):
    p = p_logits.double().softmax(-1)
    return (p * (p.log() - q_logits.double().log_softmax(-1))).sum(-1)


def test_classifier_figures_agree_with_a_direct_computation():
    model = tiny_vit(depth=DEPTH, num_classes=5)
    original = copy.deepcopy(model)
    x = image_batch(batch=16)
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")

    with torch.no_grad():
        agree = (model(x).argmax(-1) == original(x).argmax(-1)).double().mean()
    assert report.task == "classification"
    assert report.approximation.top1_agreement == pytest.approx(agree.item())
    assert report.rewrite.top1_agreement == 1.0
    assert report.approximation.kl is None
    assert "top-1 agreement" in str(report)


def test_a_backbone_without_classes_gets_no_task_figures():
    model, conversion, x = _converted(num_classes=0)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.task == "none" and report.approximation.top1_agreement is None


def test_lm_figures_agree_with_a_direct_computation():
    model, conversion, ids = _converted_lm(atoms=1)
    # Copied together, so that the copied record describes the copied model
    original, record = copy.deepcopy((model, conversion))
    record.undo(original)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padding: left out of the figures
    inputs = {"input_ids": ids, "attention_mask": mask}
    report = masasurgery.verify(model, conversion, inputs, device="cpu")

    with torch.no_grad():
        a, e = model(ids)["logits"], original(ids)["logits"]  # (B, T, V)
    keep = mask.bool()
    kl = _kl(e, a)[keep].mean().item()
    agree = (a.argmax(-1) == e.argmax(-1))[keep].double().mean().item()
    assert report.task == "lm"
    assert report.approximation.kl == pytest.approx(kl, rel=1e-9)
    assert report.approximation.top1_agreement == pytest.approx(agree)
    assert report.approximation.kl > 1e-3 and report.rewrite.kl < 1e-10


def test_a_lossless_lm_agrees_on_every_next_token():
    model, conversion, ids = _converted_lm(atoms=DEPTH)
    report = masasurgery.verify(model, conversion, {"input_ids": ids}, device="cpu")
    assert report.passed and report.task == "lm"
    assert report.approximation.top1_agreement == 1.0
    assert report.approximation.kl < 1e-10


def test_task_can_be_named_and_is_checked():
    model, conversion, x = _converted()
    report = masasurgery.verify(model, conversion, x, device="cpu", task="none")
    assert report.task == "none" and report.approximation.top1_agreement is None
    with pytest.raises(ConfigError, match="task='lm' needs logits of rank 3"):
        masasurgery.verify(model, conversion, x, device="cpu", task="lm")
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        masasurgery.verify(model, conversion, x, device="cpu", task="regression")


# ---------------------------------------------------------------------------
# Kernels and precision, pinned and recorded


def _settings_in_forward(model):
    """Record, at every forward of the first block, the flags in force."""
    seen = []

    def hook(module, args):
        seen.append(
            {
                "math": torch.backends.cuda.math_sdp_enabled(),
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "fastpath": torch.backends.mha.get_fastpath_enabled(),
                "tf32": torch.backends.cuda.matmul.allow_tf32,
                "dtype": args[0].dtype,
            }
        )

    return seen, model.blocks[0].register_forward_pre_hook(hook)


def test_every_run_uses_the_pinned_kernels_and_records_them():
    model, conversion, x = _converted()
    set_fused_attn(model, True)
    model.blocks[2].attn.fused_attn = False
    seen, handle = _settings_in_forward(model)
    report = masasurgery.verify(
        model, conversion, x, device="cpu", reference_float64=True
    )
    handle.remove()

    # Converted, reconstructed, original, float64 original
    assert len(seen) == 4
    assert all(s["math"] and not s["flash"] and not s["efficient"] for s in seen)
    assert not any(s["fastpath"] or s["tf32"] for s in seen)
    assert [s["dtype"] for s in seen] == [torch.float32] * 3 + [torch.float64]
    assert report.settings["sdpa_backend"] == "MATH"
    assert report.settings["mha_fastpath"] is False
    assert report.settings["fused_attn"] == {
        f"blocks.{i}.attn": i != 2 for i in range(DEPTH)
    }
    assert "SDPA MATH" in str(report) and "fused_attn on in 3 of 4" in str(report)


def test_another_sdpa_backend_can_be_chosen():
    model, conversion, x = _converted()
    seen, handle = _settings_in_forward(model)
    report = masasurgery.verify(
        model, conversion, x, device="cpu", sdpa_backend="flash"
    )
    handle.remove()
    assert report.passed and report.settings["sdpa_backend"] == "FLASH_ATTENTION"
    assert all(s["flash"] and not s["math"] for s in seen)
    with pytest.raises(ConfigError, match="unknown SDPA backend 'fastest'"):
        masasurgery.verify(model, conversion, x, device="cpu", sdpa_backend="fastest")


def test_pinned_kernels_restore_every_flag():
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        with pinned_kernels(SDPBackend.EFFICIENT_ATTENTION):
            assert torch.backends.cuda.mem_efficient_sdp_enabled()
            assert not torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(True)


def _precision_nodes():
    b = torch.backends
    return [b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul]


def _user_precision():
    """What the user reads back, through either API (None where it raises)."""
    readers = [
        torch.get_float32_matmul_precision,
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda: torch.backends.cudnn.allow_tf32,
        *[lambda n=n: n.fp32_precision for n in _precision_nodes()],
    ]
    values = []
    for read in readers:
        try:
            values.append(read())
        except RuntimeError:
            values.append(None)
    return values


@pytest.fixture
def _default_precision():
    saved = [n.fp32_precision for n in _precision_nodes()]
    yield
    # Per-backend values first, then the legacy call that makes both agree
    for node, value in zip(_precision_nodes(), saved, strict=True):
        node.fp32_precision = value
    torch.set_float32_matmul_precision("highest")
    assert torch.get_float32_matmul_precision() == "highest"


USER_PRECISIONS = {
    "legacy-high": lambda: torch.set_float32_matmul_precision("high"),
    # "medium" lets oneDNN run float32 matmuls in bf16 on the CPU
    "legacy-medium": lambda: torch.set_float32_matmul_precision("medium"),
    "per-backend": lambda: setattr(
        torch.backends.cuda.matmul, "fp32_precision", "tf32"
    ),
}


@pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"),
    reason="per-backend precision flags arrived in torch 2.9",
)
@pytest.mark.parametrize("user", sorted(USER_PRECISIONS))
@pytest.mark.usefixtures("_default_precision")
def test_reduced_float32_precision_is_off_during_runs_and_restored(user):
    model, conversion, x = _converted()
    USER_PRECISIONS[user]()
    before = _user_precision()
    seen = []
    model.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.append([n.fp32_precision for n in _precision_nodes()])
    )
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert _user_precision() == before
    assert seen and all(s[0] == s[2] == "ieee" for s in seen)
    assert report.settings["float32_matmul_precision"] == "highest"


# ---------------------------------------------------------------------------
# nn.MultiheadAttention's fused fast path


class WithEncoderLayer(nn.Module):
    """Attention blocks, then a tail that is an nn.TransformerEncoderLayer."""

    def __init__(self, dim: int = 32, depth: int = DEPTH):
        super().__init__()
        self.blocks = nn.Sequential(
            *[Block(SeparateQKV(dim), dim) for _ in range(depth)]
        )
        self.tail = nn.Identity()

    def forward(self, x):
        return self.tail(self.blocks(x))


def _converted_with_encoder_layer(atoms, dropout=0.0):
    model = WithEncoderLayer().eval()
    x = torch.randn(2, 5, 32)
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    # Added after conversion: masasurgery need not capture the encoder layer
    model.tail = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=dropout, batch_first=True
    ).eval()
    return model, conversion, x


def _fast_path_calls(monkeypatch):
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    return calls


def test_the_mha_fast_path_is_off_during_verification(monkeypatch):
    model, conversion, x = _converted_with_encoder_layer(atoms=2)
    calls = _fast_path_calls(monkeypatch)
    with torch.no_grad():
        model(x)
    assert len(calls) == 1  # eval mode without grad takes the fused path

    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert len(calls) == 1 and report.rewrite_exact
    assert torch.backends.mha.get_fastpath_enabled() is True


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_model_with_an_encoder_layer_verifies_losslessly(train):
    model, conversion, x = _converted_with_encoder_layer(atoms=DEPTH, dropout=0.3)
    model.train(train)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.passed and report.approximation.max_abs < 1e-5
    assert model.tail.training is train and model.tail.self_attn.training is train


class Encoder(nn.Module):
    """An nn.TransformerEncoder whose layers differ (it clones one layer)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.2)

    def forward(self, x):
        return self.encoder(x)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("atoms", [1, DEPTH])
def test_a_converted_transformer_encoder_verifies_in_both_modes(
    atoms, train, monkeypatch
):
    model = Encoder(dropout=0.2).train(train)
    x = torch.randn(2, 5, 32)
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    calls = _fast_path_calls(monkeypatch)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert calls == [] and report.rewrite_exact and report.passed
    assert report.lossless == (atoms == DEPTH)
    assert (report.approximation.max_abs > 1e-2) == (atoms < DEPTH)
    assert model.training is train


# ---------------------------------------------------------------------------
# The float64 CPU reference


def test_the_float64_reference_separates_noise_from_approximation():
    lossless, lossy = _converted(atoms=DEPTH), _converted(atoms=1)
    for (model, conversion, x), expect_error in ((lossless, False), (lossy, True)):
        report = masasurgery.verify(
            model, conversion, x, device="cpu", reference_float64=True
        )
        noise, error = report.reference.original, report.reference.converted
        assert noise.max_abs < 1e-5
        assert (error.max_abs > 1e-2) is expect_error
        assert report.to_dict()["reference"]["original"]["max_abs"] == noise.max_abs
    assert "float64 CPU reference" in str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_float64_reference_gives_back_the_very_same_tensors(dtype):
    model = tiny_vit(depth=DEPTH).to(dtype)
    x = image_batch().to(dtype)
    conversion = masasurgery.convert(model, atoms=2, example_inputs=x, verify=False)
    model.blocks[0].norm1.weight.grad = torch.ones(192, dtype=dtype)
    before = _tensor_state(model, conversion)
    report = masasurgery.verify(
        model, conversion, x, device="cpu", reference_float64=True
    )
    assert report.passed and _tensor_state(model, conversion) == before
    # bf16 kernels lose more against float64 than fp32 ones do
    limit = 1e-5 if dtype == torch.float32 else 1e-1
    assert 0 < report.reference.original.max_abs < limit


def _tensor_state(model, conversion):
    """Every parameter, buffer and grad: identity, storage, dtype, device, flag."""
    modules = [model, *conversion.rewrite.originals.values()]
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    return [
        (id(t), t.data_ptr(), t.dtype, t.device, t.requires_grad)
        for t in [*tensors, *grads]
    ]


def test_the_float64_reference_warns_about_dropout_off_the_cpu(monkeypatch):
    model, conversion, x = _converted(atoms=DEPTH)
    model.train()

    def stop(*args):
        raise InterruptedError("stopped before the runs")

    verify_module = importlib.import_module("masasurgery.verify")
    monkeypatch.setattr(verify_module, "_runs", stop)
    # Pretend a GPU is there: the warning is decided before anything runs
    monkeypatch.setattr(verify_module, "_run_device", lambda m, d: torch.device(d))
    with (
        pytest.warns(MasaWarning, match="dropout draws other masks"),
        pytest.raises(InterruptedError),
    ):
        masasurgery.verify(model, conversion, x, device="cuda", reference_float64=True)


# ---------------------------------------------------------------------------
# The user's model comes back as it was, also when a run raises


@pytest.mark.parametrize("failing_run", [1, 2, 3, 4])
def test_everything_is_restored_when_a_run_raises(failing_run):
    model, conversion, x = _converted()
    model.train()
    model.blocks[1].attn.eval()
    model.head.weight.requires_grad_(False)
    replacements = dict(conversion.rewrite.replacements)
    before = _tensor_state(model, conversion)
    runs = []

    def fail(module, args):
        runs.append(1)
        model.cls_token.requires_grad_(False)  # a forward that changes flags
        if len(runs) == failing_run:
            raise RuntimeError(f"run {failing_run} failed")

    handle = model.blocks[2].register_forward_pre_hook(fail)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with pytest.raises(RuntimeError, match=f"run {failing_run} failed"):
            masasurgery.verify(
                model, conversion, x, device="cpu", reference_float64=True
            )
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.mha.get_fastpath_enabled() is False
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.mha.set_fastpath_enabled(True)

    assert model.training and model.blocks[1].training
    assert not model.blocks[1].attn.training and model.blocks[1].mlp.training
    assert not model.head.weight.requires_grad and model.cls_token.requires_grad
    assert _tensor_state(model, conversion) == before
    assert all(model.get_submodule(t) is m for t, m in replacements.items())


# ---------------------------------------------------------------------------
# Memory: never a second copy of the model


def test_verification_never_copies_the_model(monkeypatch):
    model, conversion, x = _converted()
    projections = sum(
        p.numel() for m in conversion.rewrite.originals.values() for p in m.parameters()
    )
    copied = []
    deepcopy = copy.deepcopy

    def guarded(obj, memo=None, *args):
        if memo is None and isinstance(obj, nn.Module):
            assert obj is not model, "verify deep-copied the whole model"
            copied.append(sum(p.numel() for p in obj.parameters()))
        return deepcopy(obj, memo, *args)

    monkeypatch.setattr(copy, "deepcopy", guarded)
    report = masasurgery.verify(
        model, conversion, x, device="cpu", reference_float64=True
    )
    assert report.passed
    # Only the original projections are copied, to hold the fitted weights
    assert 0 < sum(copied) <= projections


# ---------------------------------------------------------------------------
# bfloat16 on the CPU, at the bfloat16 row of the tolerance table


@pytest.mark.parametrize("atoms", range(1, DEPTH + 1))
def test_bfloat16_rewrite_is_exact_for_every_number_of_atoms(atoms):
    model = tiny_vit(depth=DEPTH).to(torch.bfloat16)
    x = image_batch().to(torch.bfloat16)
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.tolerance == tolerance_for(torch.bfloat16, "cpu")
    assert report.dtype == "bfloat16" and report.rewrite_exact
    assert report.passed and report.lossless == (atoms == DEPTH)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------------------
# Part 1 on more timm ViTs, for atoms = 1 .. L

TIMM_VITS = [
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_tiny_patch16_224", {"qk_norm": True, "qkv_bias": False}),
    ("vit_small_patch14_reg4_dinov2", {"patch_size": 14, "img_size": 28}),
]


@pytest.mark.parametrize("atoms", [1, 2, 3])
@pytest.mark.parametrize(("name", "kwargs"), TIMM_VITS, ids=[n for n, _ in TIMM_VITS])
def test_timm_vits_rewrite_is_exact_for_every_number_of_atoms(name, kwargs, atoms):
    model = tiny_vit(name, depth=3, **kwargs)
    x = image_batch(kwargs.get("img_size", 32))
    conversion = masasurgery.convert(model, atoms=atoms, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    assert report.rewrite_exact and report.passed
    assert report.lossless == (atoms == 3)


def test_a_conversion_used_with_another_model_is_refused():
    model, conversion, x = _converted()
    other = tiny_vit(depth=DEPTH)
    with pytest.raises(masasurgery.ConversionMismatchError, match="does not belong"):
        masasurgery.verify(other, conversion, x)


@pytest.mark.parametrize(
    ("device", "message"),
    [("bogus", "must be a torch device"), ("cuda", "CUDA is not available")],
)
def test_bad_devices_are_config_errors(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model, conversion, x = _converted()
    with pytest.raises(masasurgery.ConfigError, match=message):
        masasurgery.verify(model, conversion, x, device=device)


def test_inputs_the_model_rejects_are_named_and_nothing_changes():
    model, conversion, x = _converted()
    qkv = model.blocks[0].attn.qkv
    with pytest.raises(
        masasurgery.ModelRunError, match="failed on the example inputs"
    ) as e:
        masasurgery.verify(model, conversion, torch.randn(2, 3, 16, 16), device="cpu")
    assert model.blocks[0].attn.qkv is qkv and not model.training
    # timm's message ends in a full stop, and ours does not add another
    assert "doesn't match model (32). Check" in str(e.value)


def test_verify_refuses_what_is_not_a_model():
    _, conversion, x = _converted()
    with pytest.raises(ConfigError, match="expected a torch.nn.Module as the model"):
        masasurgery.verify("vit_tiny_patch16_224", conversion, x)


def test_one_by_one_conv_projections_are_checked_per_output_channel():
    from custom_models import ChannelsFirst

    model = torch.nn.Sequential(ChannelsFirst(16), ChannelsFirst(16)).eval()
    x = torch.randn(2, 16, 4, 4)
    conversion = masasurgery.convert(model, atoms=1, example_inputs=x, verify=False)
    report = masasurgery.verify(model, conversion, x, device="cpu")
    outputs = [c for c in report.layer_checks if c.check == "output"]
    assert outputs and all(c.passed for c in outputs)
