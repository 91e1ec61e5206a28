"""Sensitivity: the readout's gradient statistics at every projection's output."""

import pytest
import torch
from conftest import same_state, snapshot, tiny_llama, tiny_vit
from torch import nn

from masasurgery.errors import ConfigError, FitError, MasaWarning, ModelRunError
from masasurgery.sensitivity import collect_sensitivity
from masasurgery.whiten import sensitivity_whitening


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval()


def test_g_is_the_sum_of_the_probed_gradients_computed_by_hand():
    model, x = _mlp(), torch.randn(4, 6, 5)
    s = collect_sensitivity(model, [x], ["0", "2"], probes=3, seed=7)

    # The same probes, by hand: g at the last layer is the probe itself
    generator = torch.Generator().manual_seed(7)
    expected_last, expected_first = 0, 0
    hidden = model[0](x)
    for _ in range(3):
        u = torch.randn((4, 6, 3), generator=generator)
        expected_last = expected_last + u.reshape(-1, 3).T @ u.reshape(-1, 3)
        g = (u @ model[2].weight) * (1 - torch.tanh(hidden) ** 2)
        g = g.reshape(-1, 7).detach()
        expected_first = expected_first + g.T @ g
    torch.testing.assert_close(s["2"].float(), expected_last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["0"].float(), expected_first, rtol=1e-5, atol=1e-5)
    assert s.probes == 3 and s.loss == "mse" and s["0"].dtype == torch.float64


def test_the_model_is_left_as_it_was_and_gets_no_gradients():
    model = tiny_vit(depth=2)
    state = snapshot(model)
    s = collect_sensitivity(
        model, [torch.randn(2, 3, 32, 32)], ["blocks.0.attn.qkv", "blocks.1.attn.proj"]
    )
    assert same_state(model, state)
    assert all(p.grad is None for p in model.parameters())
    assert s["blocks.0.attn.qkv"].shape == (3 * 192, 3 * 192)


def test_logits_get_fisher_probes_that_reach_every_layer():
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=16, vocab=40, mlp=32)
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in "qo"]
    targets = [t + "_proj" for t in targets]
    s = collect_sensitivity(model, [{"input_ids": torch.randint(40, (2, 9))}], targets)
    assert s.loss == "kl"
    assert all(s[t].diagonal().min() > 0 for t in targets)


def test_a_custom_readout_only_weighs_what_it_reads():
    model, x = _mlp(), torch.randn(2, 5)

    # Reading output 0 alone: the last layer's other rows get no gradient
    s = collect_sensitivity(model, [x], ["2"], readout=lambda out, b: out[:, :1])
    assert s["2"][0, 0] > 0
    assert s["2"][1:, 1:].abs().max() == 0


def test_bad_options_and_targets_say_what_to_do():
    model, x = _mlp(), torch.randn(2, 5)
    with pytest.raises(ConfigError, match="loss must be one of"):
        collect_sensitivity(model, [x], ["0"], loss="l1")
    with pytest.raises(ConfigError, match="probes must be a positive integer"):
        collect_sensitivity(model, [x], ["0"], probes=0)
    with pytest.raises(ConfigError, match="at least one batch"):
        collect_sensitivity(model, [], ["0"])
    with pytest.raises(ConfigError, match="Tanh"):
        collect_sensitivity(model, [x], ["1"])
    mha = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.raises(NotImplementedError, match="metric='output'"):
        collect_sensitivity(mha, [x], ["0"])


def test_the_whitening_is_the_kfac_error_and_refuses_a_dead_output():
    x, g = torch.randn(50, 4).double(), torch.randn(20, 3).double()
    e = torch.randn(3, 4).double()
    w = sensitivity_whitening(x.T @ x, 50, g.T @ g, 20, damping=0.0)
    kfac = torch.trace(g.T @ g @ e @ x.T @ x @ e.T) / 50 / 20
    torch.testing.assert_close(w.apply(e).square().sum(), kfac)
    torch.testing.assert_close(w.unapply(w.apply(e)), e)
    with pytest.raises(FitError, match="no gradient reached"):
        sensitivity_whitening(x.T @ x, 50, torch.zeros(3, 3), 20)


def test_a_bad_readout_or_model_run_says_what_to_return():
    model, x = _mlp(), torch.randn(2, 5)
    with pytest.raises(ConfigError, match="floating-point tensor"):
        collect_sensitivity(model, [x], ["0"], readout=lambda out, b: None)
    with pytest.raises(ConfigError, match="does not depend on the model"):
        collect_sensitivity(model, [x], ["0"], readout=lambda out, b: out.detach())
    with pytest.raises(ConfigError, match="classes on the last axis"):
        collect_sensitivity(
            model, [x], ["0"], readout=lambda out, b: out.sum(), loss="kl"
        )
    vit = tiny_vit(depth=1)
    with pytest.raises(ModelRunError, match="calibration batch 0"):
        collect_sensitivity(vit, [torch.randn(1, 3, 16, 16)], ["blocks.0.attn.qkv"])
    with pytest.raises(FitError, match="inf or nan"):
        sensitivity_whitening(torch.eye(3), 3, torch.full((2, 2), float("inf")), 1)


def test_train_mode_is_warned_about():
    model = _mlp().train()
    with pytest.warns(MasaWarning, match="train mode"):
        collect_sensitivity(model, [torch.randn(2, 5)], ["0"])


def test_passes_bounded_by_max_bytes_give_the_same_g_from_disk(tmp_path):
    from masasurgery.calibrate import Calibration, collect_statistics

    model = tiny_vit(depth=2)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    targets = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")]
    whole = collect_sensitivity(model, batches, targets, probes=2)

    # qkv's G is 576^2 * 8 bytes: one projection per pass at most
    bound = 576**2 * 8 + 192**2 * 8
    split = collect_sensitivity(
        model, batches, targets, probes=2, cache_dir=tmp_path, max_bytes=bound
    )
    assert split.gtg == {} and split.stored == targets
    assert (split.probes, split.loss) == (whole.probes, whole.loss)
    for target in targets:
        torch.testing.assert_close(split[target], whole[target], rtol=1e-9, atol=0)

    # The input statistics may share the folder; each reads only its own files
    collect_statistics(model, batches, targets, cache_dir=tmp_path)
    assert sorted(Calibration.load(tmp_path).targets) == sorted(targets)


def test_a_bound_says_what_it_needs():
    model = tiny_vit(depth=1)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="pass cache_dir= as well"):
        collect_sensitivity(model, [x], ["blocks.0.attn.qkv"], max_bytes=10**9)
    with pytest.raises(ConfigError, match="raise max_bytes to at least 2654208"):
        collect_sensitivity(
            model, [x], ["blocks.0.attn.qkv"], max_bytes=1000, cache_dir="unused"
        )
    with pytest.raises(ConfigError, match="one-shot iterator"):
        collect_sensitivity(
            model,
            iter([x]),
            ["blocks.0.attn.qkv", "blocks.0.attn.proj"],
            max_bytes=576**2 * 8,
            cache_dir="unused",
        )
