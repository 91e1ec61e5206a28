"""heal: distil the original into the converted model, and put everything back."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import same_state, snapshot, tiny_vit
from torch import nn

import masasurgery
from masasurgery.errors import (
    ConfigError,
    ConversionMismatchError,
    MasaWarning,
    ModelRunError,
)
from masasurgery.heal import heal

# Narrower than vit_tiny: each heal step takes milliseconds
SMALL = {"embed_dim": 48, "num_heads": 3}


def _batches(count: int, seed: int, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(count)]


@pytest.fixture
def pair():
    """A tiny ViT converted at atoms < depth, and a copy of its original."""
    model = tiny_vit(depth=3, **SMALL)
    original = copy.deepcopy(model)
    conversion = masasurgery.convert(model, atoms=1, verify=False)
    return model, original, conversion


def _relative_error(model, original, batches) -> float:
    with torch.no_grad():
        error = sum((model(x) - original(x)).pow(2).sum() for x in batches)
        norm = sum(original(x).pow(2).sum() for x in batches)
    return (error / norm).sqrt().item()


def test_heal_lowers_the_held_out_error(pair):
    model, original, _ = pair
    train, test = _batches(16, seed=1), _batches(2, seed=2)
    before = _relative_error(model, original, test)

    report = heal(
        model, original, train, steps=16, lr=1e-3, eval_data=test, progress=False
    )

    # The report's figures are the ones measured independently
    after = _relative_error(model, original, test)
    assert after < 0.9 * before
    assert report.before.relative_error == pytest.approx(before, rel=1e-4)
    assert report.after.relative_error == pytest.approx(after, rel=1e-4)
    assert report.after.cosine > report.before.cosine
    assert report.steps == 16 and report.stop_reason == "steps"
    assert not report.stopped_early
    assert len(report.losses) == 16 and report.best_step == report.after.step


def test_the_conversion_record_teaches_without_a_copy(pair):
    model, original, conversion = pair
    replacements = dict(conversion.rewrite.replacements)
    originals = {k: snapshot(m) for k, m in conversion.rewrite.originals.items()}
    test = _batches(2, seed=2)
    before = _relative_error(model, original, test)

    report = heal(
        model, conversion, _batches(8, seed=1), steps=8, lr=1e-3,
        eval_data=test, progress=False,
    )  # fmt: skip

    # The record's teacher is the original model, the replacements are back
    assert report.before.relative_error == pytest.approx(before, rel=1e-4)
    assert report.after.relative_error < report.before.relative_error
    assert report.after.relative_error == pytest.approx(
        _relative_error(model, original, test), rel=1e-4
    )
    for target, module in replacements.items():
        assert model.get_submodule(target) is module
    for target, state in originals.items():
        assert same_state(conversion.rewrite.originals[target], state)


def test_patience_stops_early_and_keeps_the_best_state(pair):
    model, original, _ = pair
    state = snapshot(model)

    # Gradient ascent: every evaluation is worse than the one before healing
    report = heal(
        model, original, _batches(4, seed=1), steps=50, eval_data=_batches(1, 2),
        eval_every=1, patience=2, progress=False,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-2, maximize=True),
    )  # fmt: skip

    assert report.stop_reason == "patience" and report.stopped_early
    assert report.steps == 2 and report.best_step == 0
    assert [e.step for e in report.evals] == [0, 1, 2]
    assert same_state(model, state)


def test_modes_flags_and_grads_come_back(pair):
    model, original, _ = pair
    model.train()
    model.blocks[1].eval()
    model.head.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(m.training))

    heal(model, original, _batches(2, seed=1), steps=2, progress=False)

    # The student ran in eval mode (dropout off); everything is back
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert original.training is False


def test_dropout_runs_the_student_in_train_mode(pair):
    model, original, _ = pair
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(m.training))

    heal(model, original, _batches(2, seed=1), steps=2, dropout=True, progress=False)

    assert seen == [True, True]
    assert not model.training


def test_shared_trains_only_the_dictionaries_and_projections(pair):
    model, original, _ = pair
    before = snapshot(model)

    report = heal(model, original, _batches(2, seed=1), steps=2, lr=1e-2,
                  progress=False)  # fmt: skip

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("masa.") or ".attn." in k for k in changed), (
        changed
    )
    assert "head.weight" not in changed
    assert report.trained_parameters == sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("masa.") or ".attn." in name
    )


def test_all_trains_every_parameter(pair):
    model, original, _ = pair
    before = snapshot(model)

    heal(model, original, _batches(2, seed=1), steps=2, lr=1e-2, train="all",
         progress=False)  # fmt: skip

    assert not torch.equal(before["head.weight"], model.head.weight)
    assert not torch.equal(
        before["blocks.0.mlp.fc1.weight"], model.blocks[0].mlp.fc1.weight
    )


def test_a_one_shot_iterator_ends_the_heal(pair):
    model, original, _ = pair
    report = heal(model, original, iter(_batches(3, seed=1)), steps=10, progress=False)
    assert report.steps == 3 and report.stop_reason == "data"


def test_a_list_is_cycled_and_max_seconds_stops(pair):
    model, original, _ = pair
    report = heal(model, original, _batches(2, seed=1), steps=5, progress=False)
    assert report.steps == 5

    report = heal(model, original, _batches(2, seed=1), steps=5, max_seconds=1e-9,
                  progress=False)  # fmt: skip
    assert report.steps == 1 and report.stop_reason == "time"


def test_a_loss_that_diverges_stops_and_restores(pair):
    model, original, _ = pair
    state = snapshot(model)
    calls = []

    def loss(student, teacher):
        calls.append(1)
        value = (student - teacher).pow(2).mean()
        return value if len(calls) < 3 else value * float("nan")

    with pytest.warns(MasaWarning, match="Lower lr"):
        report = heal(model, original, _batches(4, seed=1), steps=10, loss=loss,
                      progress=False)  # fmt: skip

    assert report.stop_reason == "diverged" and report.steps == 2
    assert same_state(model, state)


class _Other(nn.Module):
    """Another architecture: a convolution and a classifier of 7 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(64, 7)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _bad_calls(model, original, conversion):
    data, test = _batches(2, seed=1), _batches(1, seed=2)
    return {
        "steps=0": (ConfigError, "steps must be", lambda: heal(
            model, original, data, steps=0)),
        "empty data": (ConfigError, "no batch", lambda: heal(
            model, original, [], steps=2)),
        "single tensor": (ConfigError, "wrap a single batch", lambda: heal(
            model, original, data[0], steps=2)),
        "other architecture": (ConfigError, r"\(4, 7\)", lambda: heal(
            model, _Other(), data, steps=2, eval_data=test)),
        "shape mismatch": (ConfigError, "same shape", lambda: heal(
            model, tiny_vit(depth=3, num_classes=10, **SMALL), data, steps=2)),
        "teacher is student": (ConfigError, "shares trainable", lambda: heal(
            model, model, data, steps=2)),
        "teacher fails": (ModelRunError, "teacher", lambda: heal(
            model, nn.Linear(5, 5), data, steps=2)),
        "patience alone": (ConfigError, "needs eval_data", lambda: heal(
            model, original, data, steps=2, patience=1)),
        "all with record": (ConfigError, "separate teacher", lambda: heal(
            model, conversion, data, steps=2, train="all")),
        "unknown loss": (ConfigError, "unknown loss", lambda: heal(
            model, original, data, steps=2, loss="l1")),
        "not a teacher": (ConfigError, "teacher must be", lambda: heal(
            model, "original", data, steps=2)),
    }  # fmt: skip


BAD = list(_bad_calls(None, None, None))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_and_leaves_the_model_unchanged(pair, case):
    model, original, conversion = pair
    error, match, call = _bad_calls(model, original, conversion)[case]
    state = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    with pytest.raises(error, match=match):
        call()

    assert same_state(model, state)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_a_released_record_cannot_teach(pair):
    model, _, conversion = pair
    conversion.release_originals()
    with pytest.raises(ConversionMismatchError, match="released"):
        heal(model, conversion, _batches(1, seed=1), steps=1)


def test_an_unconverted_model_needs_train_all():
    model, original = tiny_vit(depth=2, **SMALL), tiny_vit(depth=2, **SMALL)
    with pytest.raises(ConfigError, match="convert it first"):
        heal(model, original, _batches(1, seed=1), steps=1)


def test_progress_false_prints_nothing(pair, capsys):
    model, original, _ = pair
    heal(model, original, _batches(2, seed=1), steps=2, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    heal(model, original, _batches(2, seed=1), steps=2, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "heal" in captured.err


def test_on_eval_sees_every_point_and_the_report_prints(pair):
    model, original, _ = pair
    points = []
    report = heal(
        model, original, _batches(4, seed=1), steps=4, eval_every=2,
        eval_data=_batches(1, seed=2), progress=False, on_eval=points.append,
    )  # fmt: skip
    assert [p.step for p in points] == [0, 2, 4] == [e.step for e in report.evals]
    assert "rel. error" in str(report) and report.to_dict()["steps"] == 4


def test_keyword_batches_with_a_mask_heal_a_transformers_model():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).eval()
    original = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, 100, (4, 12), generator=generator)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[:, 8:] = 0  # padding
        return {"input_ids": ids, "attention_mask": mask}

    train, test = [batch() for _ in range(8)], [batch()]
    conversion = masasurgery.convert(model, atoms=1, example_inputs=test[0],
                                     verify=False)  # fmt: skip

    report = heal(model, conversion, train, steps=8, lr=1e-3, loss="cosine",
                  eval_data=test, progress=False)  # fmt: skip

    # last_hidden_state is matched, on the 8 real tokens of each row only
    assert report.after.cosine > report.before.cosine
    assert 0 < report.after.loss < report.before.loss
    with torch.no_grad():
        states = model(**test[0]).last_hidden_state[:, :8]
        expected = original(**test[0]).last_hidden_state[:, :8]
    error = (states - expected).norm() / expected.norm()
    assert report.after.relative_error == pytest.approx(error.item(), rel=1e-4)
