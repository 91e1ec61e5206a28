"""The Lee news corpus: 300 real news articles shipped inside the ``gensim`` wheel.

``gensim`` bundles ``test/test_data/lee_background.cor`` (Australian Broadcasting
Corporation news from 2001 collected by Lee, Pincombe and Welsh, one article per
line). It is small, real English text that installs from PyPI, which makes it a
calibration and evaluation set for language models and sentence encoders.

Only the data file is read: ``gensim`` itself is never imported (its dependencies
are not needed), so install it with ``--no-deps``.

The file repeats 7 of its articles word for word, so the split into calibration
and held-out articles works on the 293 distinct ones, in file order: distinct
article ``i`` is held out when ``i % held_out_every == 0``. The two sets never
share an article.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from masasurgery.errors import ConfigError
from masasurgery.zoo.dinov2_onnx import ZooWeightsNotFound

__all__ = [
    "LeeSplit",
    "lee_articles",
    "lee_path",
    "lee_sentences",
    "lee_split",
    "split_sentences",
]

_PACKAGE = "gensim"
_RELPATH = Path("test") / "test_data" / "lee_background.cor"
_INSTALL_HINT = "pip install --no-deps gensim==4.4.0"
_NUM_ARTICLES = 300

# A sentence ends at . ! or ? (maybe closed by a quote) followed by a space and
# a capital letter or an opening quote; titles such as "Mr." do not end one.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])")
_TITLES = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sen.", "Gen.", "Prof.")


@dataclass(frozen=True)
class LeeSplit:
    """The articles of the corpus in two disjoint sets.

    Attributes:
        calibration: Articles to fit or calibrate on.
        held_out: Articles to evaluate on, never used for calibration.
    """

    calibration: tuple[str, ...]
    held_out: tuple[str, ...]


def lee_path() -> Path:
    """Locate ``lee_background.cor`` inside the installed ``gensim`` package.

    The package is found with ``importlib.util.find_spec`` and is not imported.

    Raises:
        ZooWeightsNotFound: ``gensim`` or the file is missing (an ImportError).

    Example:
        >>> lee_path().name
        'lee_background.cor'
    """
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / _RELPATH
        if path.is_file():
            return path
    raise ZooWeightsNotFound(
        f"Expected the package {_PACKAGE!r} (PyPI: gensim) with {_RELPATH}, got "
        f"{'no package' if spec is None else roots}. Install it with: "
        f"{_INSTALL_HINT}"
    )


def lee_articles() -> tuple[str, ...]:
    """The 300 articles of the corpus, in file order, whitespace-trimmed.

    Raises:
        ZooWeightsNotFound: ``gensim`` is not installed.

    Example:
        >>> articles = lee_articles()
        >>> len(articles), articles[0].split()[:3]
        (300, ['Hundreds', 'of', 'people'])
    """
    return _read_articles(str(lee_path()))


def lee_split(held_out_every: int = 5) -> LeeSplit:
    """Split the articles into calibration and held-out sets, deterministically.

    Args:
        held_out_every: Article ``i`` is held out when ``i % held_out_every == 0``;
            ``i`` counts distinct articles (the file repeats 7 of its 300).
            The default holds out 59 articles and keeps 234 for calibration.

    Returns:
        The two disjoint sets of articles.

    Raises:
        ConfigError: ``held_out_every`` is not an integer of at least 2.

    Example:
        >>> split = lee_split()
        >>> len(split.calibration), len(split.held_out)
        (234, 59)
    """
    if (
        isinstance(held_out_every, bool)
        or not isinstance(held_out_every, int)
        or held_out_every < 2
    ):
        raise ConfigError(
            f"Expected held_out_every to be an int >= 2, got {held_out_every!r}. "
            "Use e.g. 5 to hold out one article in five."
        )
    articles = tuple(dict.fromkeys(lee_articles()))  # distinct, in file order
    return LeeSplit(
        calibration=tuple(a for i, a in enumerate(articles) if i % held_out_every != 0),
        held_out=tuple(a for i, a in enumerate(articles) if i % held_out_every == 0),
    )


def split_sentences(text: str) -> list[str]:
    """Cut running text into sentences at ``.``, ``!`` or ``?`` before a capital.

    Titles such as ``Mr.`` do not end a sentence. The rule is simple and meant
    for news prose; it is not a general sentence tokenizer.

    Example:
        >>> split_sentences('Mr. Smith left. "It rained," he said! "Sun." Then.')
        ['Mr. Smith left.', '"It rained," he said!', '"Sun."', 'Then.']
    """
    pieces = _SENTENCE_END.split(text.strip())
    sentences: list[str] = []
    for piece in pieces:
        if sentences and sentences[-1].endswith(_TITLES):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return [s.strip() for s in sentences if s.strip()]


def lee_sentences(articles: Sequence[str], min_words: int = 4) -> list[str]:
    """The sentences of ``articles``, in order, keeping those of ``min_words`` or more.

    Example:
        >>> sentences = lee_sentences(lee_split().held_out)
        >>> len(sentences) > 500, all(len(s.split()) >= 4 for s in sentences)
        (True, True)
    """
    return [
        s
        for article in articles
        for s in split_sentences(article)
        if len(s.split()) >= min_words
    ]


@functools.lru_cache(maxsize=1)
def _read_articles(path: str) -> tuple[str, ...]:
    """Read the file once per process; one article per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    articles = tuple(line.strip() for line in lines if line.strip())
    if len(articles) != _NUM_ARTICLES:
        raise ZooWeightsNotFound(
            f"Expected {_NUM_ARTICLES} articles (one per line) in {path}, got "
            f"{len(articles)}. Reinstall the corpus with: {_INSTALL_HINT}"
        )
    return articles
