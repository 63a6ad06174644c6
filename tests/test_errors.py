"""Bad input fails early with a ValueError that says what is wrong (the public API validates; tensor code does not)."""

import math

import pytest
import torch

import hira
from hira import Certified, Fixed, HiraConfig, Threshold, TopK, TopP
from hira.index.index import append
from hira.selection.threshold import from_name

B, H, N, D = 2, 2, 40, 16
CFG = HiraConfig(block_size=16)


def layer(device, dtype=torch.float32):
    """keys, values [B, H, N, D] on device."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(2))


@pytest.fixture
def index(device):
    return hira.build_index(*layer(device), CFG)


def query(device, Hq=2 * H, S=1, dtype=torch.float32):
    return torch.randn(B, Hq, S, D).to(device, dtype)


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[len(t.view(-1)) // 2] = value
    return t


# --- build_index -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda k, v: (k[:, :, :-1], v), "same shape"),
        (lambda k, v: (k[0], v[0]), "must have 4 dims"),
        (lambda k, v: (k.long(), v), "keys must be float32, bfloat16 or float16, got torch.int64"),
        (lambda k, v: (k.double(), v.double()), "keys must be float32, bfloat16 or float16, got torch.float64"),
        (lambda k, v: (k, v.half()), "share dtype"),
        (lambda k, v: (k.numpy() if k.device.type == "cpu" else k.tolist(), v), "keys must be a torch.Tensor"),
        (lambda k, v: (with_value(k, math.nan), v), "keys holds NaN or inf"),
        (lambda k, v: (with_value(k, math.inf), v), "keys holds NaN or inf"),
        (lambda k, v: (k, with_value(v, -math.inf)), "values holds NaN or inf"),
        (lambda k, v: (k[:, :, :0], v[:, :, :0]), "cannot index an empty cache"),
    ],
    ids=["shapes", "ndim", "int", "float64", "mixed-dtypes", "not-a-tensor", "nan-key", "inf-key", "inf-value",
         "empty"],
)
def test_build_index_rejects_bad_keys(make, match, device):
    keys, values = make(*layer(device))
    with pytest.raises(ValueError, match=match):
        hira.build_index(keys, values, CFG)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(B, N + 1, dtype=torch.bool), r"key_mask must be a bool tensor of shape \(2, 40\)"),
        (torch.ones(N, dtype=torch.bool), r"key_mask must be a bool tensor of shape \(2, 40\)"),
        (torch.ones(B, N, dtype=torch.int64), r"key_mask must be a bool tensor .* got torch.int64"),
        (torch.ones(B, N), r"key_mask must be a bool tensor .* got torch.float32"),
        (torch.arange(N).expand(B, N) < torch.tensor([[N], [0]]), r"key_mask rows \[1\] have no real token"),
    ],
    ids=["long", "1d", "int", "float", "empty-row"],
)
def test_build_index_rejects_bad_key_mask(mask, match, device):
    with pytest.raises(ValueError, match=match):
        hira.build_index(*layer(device), CFG, key_mask=mask.to(device))


def test_build_index_rejects_too_small_capacity(device):
    with pytest.raises(ValueError, match="capacity must be at least the number of keys N=40"):
        hira.build_index(*layer(device), CFG, capacity=N - 1)


def test_append_past_capacity_says_the_index_is_full(device):
    index = hira.build_index(*layer(device), CFG, capacity=64)  # 3 blocks built (48 slots), 16 free
    new = torch.randn(B, H, 17, D).to(device)
    with pytest.raises(ValueError, match="the Hira index is full: capacity 64 slots, 48 used, 17 more asked"):
        append(index, new, new)
    append(index, new[:, :, :16], new[:, :, :16])  # exactly fills it


# --- HiraConfig --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=48), "block_size must be a power of two in \\[16, 128\\], got 48"),
        (dict(block_size=8), "block_size must be a power of two in \\[16, 128\\], got 8"),
        (dict(block_size=256), "block_size must be a power of two in \\[16, 128\\], got 256"),
        (dict(block_size=0), "block_size must be a power of two"),
        (dict(block_size=64.0), "block_size must be a power of two"),
        (dict(branching=1), "branching must be an integer >= 2"),
        (dict(clustering="hnsw"), "clustering must be one of"),
        (dict(kmeans_iters=0), "kmeans_iters must be an integer >= 1"),
        (dict(threshold=0.99), "threshold must be a hira.Threshold"),
        (dict(threshold="topp"), "threshold must be a hira.Threshold"),
        (dict(sink_tokens=-1), "sink_tokens must be an integer >= 0"),
        (dict(window_tokens=1.5), "window_tokens must be an integer >= 0"),
        (dict(max_cache_len=0), "max_cache_len must be -1"),
        (dict(dense_layers=(0, -2)), "dense_layers must hold layer indices >= 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiraConfig(**kwargs)


# --- Threshold ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Fixed(math.nan), "Fixed needs a finite τ or -inf, got nan"),
        (lambda: Fixed(math.inf), "Fixed needs a finite τ or -inf, got inf"),
        (lambda: Fixed("1.5"), "Fixed needs a finite τ or -inf, got '1.5'"),
        (lambda: Certified(0.0), "Certified needs 0 < eps < 1, got 0.0"),
        (lambda: Certified(1.0), "Certified needs 0 < eps < 1"),
        (lambda: Certified(math.nan), "Certified needs 0 < eps < 1"),
        (lambda: Certified(None), "Certified needs 0 < eps < 1, got None"),
        (lambda: TopK(0), "TopK needs an integer k >= 1, got 0"),
        (lambda: TopK(2.5), "TopK needs an integer k >= 1, got 2.5"),
        (lambda: TopK(math.inf), "TopK needs an integer k >= 1, got inf"),
        (lambda: TopK(math.nan), "TopK needs an integer k >= 1, got nan"),
        (lambda: TopK(True), "TopK needs an integer k >= 1, got True"),
        (lambda: TopP(0.0), "TopP needs 0 < p <= 1, got 0.0"),
        (lambda: TopP(1.5), "TopP needs 0 < p <= 1"),
        (lambda: TopP(math.nan), "TopP needs 0 < p <= 1"),
        (lambda: from_name("top-k", 3), "unknown threshold mode 'top-k': expected one of"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_threshold_rejects_bad_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_threshold_is_one_of_its_modes():
    with pytest.raises(TypeError, match="abstract"):
        Threshold()


@pytest.mark.parametrize("threshold", [0.99, 0, "topk", None.__class__], ids=["float", "zero", "str", "type"])
def test_search_rejects_a_threshold_that_is_not_a_threshold(threshold, index, device):
    with pytest.raises(ValueError, match="threshold must be a hira.Threshold"):
        hira.search(index, query(device), threshold)


# --- search / attend ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: query(d, Hq=3), "q has 3 heads, not a multiple of the index's 2 KV heads"),
        (lambda d: query(d)[:1], r"q must be \[B=2, Hq, S, D=16\]"),
        (lambda d: query(d)[..., :8], r"q must be \[B=2, Hq, S, D=16\]"),
        (lambda d: query(d)[:, :, :0], r"q has no query positions \(S=0\)"),
        (lambda d: query(d)[0], "q must have 4 dims"),
        (lambda d: query(d, dtype=torch.float64), "q must be float32, bfloat16 or float16, got torch.float64"),
        (lambda d: query(d).int(), "q must be float32, bfloat16 or float16, got torch.int32"),
        (lambda d: with_value(query(d), math.nan), "q holds NaN or inf"),
        (lambda d: with_value(query(d), -math.inf), "q holds NaN or inf"),
    ],
    ids=["heads", "batch", "head-dim", "no-positions", "ndim", "float64", "int", "nan", "inf"],
)
def test_search_and_attend_reject_bad_queries(make, match, index, device):
    q = make(device)
    with pytest.raises(ValueError, match=match):
        hira.search(index, q)
    sel = hira.search(index, query(device))
    with pytest.raises(ValueError, match=match):
        hira.attend(q, index, sel)


@pytest.mark.parametrize("scale", [0.0, -0.1, math.nan, math.inf, "0.1x"])
def test_search_and_attend_reject_a_bad_scale(scale, index, device):
    q = query(device)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        hira.search(index, q, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        hira.attend(q, index, hira.search(index, q), scale=scale)


def test_attend_rejects_a_selection_made_for_other_queries(index, device):
    sel = hira.search(index, query(device, S=2))
    with pytest.raises(ValueError, match=r"the selection was made for \(2, 2, 4\) query rows, q gives \(2, 2, 2\)"):
        hira.attend(query(device, S=1), index, sel)


def test_attend_rejects_a_selection_from_another_index(index, device):
    bigger = hira.build_index(*layer(device), CFG, capacity=96)  # 6 blocks instead of 3
    with pytest.raises(ValueError, match="the selection covers 6 blocks but the index has 3"):
        hira.attend(query(device), index, hira.search(bigger, query(device)))


@pytest.mark.parametrize(
    "extra, match",
    [
        (lambda d: (torch.randn(B, H, 3, D).to(d), torch.randn(B, H, 4, D).to(d)), "extra_kv must be two"),
        (lambda d: (torch.randn(B, 1, 3, D).to(d),) * 2, r"extra_kv must be two \[B=2, Hkv=2, T, D=16\] tensors"),
        (lambda d: (torch.randn(B, H, 3, D).double().to(d),) * 2, "extra_kv\\[0\\] must be float32"),
        (lambda d: (with_value(torch.randn(B, H, 3, D), math.nan).to(d),) * 2, "extra_kv keys holds NaN or inf"),
        (lambda d: (torch.randn(B, H, 3, D).to(d), with_value(torch.randn(B, H, 3, D), math.inf).to(d)),
         "extra_kv values holds NaN or inf"),
    ],
    ids=["t-mismatch", "heads", "float64", "nan-key", "inf-value"],
)
def test_attend_rejects_bad_extra_kv(extra, match, index, device):
    q = query(device)
    sel = hira.search(index, q)
    with pytest.raises(ValueError, match=match):
        hira.attend(q, index, sel, extra_kv=extra(device))


def test_attend_rejects_bad_extra_mask(index, device):
    q = query(device)
    sel = hira.search(index, q)
    kv = (torch.randn(B, H, 3, D).to(device),) * 2
    wrong = r"extra_mask must be a bool tensor of shape \(2, 3\), got torch.bool \(2, 4\)"
    with pytest.raises(ValueError, match=wrong):
        hira.attend(q, index, sel, extra_kv=kv, extra_mask=torch.ones(B, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="extra_mask must be a bool tensor .* got torch.float32"):
        hira.attend(q, index, sel, extra_kv=kv, extra_mask=torch.ones(B, 3, device=device))


def test_decode_attention_validates_like_its_parts(device):
    k, v = layer(device)
    with pytest.raises(ValueError, match="q has 3 heads"):
        hira.decode_attention(query(device, Hq=3), k, v, CFG)
    with pytest.raises(ValueError, match="keys must be float32"):
        hira.decode_attention(query(device), k.double(), v.double(), CFG)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_query_on_another_device_is_rejected():
    index = hira.build_index(*layer("cuda"), CFG)
    with pytest.raises(ValueError, match="q is on cpu but the index is on cuda"):
        hira.search(index, query("cpu"))
