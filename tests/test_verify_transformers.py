"""Part 1 and part 2 of the verifier on small transformers models (BERT, GPT-2).

Random weights, tiny configs: three blocks of width 32, four heads.
"""

import pytest
import torch

import masasurgery
from masasurgery.tolerances import tolerance_for

transformers = pytest.importorskip("transformers")

DEPTH = 3
VOCAB = 100


def _bert(**kwargs):
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        **kwargs,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2(**kwargs):
    config = transformers.GPT2Config(
        n_embd=32, n_layer=DEPTH, n_head=4, vocab_size=VOCAB, **kwargs
    )
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"bert": _bert, "gpt2": _gpt2}


def _inputs():
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second sequence is padded
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("atoms", range(1, DEPTH + 1))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_rewrite_is_exact_for_every_number_of_atoms(name, atoms):
    model, inputs = MODELS[name](), _inputs()
    conversion = masasurgery.convert(
        model, atoms=atoms, example_inputs=inputs, verify=False
    )
    report = masasurgery.verify(model, conversion, inputs, device="cpu")
    assert report.rewrite_exact and report.passed, report.failures
    assert report.lossless == (atoms == DEPTH)
    assert {c.check for c in report.layer_checks} >= {"weight", "bias"}


@pytest.mark.parametrize(("name", "task"), [("bert", "classification"), ("gpt2", "lm")])
def test_task_figures_are_told_from_the_logits(name, task):
    model, inputs = MODELS[name](), _inputs()
    conversion = masasurgery.convert(model, atoms=DEPTH, example_inputs=inputs)
    report = conversion.verification
    assert report.task == task and report.approximation.top1_agreement == 1.0
    if task == "lm":
        assert report.approximation.kl < 1e-10


def test_gpt2_lm_figures_measure_a_lossy_conversion():
    model, inputs = _gpt2(), _inputs()
    conversion = masasurgery.convert(
        model, atoms=1, example_inputs=inputs, verify=False
    )
    report = masasurgery.verify(
        model, conversion, inputs, device="cpu", reference_float64=True
    )
    assert report.rewrite_exact and report.task == "lm"
    assert report.approximation.kl > 0 and report.reference.original.kl < 1e-8
    assert 0 <= report.approximation.top1_agreement <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_mode_with_dropout_verifies_losslessly(name):
    model, inputs = MODELS[name]().train(), _inputs()
    conversion = masasurgery.convert(
        model, atoms=DEPTH, example_inputs=inputs, verify=False
    )
    report = masasurgery.verify(model, conversion, inputs, device="cpu")
    assert report.passed and report.settings["training"] is True
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_rewrite_is_exact(name):
    model, inputs = MODELS[name]().to(torch.bfloat16), _inputs()
    conversion = masasurgery.convert(
        model, atoms=DEPTH, example_inputs=inputs, verify=False
    )
    report = masasurgery.verify(model, conversion, inputs, device="cpu")
    assert report.tolerance == tolerance_for(torch.bfloat16, "cpu")
    assert report.passed
