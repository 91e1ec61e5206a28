"""distill: the output tensor, the losses, and the fidelity figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    CausalLMOutput,
)

from masasurgery.distill import FidelitySum, distill_loss, output_tensor
from masasurgery.errors import ConfigError


def test_output_tensor_picks_by_the_rule():
    states, pooled, logits = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 9)
    hf = BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=pooled)
    assert output_tensor(hf) is states
    assert output_tensor(CausalLMOutput(logits=logits)) is logits
    assert output_tensor({"logits": logits, "x": states}) is logits
    assert output_tensor((None, pooled, states)) is pooled
    assert output_tensor(states) is states


def test_output_tensor_without_a_tensor_says_what_to_pass():
    with pytest.raises(ConfigError, match="select="):
        output_tensor(("text", 3))


def test_mse_and_cosine_match_torch():
    student, teacher = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    mse = distill_loss("mse")(student, teacher, None)
    cosine = distill_loss("cosine")(student, teacher, None)
    torch.testing.assert_close(mse, F.mse_loss(student, teacher))
    expected = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    torch.testing.assert_close(cosine, expected)


def test_kl_is_hintons_scaled_divergence():
    student, teacher = torch.randn(2, 7), torch.randn(2, 7)
    kl = distill_loss("kl", temperature=2.0)(student, teacher, None)
    expected = F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1),
        log_target=True, reduction="batchmean",
    ) * 4  # fmt: skip
    torch.testing.assert_close(kl, expected)
    assert distill_loss("kl")(teacher, teacher, None).abs().item() < 1e-6


def test_the_mask_leaves_padded_positions_out():
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    garbage = student.clone()
    garbage[mask == 0] = 1e6

    fn = distill_loss("mse")
    kept = torch.cat([(student - teacher)[0, :3], (student - teacher)[1, :2]])
    torch.testing.assert_close(fn(garbage, teacher, mask), kept.pow(2).mean())


def test_a_callable_loss_gets_student_and_teacher():
    fn = distill_loss(lambda s, t: (s - t).abs().sum())
    assert fn(torch.ones(3), torch.zeros(3), torch.ones(3)).item() == 3.0


@pytest.mark.parametrize(
    "loss, temperature, match",
    [("huber", 1.0, "unknown loss"), ("kl", 0.0, "temperature")],
)
def test_bad_loss_options_raise(loss, temperature, match):
    with pytest.raises(ConfigError, match=match):
        distill_loss(loss, temperature)


def test_fidelity_sums_over_batches_equal_one_batch():
    student, teacher = torch.randn(6, 3, 8), torch.randn(6, 3, 8)
    whole, parts = FidelitySum(), FidelitySum()
    whole.add(student, teacher, None)
    parts.add(student[:2], teacher[:2], None)
    parts.add(student[2:], teacher[2:], None)

    expected = ((student - teacher).norm() / teacher.norm()).item()
    assert whole.result().relative_error == pytest.approx(expected, rel=1e-6)
    assert parts.result().relative_error == pytest.approx(expected, rel=1e-6)
    assert parts.result().cosine == pytest.approx(whole.result().cosine, rel=1e-6)
    assert whole.result().positions == 18
