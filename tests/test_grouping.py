"""Grouping from data: cuts, the error criterion, and block divergences."""

import pytest
import torch
from conftest import image_batch, tiny_vit
from transformers import GPT2Config, GPT2LMHeadModel

from masasurgery.analyze import analyze
from masasurgery.errors import ConfigError
from masasurgery.grouping import (
    block_divergences,
    regroup,
    segment_by_divergence,
    segment_by_error,
)


def test_divergence_cuts_at_the_largest_jumps_keeping_runs_of_two():
    cut = segment_by_divergence([0.1, 3.0, 0.2, 0.1, 2.0, 0.1, 0.1], runs=3)
    assert cut.bounds == [(0, 2), (2, 5), (5, 8)]
    # A jump next to the edge would leave a run of one: the next best is taken
    cut = segment_by_divergence([9.0, 0.1, 0.1, 1.0, 0.1], runs=2)
    assert cut.bounds == [(0, 4), (4, 6)]
    with pytest.raises(ConfigError, match="runs must be in 1..3"):
        segment_by_divergence([0.1] * 6, runs=4)


def test_error_criterion_scores_the_energy_lost():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 40, generator=g, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True)
    gram = rows @ rows.T
    whole = segment_by_error([gram, gram], atoms=3)
    kept = torch.linalg.eigvalsh(gram).flip(0)[:3].sum()
    assert whole.bounds == [(0, 6)] and whole.atoms == [3]
    assert whole.score == pytest.approx(2 * (6 - kept.item()), rel=1e-5)
    with pytest.raises(ConfigError, match="atoms must be in 1..6"):
        segment_by_error([gram], atoms=7)


def test_regroup_numbers_runs_in_order():
    model = tiny_vit(depth=6)
    groups = analyze(model).groups
    cut = segment_by_divergence([0.1, 0.1, 5.0, 0.1, 0.1], runs=2)
    runs = regroup(groups, {0: cut})
    assert [g.index for g in runs] == [0, 1]
    assert [g.blocks for g in runs] == [
        ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"],
        ["blocks.3.attn", "blocks.4.attn", "blocks.5.attn"],
    ]


def test_block_divergences_cosine_for_encoders_and_logit_lens_for_lms():
    model = tiny_vit(depth=3)
    distances = block_divergences(
        model, ["blocks.0", "blocks.1", "blocks.2"], [image_batch()]
    )
    assert len(distances) == 2 and all(0.0 <= d <= 2.0 for d in distances)

    config = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    lm = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    distances = block_divergences(lm, ["transformer.h.0", "transformer.h.1"], [ids])
    assert len(distances) == 1 and distances[0] >= 0.0
