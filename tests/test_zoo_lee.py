"""The Lee news corpus read from the gensim wheel: articles, split, sentences."""

import importlib.util

import pytest

from masasurgery.errors import ConfigError, MasaError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="gensim is not installed (the Lee corpus): pip install --no-deps gensim",
)


def test_the_corpus_has_300_articles_of_real_prose():
    from masasurgery.zoo.lee import lee_articles

    articles = lee_articles()
    assert len(articles) == 300
    assert all(len(a.split()) > 40 for a in articles)
    assert len(set(articles)) == 293  # the file repeats 7 articles


def test_the_split_is_disjoint_deterministic_and_covers_every_article():
    from masasurgery.zoo.lee import lee_articles, lee_split

    split = lee_split()
    assert (len(split.calibration), len(split.held_out)) == (234, 59)
    assert not set(split.calibration) & set(split.held_out)
    assert set(split.calibration) | set(split.held_out) == set(lee_articles())
    assert lee_split() == split
    assert split.held_out[0] == lee_articles()[0]
    assert len(lee_split(held_out_every=3).held_out) == 98


@pytest.mark.parametrize("every", [1, 0, 2.5, True])
def test_a_bad_split_period_is_refused(every):
    from masasurgery.zoo.lee import lee_split

    with pytest.raises(ConfigError, match="held_out_every to be an int >= 2"):
        lee_split(held_out_every=every)


def test_sentences_end_at_full_stops_but_not_after_titles():
    from masasurgery.zoo.lee import split_sentences

    text = 'Dr. Brown spoke. "We won," Mr. Lee said. Was it? Yes! Done.'
    assert split_sentences(text) == [
        "Dr. Brown spoke.",
        '"We won," Mr. Lee said.',
        "Was it?",
        "Yes!",
        "Done.",
    ]
    assert split_sentences("  ") == []


def test_held_out_sentences_come_only_from_held_out_articles():
    from masasurgery.zoo.lee import lee_sentences, lee_split

    split = lee_split()
    held_out = lee_sentences(split.held_out)
    calibration = set(lee_sentences(split.calibration))
    assert len(held_out) > 500 and len(calibration) > 2000
    assert all(len(s.split()) >= 4 for s in held_out)
    # News wires repeat a few stock sentences across articles, but rarely
    assert len(set(held_out) & calibration) < 0.02 * len(held_out)


def test_a_missing_gensim_names_the_install_command(monkeypatch):
    from masasurgery.zoo import lee

    monkeypatch.setattr(lee.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MasaError, match=r"pip install --no-deps gensim") as info:
        lee.lee_path()
    assert isinstance(info.value, ImportError)
