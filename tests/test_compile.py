"""The tensor programs compile with fullgraph=True, match eager, and do not recompile as contents change.

A recompile per decode step would cost seconds, and past the recompile limit flex_attention silently runs eager
(DESIGN.md §3): the counts here must stay at one graph per shape.
"""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from reference import dense_reference, kept_tokens, make_key_mask, real_mask

import hira
from hira import Certified, HiraConfig, TopK
from hira.index.index import append, build_index
from hira.selection.search import search_rows

B, H, G, S, N, D, BS = 2, 2, 4, 2, 150, 32, 32  # q rows R = G·S = 8: the f32_r8 layout of test_attention
CAPACITY = 224  # 5 built blocks + 2 free blocks (64 slots) for appends
BUILD = dict(block_size=BS, branching=2, sink_tokens=2, window_tokens=16, capacity=CAPACITY)
THRESHOLD = Certified(1e-3)


def random_layer(seed: int, device):
    """keys, values [B, H, N, D] and a key_mask [B, N] with a different length per row."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=gen)
    v = torch.randn(B, H, N, D, generator=gen)
    return k.to(device), v.to(device), make_key_mask("left", [N, N - 40], N, gen).to(device)


def random_rows(seed: int, device) -> torch.Tensor:
    """Scaled query rows [B, H, G·S, D] as the tensor-level search takes them."""
    return torch.randn(B, H, G * S, D, generator=torch.Generator().manual_seed(seed)).to(device) * D**-0.5


def assert_same_selection(a, b):
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    for name in ("tau", "log_skip_ub", "log_kept_lb", "kept_fraction", "read_fraction"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def compiled_search():
    """search_rows compiled once for the module, with a backend that counts the graphs it compiles."""
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(search_rows, backend=counter, fullgraph=True), counter


def test_compiled_build_index_matches_eager(device):
    """kmeans runs the pca tree too, so this covers every clustering step. Blocks of 64 keep the pca tree (and the
    compile, ~25 s of CPU) short."""
    k, v, mask = random_layer(0, device)
    settings = dict(block_size=64, branching=2, clustering="kmeans", kmeans_iters=1, sink_tokens=2, window_tokens=16)
    eager = build_index(k, v, mask, capacity=320, **settings)
    compiled = torch.compile(build_index, fullgraph=True)(k, v, mask, capacity=320, **settings)
    for name in ("keys", "values", "valid", "rank", "leaf_first", "leaf_last", "n_valid", "next_slot"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert len(compiled.levels) == len(eager.levels)
    for level, (c, e) in enumerate(zip(compiled.levels, eager.levels)):
        for field in dataclasses.fields(c):
            tc, te = getattr(c, field.name), getattr(e, field.name)
            torch.testing.assert_close(tc, te, rtol=1e-5, atol=1e-4, msg=f"level {level} {field.name}")


def test_compiled_search_matches_eager_and_never_recompiles(compiled_search, device):
    """20 searches with new queries, new keys (a rebuild every 5 steps) and appended tokens, shapes unchanged."""
    fn, counter = compiled_search
    k, v, mask = random_layer(1, device)
    index = build_index(k, v, mask, **BUILD)
    q = random_rows(0, device)
    assert_same_selection(fn(index, q, THRESHOLD), search_rows(index, q, THRESHOLD))
    graphs = counter.frame_count
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(1, 21):
            if step % 5 == 0:
                k, v, mask = random_layer(100 + step, device)
                index = build_index(k, v, mask, **BUILD)
            else:
                new = torch.randn(B, H, 2, D, generator=torch.Generator().manual_seed(step)).to(device)
                append(index, new, new, torch.tensor([[True, True], [True, False]], device=device))
            q = random_rows(step, device)
            assert_same_selection(fn(index, q, THRESHOLD), search_rows(index, q, THRESHOLD))
        with pytest.raises(Exception, match="recompil"):  # the stance does catch a recompile (here: a new shape)
            fn(index, random_rows(0, device)[:, :, :3], THRESHOLD)
    assert counter.frame_count == graphs == 1


def test_attend_path_does_not_recompile(device):
    """20 decode steps of search + attend + append on one index: no new flex_attention graph, and each step's
    output is attention over the selected keys (appended ones included)."""
    k, v, mask = random_layer(2, device)
    cfg = HiraConfig(block_size=BS, branching=2, sink_tokens=2, window_tokens=16)
    index = hira.build_index(k, v, cfg, key_mask=mask, capacity=CAPACITY)
    threshold = TopK(2)

    def step(seed):
        q = torch.randn(B, H * G, S, D, generator=torch.Generator().manual_seed(seed)).to(device)
        sel = hira.search(index, q, threshold)
        out, _ = hira.attend(q, index, sel)
        return q, sel, out

    step(0)  # warm-up: compiles this shape if no earlier test did
    graphs = counters["stats"]["unique_graphs"]
    all_k, all_v, all_m = [k], [v], [mask]
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(1, 21):
            q, sel, out = step(i)
            keys, values, m = torch.cat(all_k, 2), torch.cat(all_v, 2), torch.cat(all_m, 1)
            ref = dense_reference(q, keys, values, kept_tokens(index, sel.keep, m), D**-0.5)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            new_k, new_v = torch.randn(2, B, H, 3, D, generator=torch.Generator().manual_seed(1000 + i)).to(device)
            new_m = real_mask(None, B, 3, device)
            append(index, new_k, new_v, new_m)
            all_k.append(new_k)
            all_v.append(new_v)
            all_m.append(new_m)
    assert counters["stats"]["unique_graphs"] == graphs
    assert int(index.next_slot) == 160 + 60
