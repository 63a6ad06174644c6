"""K and V in the host tier behind a block cache (``hira.offload``): the same outputs and stats as without it, for
the same selection, whatever the cache's size (smaller than one step's selection included); the cache stays a copy
of the storage; the copy kernel equals its tensor program; a model decodes the same tokens with offload.

On the CPU the host tier is emulated (the same memory), so these tests check the cache's logic; on CUDA the storage
is pinned host memory read through its device address.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code
from reference import make_key_mask

import hira
from hira.api import AttentionStats
from hira.index.index import build_index
from hira.offload.block_cache import copy_blocks_reference, new_block_cache
from hira.offload.host import to_host_tier
import hira.step
from hira.step import decode_step, run_decode_step, step_args

B, H, G, N, D, BS = 2, 2, 3, 150, 16, 16
STEPS = 6
CAPACITY = -(-N // BS) * BS + STEPS  # appends start at the next whole block
NB = -(-CAPACITY // BS)  # leaves of the storage
THRESHOLDS = [hira.TopK(2), hira.TopP(0.9), hira.Certified(1e-3), hira.Fixed(0.5), hira.Fixed(-math.inf)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _index(seed: int, device, dtype, key_sketch: bool = False):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=gen)
    v = torch.randn(B, H, N, D, generator=gen)
    mask = make_key_mask("left", [N, N - 37], N, gen)
    index = build_index(k.to(device, dtype), v.to(device, dtype), mask.to(device), block_size=BS, branching=2,
                        sink_tokens=2, window_tokens=BS, capacity=CAPACITY, key_sketch=key_sketch)
    return index, gen


def _offloaded(plain, slots: int):
    """A copy of the index ``plain`` with K and V in the host tier, and an empty block cache of ``slots`` for it."""
    offloaded = copy.deepcopy(plain)
    offloaded.keys, offloaded.values = to_host_tier(offloaded.keys), to_host_tier(offloaded.values)
    return offloaded, new_block_cache(offloaded, slots)


def _stats(device) -> AttentionStats:
    return AttentionStats(*(torch.empty(s, device=device) for s in ((B, H), (B, H), (B, H * G, 1), (B, H * G, 1))))


def _assert_cache_mirrors_storage(index, cache):
    """Every resident block's slot holds the storage's block, and the two residency tables are inverse."""
    for b in range(B):
        for h in range(H):
            for slot, block in enumerate(cache.slot_block[b, h].tolist()):
                if block < 0:
                    continue
                assert cache.block_slot[b, h, block] == slot
                s, t = slice(slot * BS, (slot + 1) * BS), slice(block * BS, (block + 1) * BS)
                assert torch.equal(cache.keys[b, h, s].cpu(), index.keys[b, h, t].cpu())
                assert torch.equal(cache.values[b, h, s].cpu(), index.values[b, h, t].cpu())
            resident = (cache.block_slot[b, h] >= 0).sum()
            assert resident == (cache.slot_block[b, h] >= 0).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", [1, 3, NB])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.sampled_from(THRESHOLDS), drift=st.sampled_from([0.0, 0.3, 3.0]))
def test_offloaded_steps_match_the_steps_without_offload(device, seed, slots, threshold, drift):
    """STEPS decode steps through a block cache of 1 slot (most kept blocks read from the host tier), 3, or every
    block: the same outputs and the same stats as without offload, and the cache a copy of the storage after each
    step. ``drift`` moves the queries between steps, so blocks are fetched and evicted."""
    torch.manual_seed(seed)
    plain, gen = _index(seed, device, torch.float32)
    offloaded, cache = _offloaded(plain, slots)
    stats_a, stats_b = _stats(device), _stats(device)
    walk = torch.randn(B, H * G, 1, D, generator=gen)
    for _ in range(STEPS):
        walk = walk + drift * torch.randn(walk.shape, generator=gen)
        k, v = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
        q, k, v = walk.to(device), k.to(device), v.to(device)
        out_a = decode_step(plain, q, k, v, threshold, D**-0.5, stats_a)
        out_b = decode_step(offloaded, q, k, v, threshold, D**-0.5, stats_b, cache)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
        for a, b in zip(stats_a.tensors(), stats_b.tensors()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True)
        live = (plain.levels[0].count > 0).sum(-1)
        assert torch.equal(cache.kept, (stats_a.kept_fraction * live).round().int())  # the selection's blocks
        assert bool((cache.fetched + cache.from_host <= cache.kept).all())
        assert bool((cache.from_host == 0).all()) or slots < NB  # only a cache too small reads from the host tier
        _assert_cache_mirrors_storage(offloaded, cache)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [hira.TopK(2), hira.TopP(0.9), hira.Certified(1e-3)])
def test_compiled_offloaded_step_matches_the_eager_step_without_offload(device, threshold):
    """The decode step as a converted model runs it (``run_decode_step``: compiled, the offloaded attention one
    opaque operator inside it) equals the eager step without offload, step after step."""
    plain, gen = _index(1, device, torch.float32)
    offloaded, cache = _offloaded(plain, 3)
    stats_a, stats_b = _stats(device), _stats(device)
    for _ in range(STEPS):
        q, k, v = (torch.randn(B, h, 1, D, generator=gen).to(device) for h in (H * G, H, H))
        out_a = decode_step(plain, q, k, v, threshold, D**-0.5, stats_a)
        out_b = run_decode_step(offloaded, q, k, v, threshold, D**-0.5, stats_b, cache)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    _assert_cache_mirrors_storage(offloaded, cache)


@pytest.mark.parametrize("device", DEVICES)
def test_certified_with_the_key_sketch_through_the_cache(device):
    """The certified mode on an index with the key sketch (which stays on the device with the bounds): through a
    block cache of 3 slots, the outputs and the skip bounds of the steps without offload."""
    plain, gen = _index(2, device, torch.float32, key_sketch=True)
    offloaded, cache = _offloaded(plain, 3)
    stats_a, stats_b = _stats(device), _stats(device)
    for _ in range(STEPS):
        q, k, v = (torch.randn(B, h, 1, D, generator=gen).to(device) for h in (H * G, H, H))
        out_a = decode_step(plain, q, k, v, hira.Certified(1e-2), D**-0.5, stats_a)
        out_b = decode_step(offloaded, q, k, v, hira.Certified(1e-2), D**-0.5, stats_b, cache)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats_b.skip_bound, stats_a.skip_bound, rtol=1e-5, atol=1e-6)
    assert int(cache.from_host.sum()) > 0  # the selection outgrew the 3 slots: the host part was exercised


def test_the_compiled_offloaded_step_updates_the_slots_in_place():
    """The compiled step (CUDA's: the whole step in one graph, here on the CPU) allocates no buffer the size of the
    slots: inductor updates them in place. Traced as plain ops, the new token's write copied all the slots and back at
    every step; reordered for locality, the search's read of the cache moved after the attention's fetch and forced a
    copy too (benchmarks/NOTES.md §20: 0.95 of 1.67 ms per layer at 128K, batch 32)."""
    plain, gen = _index(3, "cpu", torch.float32)
    offloaded, cache = _offloaded(plain, 7)
    q, k, v = (torch.randn(B, h, 1, D, generator=gen) for h in (H * G, H, H))
    args = step_args(offloaded, q, k, v, hira.TopK(2), D**-0.5, _stats("cpu"), cache)
    # A compile of its own (as ``_compiled_step``'s), so that the process's compiled code stays as it is.
    step = torch.compile(hira.step._flat_step, fullgraph=True, dynamic=False, options=hira.step._OPTIONS)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(step, *args)
    sizes = [math.prod(int(n) for n in shape.split(",") if n.strip())
             for code in codes for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", code)]
    assert sizes, "no buffer found: the output code's form changed"
    assert cache.keys.numel() not in sizes


def test_a_cache_of_every_block_fetches_each_block_once():
    """With a slot per block and the same query every step, the first step fetches its selection and the later
    ones fetch only blocks they did not read before (none, once the newest block is resident)."""
    index, gen = _index(0, "cpu", torch.float32)
    cache = new_block_cache(index, NB)
    stats = _stats("cpu")
    q = torch.randn(B, H * G, 1, D, generator=gen)
    fetched = []
    for _ in range(3):
        k, v = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
        decode_step(index, q, k, v, hira.TopK(2), D**-0.5, stats, cache)
        fetched.append(cache.fetched.clone())
    assert torch.equal(fetched[0], cache.kept)  # a cold cache misses everything it keeps
    assert int(fetched[2].sum()) == 0
    assert int(cache.from_host.sum()) == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 6), bs=st.sampled_from([16, 32]), d=st.sampled_from([8, 64]))
def test_copy_kernel_matches_its_tensor_program(seed, L, bs, d):
    """The Triton copy (on CUDA, else in triton's interpreter on the CPU) writes exactly the listed blocks, and only
    the first ``count`` of each list."""
    from hira.offload.copy_kernel import copy_blocks_kernel

    gen = torch.Generator().manual_seed(seed)
    nb, m = 7, 6
    src_k, src_v = (torch.randn(B, H, nb * bs, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    # The lists are slices of longer ones, as ``fetch`` passes them.
    src_block = torch.stack([torch.stack([torch.randperm(nb, generator=gen) for _ in range(H)]) for _ in range(B)])
    dst_slot = torch.stack([torch.stack([torch.randperm(m, generator=gen) for _ in range(H)]) for _ in range(B)])
    src_block, dst_slot = src_block.int()[..., :L], dst_slot.int()[..., :L]
    count = torch.randint(0, L + 1, (B, H), generator=gen, dtype=torch.int32)
    want_k, want_v = (torch.zeros(B, H, m * bs, d, dtype=torch.bfloat16) for _ in range(2))
    got_k, got_v = want_k.clone(), want_v.clone()
    args = (src_block, dst_slot, count, bs)
    copy_blocks_reference(src_k, src_v, want_k, want_v, *args)
    dev = DEVICES[-1]
    got = [t.to(dev) for t in (src_k, src_v, got_k, got_v, src_block, dst_slot, count)]
    copy_blocks_kernel(*got, bs)
    assert torch.equal(got[2].cpu(), want_k) and torch.equal(got[3].cpu(), want_v)
    assert int((want_k != 0).any(-1).sum()) == int(count.sum()) * bs  # the reference wrote count blocks, no more


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), bs=st.sampled_from([16, 32]), d=st.sampled_from([8, 64]))
def test_key_blocks_are_read_from_their_slot_where_resident(seed, n, bs, d):
    """``read_key_blocks`` (the Triton kernel on CUDA, else in triton's interpreter on the CPU, and its tensor
    program) reads a resident block from its slot and any other from the storage: here the slots hold the negated
    blocks, so each output block says where it was read."""
    from hira.offload.block_cache import read_key_blocks_reference
    from hira.offload.copy_kernel import read_key_blocks_kernel

    gen = torch.Generator().manual_seed(seed)
    nb, m = 7, 4
    storage = torch.randn(B, H, nb * bs, d, generator=gen).to(torch.bfloat16)
    resident = torch.stack([torch.stack([torch.randperm(nb, generator=gen)[:m] for _ in range(H)]) for _ in range(B)])
    block_slot = torch.full((B, H, nb), -1, dtype=torch.int32)
    block_slot.scatter_(2, resident, torch.arange(m, dtype=torch.int32).expand(B, H, m).contiguous())
    slots = -storage.view(B, H, nb, bs, d).gather(2, resident[..., None, None].expand(B, H, m, bs, d)).flatten(2, 3)
    blocks = torch.randint(0, nb, (B, H, n), generator=gen, dtype=torch.int32)
    want = storage.view(B, H, nb, bs, d).gather(2, blocks.long()[..., None, None].expand(B, H, n, bs, d))
    want = torch.where((block_slot.gather(2, blocks.long()) >= 0)[..., None, None], -want, want)
    assert torch.equal(read_key_blocks_reference(storage, slots, block_slot, blocks, bs), want)
    dev = DEVICES[-1]
    got = read_key_blocks_kernel(*(t.to(dev) for t in (storage, slots, block_slot, blocks)), bs)
    assert torch.equal(got.cpu(), want)


def test_offload_config_is_validated():
    with pytest.raises(ValueError, match="exactly one of blocks= or bytes="):
        hira.Offload()
    with pytest.raises(ValueError, match="exactly one of blocks= or bytes="):
        hira.Offload(blocks=2, bytes=10)
    with pytest.raises(ValueError, match="Offload.blocks must be an integer >= 1"):
        hira.Offload(blocks=0)
    with pytest.raises(ValueError, match="HiraConfig.offload must be a hira.Offload"):
        hira.HiraConfig(offload=4)


@torch.no_grad()
@pytest.mark.parametrize("offload", [hira.Offload(blocks=2), hira.Offload(bytes=2 * 2 * 2 * 16 * 16 * 4 * 5)])
def test_a_model_decodes_the_same_tokens_with_offload(offload):
    """A converted tiny Llama generates the same tokens with K and V behind a block cache of 2 slots (fewer than a
    step keeps) or of 5 slots set in bytes (2 layers, 2 KV heads, 16-token blocks of 16 float32 channels, K and
    V), and reports what its caches fetched and their hit rate."""
    from test_model import SPARSE, _greedy, _ids, _tiny

    model = hira.convert(_tiny("llama"), SPARSE)
    want = _greedy(model, _ids())
    config = dataclasses.replace(SPARSE, offload=offload)
    cache = hira.HiraCache(model.config, config)
    assert torch.equal(_greedy(model, _ids(), **{hira.CACHE_ARG: cache}), want)
    slots = 2 if offload.blocks else 5
    for layer, stats in zip(cache.layers, cache.stats()):
        assert layer.block_cache.slots == slots
        assert stats["blocks_kept"] > 0 and stats["blocks_fetched"] + stats["blocks_from_host"] <= stats["blocks_kept"]
        assert (stats["blocks_from_host"] > 0) == (slots < stats["blocks_kept"])
    stats = cache.stats()
    missed = sum(s["blocks_fetched"] + s["blocks_from_host"] for s in stats)
    assert cache.summary()["hit_rate"] == pytest.approx(1 - missed / sum(s["blocks_kept"] for s in stats))


def test_a_cache_too_small_for_one_block_is_refused():
    from test_model import SPARSE, _greedy, _ids, _tiny

    model = hira.convert(_tiny("llama"), SPARSE)
    cache = hira.HiraCache(model.config, dataclasses.replace(SPARSE, offload=hira.Offload(bytes=1000)))
    with pytest.raises(ValueError, match="less than one block per batch row and KV head"):
        _greedy(model, _ids(), **{hira.CACHE_ARG: cache})


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: generate compiles and graph-replays there")
def test_generate_on_cuda_with_offload_is_compiled_and_decodes_the_same_tokens():
    """On CUDA, generate with K and V in pinned host memory compiles and replays the decode (no CUDA graph skipped),
    decodes the tokens of the same model without offload, and takes a second prompt on the reset cache."""
    import torch._dynamo.utils as dynamo_utils
    from test_model import _greedy, _tiny

    config = hira.HiraConfig(block_size=64, threshold=hira.TopK(3), min_context=0, window_tokens=64,
                             max_cache_len=768)
    model = hira.convert(_tiny("llama").cuda(), config)
    ids = torch.randint(3, 96, (2, 700), generator=torch.Generator().manual_seed(3)).cuda()
    want = _greedy(model, ids, steps=24)
    cache = hira.HiraCache(model.config, dataclasses.replace(config, offload=hira.Offload(blocks=4)))
    dynamo_utils.counters.clear()
    assert torch.equal(_greedy(model, ids, steps=24, **{hira.CACHE_ARG: cache}), want)
    assert dynamo_utils.counters["inductor"]["cudagraph_skips"] == 0
    assert all(s["blocks_from_host"] > 0 for s in cache.stats())  # 4 slots: fewer than a step keeps
    cache.reset()
    assert torch.equal(_greedy(model, ids, steps=24, **{hira.CACHE_ARG: cache}), want)


@torch.no_grad()
@pytest.mark.parametrize("recluster", [True, False])
@pytest.mark.parametrize("slots", [2, 8])
def test_chunked_prefill_then_decode_with_offload_matches_the_model_without(recluster, slots):
    """A prompt in chunks (appended to the host tier, re-clustered or not), then decode steps interleaved with another
    chunk, in a left-padded batch through a block cache of 2 slots (fewer than a step keeps) or 8 (every kept block
    resident, so a chunk lands in resident blocks): every logit equals the same calls without offload."""
    from test_model import _ids, _tiny

    model = _tiny("llama")
    config = hira.HiraConfig(block_size=16, threshold=hira.TopK(2), min_context=0, window_tokens=16,
                             recluster_on_prefill=recluster)
    hira.convert(model, config)
    ids = _ids(batch=2, length=120)
    mask = torch.ones_like(ids)
    mask[1, :23] = 0
    cuts = [0, 50, 80, 81, 82, 83, 100, 101, 102, 120]  # the third chunk starts inside a resident block
    logits = []
    for offload in (None, hira.Offload(blocks=slots)):
        cache = hira.HiraCache(model.config, dataclasses.replace(config, offload=offload))
        logits.append(torch.cat([model(ids[:, a:b], attention_mask=mask[:, :b], **{hira.CACHE_ARG: cache}).logits
                                 for a, b in zip(cuts, cuts[1:])], 1))
    real = mask.bool()
    torch.testing.assert_close(logits[1][real], logits[0][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_steps_past_the_index_limit_read_in_groups_of_batch_rows(device, monkeypatch):
    """K/V past ``INDEX_LIMIT`` elements are read one group of batch rows at a time (here one row per group, the
    limit lowered to one row of the storage): the same outputs and stats as in one call, with and without offload
    (its host-tier part grouped). A limit below one row is a clear error."""
    import hira.flex.attention as flex_attention

    plain, gen = _index(3, device, torch.float32)
    grouped = copy.deepcopy(plain)
    offloaded, cache = _offloaded(plain, 1)
    stats = [_stats(device) for _ in range(3)]
    for _ in range(STEPS):
        q, k, v = (torch.randn(B, h, 1, D, generator=gen).to(device) for h in (H * G, H, H))
        monkeypatch.setattr(flex_attention, "INDEX_LIMIT", 2**31 - 1)
        out_a = decode_step(plain, q, k, v, hira.TopP(0.9), D**-0.5, stats[0])
        monkeypatch.setattr(flex_attention, "INDEX_LIMIT", plain.keys.stride(0))
        out_b = decode_step(grouped, q, k, v, hira.TopP(0.9), D**-0.5, stats[1])
        out_c = decode_step(offloaded, q, k, v, hira.TopP(0.9), D**-0.5, stats[2], cache)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_c, out_a, rtol=1e-5, atol=1e-5)
        for a, b, c in zip(*(s.tensors() for s in stats)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert bool((cache.from_host > 0).any())  # the grouped host-tier part was read
    monkeypatch.setattr(flex_attention, "INDEX_LIMIT", plain.keys.stride(0) - 1)
    with pytest.raises(ValueError, match="one batch row of K/V spans"):
        decode_step(grouped, q, k, v, hira.TopP(0.9), D**-0.5, stats[1])
