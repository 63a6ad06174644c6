"""Context parallel (``hira.parallel``): the sequence sharded over 2 and 3 gloo processes on CPU gives what one
process gives: the same output in dense mode (fp32, 1e-5), the same selected tokens in the sparse modes, the same
greedy tokens and logits for a converted model. NCCL cases run only with two GPUs or more.

Every test spawns its ranks with torch.multiprocessing (a file:// rendezvous in a temporary directory); each rank
computes the single-process reference itself and checks its own part. The functional checks run flex_attention
eagerly (``set_stance("force_eager")``): its mask_mod restates the selection, so eager is exact (DESIGN.md §3), and
no rank pays a compile; the model test runs the compiled decode step.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import kept_tokens
from transformers import LlamaConfig, LlamaForCausalLM

import hira
from hira.api import attend_selection, build_index_unchecked
from hira.flex.attention import fold_gqa
from hira.index.index import append
from hira.parallel import (
    SequenceShard,
    build_shard_index,
    dense_sharded_attention,
    shard_append,
    sharded_attend,
    sharded_decode_attention,
    sharded_search,
)
from hira.selection.search import search_rows

B, HQ, HKV, D, BS = 2, 4, 2, 16, 16
N = 12 * BS  # 12 blocks: 6 + 6 on 2 ranks, 4 + 4 + 4 on 3
STEPS = 3
# Position order and block-sized sinks and window: the shards' blocks are exactly the single index's blocks.
ALIGNED = hira.HiraConfig(block_size=BS, branching=4, clustering="none", sink_tokens=BS, window_tokens=2 * BS)
MODES = [
    hira.Dense(),
    hira.Fixed(2.0),
    hira.Certified(1e-2),
    hira.TopK(3),
    hira.TopP(0.9),
]


def _worker(rank: int, world: int, init: str, device: str, fn, args):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    # A rank that fails leaves the others waiting in a collective: time out instead of hanging the suite.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timeout)
    try:
        fn(device, *args)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, fn, *args, device: str = "cpu"):
    """Run fn(device, *args) on ``world`` ranks; a failure on any rank fails the test with its traceback.

    Starting a rank (a fresh interpreter importing torch and transformers) costs more than the checks: each test
    spawns once and runs all its checks there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(_worker, args=(world, init, device, fn, args), nprocs=world, join=True)


def _same_on_every_rank(t: torch.Tensor) -> None:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), "ranks disagree"


def _data(device: str, seed: int = 0):
    """Keys in tight 16-token clusters (so that bounds are tight and the sparse modes select), then STEPS decode
    tokens. Returns k, v [B, HKV, N + STEPS, D] and q [STEPS, B, HQ, 1, D], float32."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(B, HKV, N // BS, D, generator=gen).repeat_interleave(BS, dim=2)
    k = torch.cat([centres + 0.02 * torch.randn(B, HKV, N, D, generator=gen),
                   torch.randn(B, HKV, STEPS, D, generator=gen)], dim=2)
    v = torch.randn(B, HKV, N + STEPS, D, generator=gen)
    q = 3 * torch.randn(STEPS, B, HQ, 1, D, generator=gen)
    return k.to(device), v.to(device), q.to(device)


def _check_functional(device: str, modes: list[hira.Threshold]) -> None:
    """Every mode, STEPS decode steps: the sharded step against the single-process step on the same data."""
    torch.compiler.set_stance("force_eager" if device == "cpu" else "default")
    shard = SequenceShard()
    k, v, q = _data(device)
    scale = D**-0.5
    start, end = shard.slices(N, BS)[shard.rank]
    for threshold in modes:
        single = build_index_unchecked(k[:, :, :N], v[:, :, :N], None, ALIGNED, N + STEPS)
        local = build_shard_index(k[:, :, :N], v[:, :, :N], None, ALIGNED, shard, N + STEPS)
        for t in range(STEPS):
            new_k, new_v = k[:, :, N + t : N + t + 1], v[:, :, N + t : N + t + 1]
            append(single, new_k, new_v)
            shard_append(local, new_k, new_v)
            rows = fold_gqa(q[t], HKV) * scale  # [B, HKV, G, D]
            sel = search_rows(single, rows, threshold)
            ref, ref_stats = attend_selection(q[t], single, sel, scale)
            lsel = sharded_search(local, rows, threshold)
            out, stats = sharded_attend(q[t], local, lsel, scale)
            n_seen = N + t + 1
            every = torch.ones(B, n_seen, dtype=torch.bool, device=device)
            mine = kept_tokens(local.index, lsel.keep, every[:, start : (n_seen if shard.is_last else end)])
            ref_mine = kept_tokens(single, sel.keep, every)[:, :, start : (n_seen if shard.is_last else end)]
            assert torch.equal(mine, ref_mine), f"{threshold}: step {t} selects other tokens"
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(lsel.tau, sel.tau, atol=1e-5, rtol=0)
            torch.testing.assert_close(stats.read_fraction, ref_stats.read_fraction, atol=1e-6, rtol=0)
            torch.testing.assert_close(stats.kept_fraction, ref_stats.kept_fraction, atol=1e-6, rtol=0)
            torch.testing.assert_close(stats.skip_bound, ref_stats.skip_bound, atol=1e-5, rtol=1e-4)
            # The ranks also fold their own top leaf's exact score into the kept mass: a prior bound no looser.
            assert (stats.prior_skip_bound <= ref_stats.prior_skip_bound + 1e-5).all()
            _same_on_every_rank(out)
            if isinstance(threshold, (hira.Certified, hira.TopK, hira.TopP)):  # the data makes them skip something
                assert float(ref_stats.read_fraction.mean()) < 0.9, (threshold, ref_stats.read_fraction)
    # The one-call step equals the two calls.
    out, _ = sharded_decode_attention(q[-1], local, MODES[-1], scale)
    ref, _ = sharded_attend(q[-1], local, sharded_search(local, fold_gqa(q[-1], HKV) * scale, MODES[-1]), scale)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    _check_dense_baseline(shard, k, v, q[-1], scale, start, end)


def _check_dense_baseline(shard, k, v, q, scale, start, end, atol=1e-5) -> None:
    """The dense context-parallel baseline over each rank's slice equals dense attention over the whole sequence, with
    padding masked (a rank may hold only padding) or without a mask."""
    n = k.shape[2]
    stop = n if shard.is_last else end
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    out = dense_sharded_attention(q, k[:, :, start:stop], v[:, :, start:stop], shard, scale)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    _same_on_every_rank(out)
    mask = torch.ones(B, n, dtype=torch.bool, device=k.device)
    mask[:, : shard.slices(N, BS)[0][1]] = False  # the first rank's slice is all padding
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    out = dense_sharded_attention(q, k[:, :, start:stop], v[:, :, start:stop], shard, scale, mask[:, start:stop])
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)


PROMPT = 160  # 10 blocks of 16: slices 80 + 80 on 2 ranks, 64 + 48 + 48 on 3; (PROMPT - 32) / 16 middle blocks
# As tests/test_model.py (pca clustering, 4 sinks): exact whatever the blocks.
DENSE = hira.HiraConfig(block_size=16, threshold=hira.Fixed(-math.inf), min_context=0, window_tokens=16)
# Aligned blocks: the same selection as one process.
SPARSE = hira.HiraConfig(block_size=16, clustering="none", sink_tokens=16, window_tokens=16, min_context=0,
                         threshold=hira.TopK(3))
SLOTS = 2  # of the block cache per rank, layer and KV head in the offload check


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=256)
    return LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **common)).eval()


@torch.no_grad()
def _decode_logits(model, ids, cache, steps: int = 6) -> torch.Tensor:
    """Greedy decode through ``cache``: the logits of the prompt's last position and of each step, [1, steps+1, V]."""
    logits = [model(ids, **{hira.CACHE_ARG: cache}).logits[:, -1:]]
    for _ in range(steps):
        tok = logits[-1].argmax(-1)
        logits.append(model(tok, **{hira.CACHE_ARG: cache}).logits)
    return torch.cat(logits, 1)


@torch.no_grad()
def _check_model(device: str) -> None:
    """A tiny Llama converted with the shard: the logits of every step and the greedy tokens of one process."""
    torch.compiler.set_stance("force_eager")  # the compiled flex call is the single-process one (test_model.py)
    shard = SequenceShard()
    world = shard.world_size
    rank0_alone = dist.new_group([0])  # world size 1, on rank 0 only
    ids = torch.randint(3, 96, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    model = _tiny_llama()
    # The sharded cache does not calibrate the estimate (``ShardedHiraLayer``): neither does its reference here.
    for config in (DENSE, dataclasses.replace(SPARSE, calibration_queries=0)):
        hira.convert(model, config)
        ref_cache = hira.HiraCache(model.config, config)
        ref = _decode_logits(model, ids, ref_cache)
        ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        hira.convert(model, config, shard=shard)
        assert f"shard={shard.rank}/{world}" in repr(model)
        cache = hira.HiraCache(model.config, config, shard)
        torch.testing.assert_close(_decode_logits(model, ids, cache), ref, atol=1e-4, rtol=0)
        for got, want in zip(cache.stats(), ref_cache.stats()):
            assert got == pytest.approx(want, abs=1e-5)
        # generate() creates the sharded cache itself.
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref_tokens)
        if shard.rank == 0 and world == 2:
            alone = hira.HiraCache(model.config, config, SequenceShard(rank0_alone))
            torch.testing.assert_close(_decode_logits(model, ids, alone), ref, atol=1e-4, rtol=0)
    # K and V in host memory behind a block cache of SLOTS slots per rank (the emulated tier on the CPU, the real one
    # on CUDA): the logits of one process without offload, whether the kept blocks fit the slots or not.
    sparse = dataclasses.replace(SPARSE, calibration_queries=0)
    offloaded = dataclasses.replace(sparse, offload=hira.Offload(blocks=SLOTS))
    hira.convert(model, sparse)
    ref = _decode_logits(model, ids, hira.HiraCache(model.config, sparse))
    hira.convert(model, offloaded, shard=shard)
    offload_cache = hira.HiraCache(model.config, offloaded, shard)
    torch.testing.assert_close(_decode_logits(model, ids, offload_cache), ref, atol=1e-4, rtol=0)
    assert all(layer.block_cache is not None for layer in offload_cache.layers)
    stats = [s for s in offload_cache.stats() if s is not None]
    assert stats and all(s["blocks_fetched"] + s["blocks_from_host"] <= s["blocks_kept"] for s in stats)
    # A head keeping more blocks than its slots reads the others from host memory.
    assert all(s["blocks_from_host"] > 0 for s in stats if s["blocks_kept"] > SLOTS)
    if shard.is_last:  # the recent window, always kept, is read through the cache
        assert all(s["blocks_kept"] > 0 for s in stats)
    hira.convert(model, sparse, shard=shard)
    # Misuse fails clearly, on every rank alike.
    with pytest.raises(ValueError, match="whole prompt in one call"):
        model(ids[:, :2], **{hira.CACHE_ARG: cache})
    with pytest.raises(ValueError, match=f"fewer than the {world} ranks"):
        model(ids[:, : 16 * (world - 1)], **{hira.CACHE_ARG: hira.HiraCache(model.config, DENSE, shard)})
    wide = hira.HiraConfig(block_size=16, window_tokens=100, threshold=hira.TopK(3))
    with pytest.raises(ValueError, match="window_tokens=100"):
        build_shard_index(torch.zeros(1, 2, PROMPT, 16), torch.zeros(1, 2, PROMPT, 16), None, wide, shard, 256)


def _check_all(device: str, modes: list[hira.Threshold]) -> None:
    _check_functional(device, modes)
    _check_model(device)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_matches_single_process(world):
    _spawn(world, _check_all, MODES if world == 2 else [MODES[0], MODES[2], MODES[4]])


def _check_dense_baseline_alone(device: str) -> None:
    shard = SequenceShard()
    k, v, q = _data(device)
    start, end = shard.slices(N, BS)[shard.rank]
    bf16 = [t.bfloat16() for t in (k, v, q[-1])]  # SDPA's flash kernel takes 16-bit inputs
    _check_dense_baseline(shard, *bf16, D**-0.5, start, end, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash path of the dense baseline runs on CUDA")
def test_dense_baseline_flash_path_on_one_gpu():
    """On CUDA the dense context-parallel baseline's unmasked part is SDPA's flash kernel with its LSE."""
    _spawn(1, _check_dense_baseline_alone, device="cuda")


def test_bad_shard_arguments():
    with pytest.raises(ValueError, match="init_process_group"):
        SequenceShard()
    model = _tiny_llama()
    with pytest.raises(ValueError, match="SequenceShard"):
        hira.convert(model, DENSE, shard=2)
    with pytest.raises(ValueError, match="SequenceShard"):
        hira.HiraCache(model.config, DENSE, shard="rank0")


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="NCCL context parallel needs 2 GPUs",
)
def test_nccl_sharded_decode_matches_single_process():
    _spawn(2, _check_functional, MODES, device="cuda")
