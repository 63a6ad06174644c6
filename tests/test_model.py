"""The drop-in on tiny random Llama, Mistral and Qwen2 models: exactness in dense mode, sparse stats, padding,
convert/revert, torch.compile without recompiles, and clear errors on misuse."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaAttention

import hira
from hira.index.index import refresh_bounds

PROMPT = 150  # tokens: several 16-token blocks, so decode goes through the index
DENSE = hira.HiraConfig(block_size=16, threshold=hira.Fixed(-math.inf), min_context=0, window_tokens=16)
SPARSE = hira.HiraConfig(block_size=16, threshold=hira.TopK(2), min_context=0, window_tokens=16)


def _tiny(family: str):
    common = dict(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if family == "llama":  # GQA ratio 3, as SmolLM2
        return LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **common)).eval()
    if family == "mistral":
        cfg = MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
        return MistralForCausalLM(cfg).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **common)).eval()


def _ids(batch: int = 1, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy(model, ids, steps: int = 12, **kw) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dense_config_matches_unconverted(family):
    model = _tiny(family)
    ids = _ids()
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = _greedy(model, ids)
        hira.convert(model, DENSE)
        cache = hira.HiraCache(model.config, DENSE)
        logits = model(ids, **{hira.CACHE_ARG: cache}).logits
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        assert torch.equal(_greedy(model, ids), ref_tokens)
        # Decode steps read through the index: every block, nothing skipped.
        cache = hira.HiraCache(model.config, DENSE)
        _greedy(model, ids, **{hira.CACHE_ARG: cache})
        assert cache.summary() == {"read_fraction": 1.0, "skip_bound": 0.0}


@torch.no_grad()
def test_min_context_is_chosen_at_prefill():
    """A layer prefilled to fewer than min_context tokens decodes densely (every block, nothing skipped) until its
    next prefill, even past min_context; a prompt of at least min_context tokens decodes with the configured mode."""
    model = hira.convert(_tiny("llama"), SPARSE)
    for min_context, sparse in ((PROMPT + 1, False), (PROMPT, True)):
        config = hira.HiraConfig(block_size=16, threshold=hira.TopK(2), min_context=min_context,
                                 window_tokens=16)
        cache = hira.HiraCache(model.config, config)
        _greedy(model, _ids(), steps=4, **{hira.CACHE_ARG: cache})  # decodes past min_context
        assert all(layer.threshold == (config.threshold if sparse else hira.Dense()) for layer in cache.layers)
        read = cache.summary()["read_fraction"]
        assert read < 0.5 if sparse else read == 1.0


@torch.no_grad()
def test_bounds_are_exact_again_after_dense_steps_and_a_longer_prefill():
    """Decode steps in the dense mode (a prompt below min_context) append without bounds; a later prefill chunk that
    lifts the layer past min_context, with re-clustering off, refreshes every bound before the search runs."""
    config = hira.HiraConfig(block_size=16, threshold=hira.TopK(2), min_context=PROMPT + 30,
                             window_tokens=16, recluster_on_prefill=False)
    model = hira.convert(_tiny("llama"), config)
    steps = 20  # more than a block: the chunk's own append does not recompute every leaf the steps filled
    ids = _ids(length=PROMPT + steps + 40)
    cache = hira.HiraCache(model.config, config)
    model(ids[:, :PROMPT], **{hira.CACHE_ARG: cache})
    for t in range(PROMPT, PROMPT + steps):
        model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache})
    assert all(layer.threshold == hira.Dense() for layer in cache.layers)
    model(ids[:, PROMPT + steps :], **{hira.CACHE_ARG: cache})
    for layer in cache.layers:
        assert layer.threshold == config.threshold
        before = [t.clone() for t in layer.index.tensors()]
        refresh_bounds(layer.index)
        for got, want in zip(layer.index.tensors(), before):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_decode_logits_match_step_by_step():
    model = _tiny("llama")
    ids = _ids(length=PROMPT + 8)
    ref = model(ids).logits[:, PROMPT - 1 :]
    hira.convert(model, DENSE)
    cache = hira.HiraCache(model.config, DENSE)
    out = [model(ids[:, :PROMPT], **{hira.CACHE_ARG: cache}).logits[:, -1:]]
    for t in range(PROMPT, PROMPT + 8):
        out.append(model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache}).logits)
    torch.testing.assert_close(torch.cat(out, 1), ref, atol=1e-4, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    pad=st.sampled_from([0, 5, 37]),
    recluster=st.booleans(),
    deferred=st.booleans(),
)
@torch.no_grad()
def test_chunked_prefill_matches_unconverted(cuts, pad, recluster, deferred):
    """A prompt fed in chunks of any lengths (a chunk of one token is a decode step), a left-padded row in the
    batch, with or without re-clustering after each chunk or once after all: every real position's logits equal
    the unconverted model's over the whole sequence."""
    model = _tiny("llama")
    first = 40
    ids = _ids(batch=2, length=first + sum(cuts))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ref = model(ids, attention_mask=mask).logits
    config = hira.HiraConfig(block_size=16, threshold=hira.Fixed(-math.inf), min_context=0,
                             window_tokens=16, recluster_on_prefill=recluster)
    hira.convert(model, config)
    cache = hira.HiraCache(model.config, config)
    bounds = [0, first] + [first + sum(cuts[: i + 1]) for i in range(len(cuts))]
    out = []
    with cache.deferred_recluster() if deferred else contextlib.nullcontext():
        for a, b in zip(bounds, bounds[1:]):
            out.append(model(ids[:, a:b], attention_mask=mask[:, :b], **{hira.CACHE_ARG: cache}).logits)
    logits = torch.cat(out, 1)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-4, rtol=0)
    assert not any(getattr(layer, "recluster_pending", False) for layer in cache.layers)


@torch.no_grad()
def test_sparse_config_reads_less_and_reports_it():
    model = hira.convert(_tiny("llama"), SPARSE)
    cache = hira.HiraCache(model.config, SPARSE)
    out = _greedy(model, _ids(), **{hira.CACHE_ARG: cache})
    assert out.shape == (1, PROMPT + 12)
    stats = cache.stats()
    assert len(stats) == 2 and all(s is not None for s in stats)
    for s in stats:
        # 2 top blocks + sink block + window blocks out of ceil(161 / 16) = 11 blocks.
        assert 0.0 < s["read_fraction"] < 0.75
        assert 0.0 <= s["skip_bound"] <= 1.0


@torch.no_grad()
def test_batch_with_left_padding_matches_unconverted():
    model = _tiny("llama")
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # row 1 is left-padded: 113 real tokens
    ref = _greedy(model, ids, attention_mask=mask)
    hira.convert(model, DENSE)
    assert torch.equal(_greedy(model, ids, attention_mask=mask), ref)


@torch.no_grad()
def test_convert_revert_convert():
    model = _tiny("llama")
    ids = _ids(length=40)
    ref = model(ids).logits
    original = model.model.layers[0].self_attn
    hira.convert(model, DENSE)
    hira.convert(model, SPARSE)  # converting again only replaces the config
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, hira.HiraAttention) and attn.hira_config is SPARSE
    assert attn.q_proj is original.q_proj  # weights are shared, not copied
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _tiny("llama").parameters())
    assert "threshold=topk(2)" in repr(model)
    hira.revert(model)
    assert model.model.layers[0].self_attn is original and type(original) is LlamaAttention
    torch.testing.assert_close(model(ids).logits, ref)
    hira.convert(model, DENSE)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_compiled_decode_does_not_recompile():
    model = hira.convert(_tiny("llama"), SPARSE)
    compiled = torch.compile(model)
    cache, eager_cache = hira.HiraCache(model.config, SPARSE), hira.HiraCache(model.config, SPARSE)
    ids = _ids()
    tok = compiled(ids, **{hira.CACHE_ARG: cache}).logits[:, -1:].argmax(-1)
    model(ids, **{hira.CACHE_ARG: eager_cache})
    # The prefill runs eagerly inside the compiled model (``HiraLayer._prefill``): a break there, none in decode.
    assert any("disable" in reason for reason in dynamo_utils.counters["graph_break"])
    dynamo_utils.counters["graph_break"].clear()
    graphs = []
    for i in range(30):
        pos = torch.tensor([[PROMPT + i]])
        logits = compiled(tok, **{hira.CACHE_ARG: cache}, position_ids=pos).logits
        if i < 3:  # the compiled step computes what the eager one does
            eager = model(tok, **{hira.CACHE_ARG: eager_cache}, position_ids=pos).logits
            torch.testing.assert_close(logits, eager, atol=1e-4, rtol=0)
        tok = logits[:, -1:].argmax(-1)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    # The first decode step compiles; the second marks the growing cache length dynamic; then nothing.
    assert graphs[2:] == [graphs[2]] * 28, graphs
    assert cache.stats()[0]["read_fraction"] < 1.0


def test_errors_are_clear():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50))
    with pytest.raises(ValueError, match="supports model types.*'gpt2'"):
        hira.convert(gpt2)
    with pytest.raises(ValueError, match="block_size"):
        hira.HiraConfig(block_size=48)
    with pytest.raises(ValueError, match="threshold"):
        hira.HiraConfig(threshold="topk")
    with pytest.raises(ValueError, match="dense_layers"):
        hira.convert(_tiny("llama"), hira.HiraConfig(dense_layers=(5,)))
    with pytest.raises(ValueError, match="sliding-window"):
        hira.convert(MistralForCausalLM(MistralConfig(
            vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, sliding_window=64)))
    plain = _tiny("llama")
    with torch.no_grad(), pytest.raises(TypeError, match="convert"):
        plain(_ids(length=20), **{hira.CACHE_ARG: hira.HiraCache(plain.config)})
    converted = hira.convert(_tiny("llama"), DENSE)
    with torch.no_grad(), pytest.raises(TypeError, match="needs a HiraCache"):
        converted(_ids(length=20), **{hira.CACHE_ARG: DynamicCache(config=converted.config)})
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        converted(_ids(length=300), **{hira.CACHE_ARG: hira.HiraCache(converted.config, DENSE)})


@torch.no_grad()
def test_prompt_near_the_capacity_still_decodes():
    """A prompt whose last block is partly filled leaves capacity − N tokens to decode (one spare block)."""
    model = _tiny("llama")
    config = hira.HiraConfig(block_size=16, min_context=0, window_tokens=16, max_cache_len=208)
    hira.convert(model, config)
    out = _greedy(model, _ids(length=200), steps=8)  # 200 = 12.5 blocks; 8 more tokens fill the capacity exactly
    assert out.shape[1] == 208


@torch.no_grad()
def test_cache_reaches_every_layer_through_generate():
    """The cache generate creates by itself is a HiraCache and every layer decodes through its index: a decode
    whose cache went missing (as when transformers renamed the argument) would leave these stats empty."""
    model = hira.convert(_tiny("llama"), SPARSE)
    out = model.generate(_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, hira.CACHE_ARG)
    assert isinstance(cache, hira.HiraCache)
    assert all(s is not None and 0.0 < s["read_fraction"] < 1.0 for s in cache.stats())
    assert cache.get_seq_length() == PROMPT + 3  # the last token is sampled, not fed back


@torch.no_grad()
def test_decode_without_its_cache_fails_loudly():
    model = hira.convert(_tiny("llama"), SPARSE)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 1, 96)
    cos, sin = model.model.rotary_emb(hidden, torch.tensor([[PROMPT]]))
    with pytest.raises(RuntimeError, match="no cache under"):
        attn(hidden, (cos, sin), None, position_ids=torch.tensor([[PROMPT]]))
    # A whole sequence without a cache is a plain forward, and allowed.
    full = torch.randn(1, 5, 96)
    cos, sin = model.model.rotary_emb(full, torch.arange(5)[None])
    assert attn(full, (cos, sin), None, position_ids=torch.arange(5)[None])[0].shape == (1, 5, 96)


@pytest.mark.parametrize("name", hira.compat.CACHE_ARGS)
@torch.no_grad()
def test_base_model_takes_a_hira_cache_under_either_name(name):
    """The base model's forward takes a user's HiraCache as ``cache`` or ``past_key_values``, whatever the
    transformers release calls it, and decodes through it (the other name is never dropped in its favour)."""
    model = hira.convert(_tiny("llama"), DENSE)
    ids = _ids(length=40)
    ref = model(ids).logits[:, -1]
    cache = hira.HiraCache(model.config, DENSE)
    model.model(ids[:, :-1], **{name: cache})
    hidden = model.model(ids[:, -1:], **{name: cache}).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden)[:, -1], ref, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 40 and cache.stats()[0] is not None


@torch.no_grad()
def test_generate_compiles_the_decode_once_and_replays_it():
    """transformers' own auto-compile (forced on the CPU through compile_config) takes the HiraCache: one compile
    of the model's decode and one of the shared step, no graph break, no recompile over the steps or on a second
    call that reuses the reset cache, and the tokens of the eager path."""
    from transformers.generation import CompileConfig

    model = hira.convert(_tiny("llama"), SPARSE)
    ids = _ids()
    eager = _greedy(model, ids, steps=16, disable_compile=True)
    config = CompileConfig()
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only
    cache = hira.HiraCache(model.config, SPARSE)
    assert cache.is_compileable
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    first = _greedy(model, ids, steps=16, compile_config=config, **{hira.CACHE_ARG: cache})
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert torch.equal(first, eager)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    # The model's decode graph and the step's pieces, each compiled once: far fewer graphs than the 16 steps.
    assert 1 <= graphs <= 6, graphs
    assert all(s is not None for s in cache.stats())
    cache.reset()
    assert all(s is None for s in cache.stats())
    second = _greedy(model, ids, steps=16, compile_config=config, **{hira.CACHE_ARG: cache})
    assert torch.equal(second, eager)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # nothing recompiled


def test_generate_prefills_in_chunks_eagerly_and_clusters_once(monkeypatch):
    """generate(prefill_chunk_size=...) with the decode compiled (forced on the CPU): the chunks run eagerly
    (transformers would compile them), each layer is clustered once after the last chunk, and the tokens are those
    of the prompt prefilled in one call."""
    from transformers.generation import CompileConfig

    model = hira.convert(_tiny("llama"), SPARSE)
    ids = _ids()
    one_call = _greedy(model, ids, steps=8, disable_compile=True)
    builds = []
    build = hira.cache.HiraLayer._build
    monkeypatch.setattr(hira.cache.HiraLayer, "_build", lambda self, *a: builds.append(self.layer_idx) or build(self, *a))
    config = CompileConfig()
    config._compile_all_devices = True
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    cache = hira.HiraCache(model.config, SPARSE)
    chunked = _greedy(model, ids, steps=8, prefill_chunk_size=48, compile_config=config, **{hira.CACHE_ARG: cache})
    assert torch.equal(chunked, one_call)
    assert sorted(builds) == [0, 0, 1, 1]  # the first chunk's index, then one re-clustering per layer
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert not model._hira_prefilling


@torch.no_grad()
def test_compiled_model_matches_eager_past_512_keys():
    """A model compiled as a whole decodes what the eager model does at a cache past 512 slots, where compiled
    flex_attention built in one CPU graph with its BlockMask goes wrong (the step keeps them apart there)."""
    config = hira.HiraConfig(block_size=64, threshold=hira.TopK(3), min_context=0, window_tokens=64,
                             max_cache_len=768)
    model = hira.convert(_tiny("llama"), config)
    compiled = torch.compile(model)
    ids = torch.randint(3, 96, (1, 700), generator=torch.Generator().manual_seed(3))
    cache, eager_cache = hira.HiraCache(model.config, config), hira.HiraCache(model.config, config)
    model(ids[:, :-4], **{hira.CACHE_ARG: eager_cache})
    compiled(ids[:, :-4], **{hira.CACHE_ARG: cache})
    for t in range(696, 700):
        pos = torch.tensor([[t]])
        eager = model(ids[:, t : t + 1], **{hira.CACHE_ARG: eager_cache}, position_ids=pos).logits
        logits = compiled(ids[:, t : t + 1], **{hira.CACHE_ARG: cache}, position_ids=pos).logits
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=0)
    assert 0.0 < cache.stats()[0]["read_fraction"] < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers auto-compiles generate on CUDA")
@torch.no_grad()
def test_generate_on_cuda_is_compiled_and_decodes_as_eager():
    """On CUDA a plain generate compiles and graph-replays the decode by itself (no compile_config), past 512
    slots, with the tokens of the eager path and no recompile in a second call on the reset cache."""
    config = hira.HiraConfig(block_size=64, threshold=hira.TopK(3), min_context=0, window_tokens=64,
                             max_cache_len=768)
    model = hira.convert(_tiny("llama").cuda(), config)
    ids = torch.randint(3, 96, (2, 700), generator=torch.Generator().manual_seed(3)).cuda()
    eager = _greedy(model, ids, steps=24, disable_compile=True)
    cache = hira.HiraCache(model.config, config)
    dynamo_utils.counters.clear()
    assert torch.equal(_greedy(model, ids, steps=24, **{hira.CACHE_ARG: cache}), eager)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 6, graphs
    cache.reset()
    assert torch.equal(_greedy(model, ids, steps=24, **{hira.CACHE_ARG: cache}), eager)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    assert dynamo_utils.counters["inductor"]["cudagraph_skips"] == 0


@torch.no_grad()
def test_reset_cache_takes_any_new_prompt():
    """After reset a cache prefills whatever comes next, a one-token prompt included, as a fresh cache does."""
    model = hira.convert(_tiny("llama"), SPARSE)
    cache = hira.HiraCache(model.config, SPARSE)
    _greedy(model, _ids(), steps=4, **{hira.CACHE_ARG: cache})
    for prompt in (_ids(length=90, seed=5), _ids(length=1, seed=6)):
        cache.reset()
        fresh = hira.HiraCache(model.config, SPARSE)
        got = _greedy(model, prompt, steps=6, **{hira.CACHE_ARG: cache})
        assert torch.equal(got, _greedy(model, prompt, steps=6, **{hira.CACHE_ARG: fresh}))
        assert cache.get_seq_length() == prompt.shape[1] + 5
