"""The drop-in on a tiny random Gemma 3: its full-attention layers go through Hira (q/k norms, its own scaling, head
dim 256), its sliding-window layers stay exact over transformers' own cache layer inside the same HiraCache."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.utils
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import StaticSlidingWindowLayer
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention

import hira

PROMPT = 150  # tokens: several 16-token blocks on the full layers, several windows on the sliding ones
WINDOW = 32
FULL = (1, 3)  # the full-attention layers
DENSE = hira.HiraConfig(block_size=16, threshold=hira.Fixed(-math.inf), min_context=0, window_tokens=16)
SPARSE = hira.HiraConfig(block_size=16, threshold=hira.TopK(2), min_context=0, window_tokens=16)


def _tiny(**overrides) -> Gemma3ForCausalLM:
    """4 layers alternating sliding and full, 4 query heads over 1 KV head of dim 256, as Gemma 3 270M."""
    config = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # the norms start at zero weight: make them count, so a dropped q/k norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def _ids(batch: int = 1, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy(model, ids, steps: int = 12, **kw) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows (one shape for every decode here, so one compile): row 1 left-padded to 113 real tokens, still
    more than the window."""
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    return ids, mask


@torch.no_grad()
def test_dense_config_matches_unconverted():
    model = _tiny()
    ids, mask = _padded_batch()
    ref = _greedy(model, ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    hira.convert(model, DENSE)
    assert [type(layer.self_attn) for layer in model.model.layers] == [Gemma3Attention, hira.HiraAttention] * 2
    cache = hira.HiraCache(model.config, DENSE)
    assert [type(layer) for layer in cache.layers] == [StaticSlidingWindowLayer, hira.cache.HiraLayer] * 2
    assert cache.is_compileable  # so generate auto-compiles its decode on CUDA
    out = _greedy(model, ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                  **{hira.CACHE_ARG: cache})
    assert torch.equal(out.sequences, ref.sequences)
    # The prefill's and every decode step's logits: the full layers read through their index, the sliding ones
    # their window.
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=0)
    stats = cache.stats()
    assert [s is None for s in stats] == [True, False, True, False]
    assert all(stats[i] == {"read_fraction": 1.0, "kept_fraction": 1.0, "skip_bound": 0.0} for i in FULL)
    cache.reset()  # reused for a new prompt, sliding layers included
    assert torch.equal(_greedy(model, ids, attention_mask=mask, **{hira.CACHE_ARG: cache}), ref.sequences)


@torch.no_grad()
def test_sparse_config_reads_less_on_the_full_layers():
    """The cache generate creates by itself holds both kinds of layer; only the full ones report stats."""
    model = hira.convert(_tiny(), SPARSE)
    ids, mask = _padded_batch()
    out = _greedy(model, ids, steps=4, attention_mask=mask, return_dict_in_generate=True)
    cache = getattr(out, hira.CACHE_ARG)
    assert isinstance(cache, hira.HiraCache)
    assert [type(layer) for layer in cache.layers] == [StaticSlidingWindowLayer, hira.cache.HiraLayer] * 2
    stats = cache.stats()
    assert stats[0] is None and stats[2] is None
    for i in FULL:
        # 2 top blocks + sink block + window blocks out of 10 blocks (row 0; row 1, padded, has 8).
        assert 0.0 < stats[i]["read_fraction"] < 0.75
        assert 0.0 <= stats[i]["skip_bound"] <= 1.0
    assert cache.get_seq_length() == PROMPT + 3  # the last token is sampled, not fed back


@torch.no_grad()
def test_convert_revert_convert():
    model = _tiny()
    ids = _ids(length=40)
    ref = model(ids).logits
    sliding, full = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    n_params = sum(p.numel() for p in model.parameters())
    hira.convert(model, DENSE)
    hira.convert(model, SPARSE)  # converting again only replaces the config
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, hira.HiraAttention) and attn.hira_config is SPARSE
    assert attn.q_norm is full.q_norm and attn.k_norm is full.k_norm and attn.q_proj is full.q_proj
    assert attn.scaling == full.scaling == 256**-0.5 and attn.head_dim == 256
    assert model.model.layers[0].self_attn is sliding
    assert sum(p.numel() for p in model.parameters()) == n_params
    hira.revert(model)
    assert model.model.layers[1].self_attn is full
    torch.testing.assert_close(model(ids).logits, ref)
    hira.convert(model, DENSE)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)


def test_unsupported_gemma3_settings_raise():
    with pytest.raises(ValueError, match="attn_logit_softcapping = 50.0"):
        hira.convert(_tiny(attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="use_bidirectional_attention = True"):
        hira.convert(_tiny(use_bidirectional_attention=True))


@torch.no_grad()
def test_generate_compiles_the_decode_as_eager():
    """transformers' auto-compile (forced on the CPU) takes a Gemma 3 HiraCache, sliding layers included, and
    decodes the eager tokens; a second call on the reset cache compiles nothing more."""
    from transformers.generation import CompileConfig

    model = hira.convert(_tiny(), SPARSE)
    ids, mask = _padded_batch()
    eager = _greedy(model, ids, attention_mask=mask, disable_compile=True)
    config = CompileConfig()
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only
    cache = hira.HiraCache(model.config, SPARSE)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert torch.equal(_greedy(model, ids, attention_mask=mask, compile_config=config, **{hira.CACHE_ARG: cache}), eager)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 6 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    cache.reset()
    assert torch.equal(_greedy(model, ids, attention_mask=mask, compile_config=config, **{hira.CACHE_ARG: cache}), eager)
    assert counters["stats"]["unique_graphs"] == graphs
