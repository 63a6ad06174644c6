"""What the benchmarks share: one module, imported by every ``bench_*.py`` (from the repository root or from
benchmarks/, after ``sys.path.insert(0, <benchmarks folder>)``).

Model
    ``LLAMA3_8B``, ``SMOKE_MODEL``, ``FULL_LAYERS``, ``DTYPE``; ``make_model``: a Llama of those shapes with random
    bf16 weights.
Synthetic keys (Llama-3-8B attention shapes ``HQ``, ``HKV``, ``D``, ``G``)
    ``structured_row``: keys with realistic structure (recurring topics, dominant directions, sinks, recency);
    ``topic_kv``: keys around 64 recurring topic directions plus noise.
Timing
    ``sync``; ``bench``: median ms (do_bench on CUDA, a host clock on CPU); ``timed_ms``: median ms of single calls
    (CUDA events, a host clock on CPU); ``Clock``: timestamps (CUDA events or a host clock); ``capture_graph`` and
    ``graph_ms``: CUDA-graph capture and the replay's median ms; ``copy_bandwidth``: device copy bytes/s.
Compiles
    ``unique_graphs``: dynamo's graph count; ``Timed``: the graphs compiled inside a block run under
    ``fail_on_recompile``.
Report
    ``parse_size`` / ``fmt_size`` (128K, 1M); ``fmt_num`` (a float or "—"); ``pct``; ``cell`` (text for one table
    cell); ``md_table`` (headers and rows to a markdown table); ``device_name``; ``write_report`` (markdown and a
    JSON beside it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time

import torch

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), less the layer count.
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)
FULL_LAYERS = 32
# --smoke: the same GQA ratio (4) at a size a CPU decodes in milliseconds.
SMOKE_MODEL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                   intermediate_size=512, vocab_size=1024, rope_theta=500000.0, rms_norm_eps=1e-5)
DTYPE = torch.bfloat16
# Llama-3-8B's attention: query heads, KV heads, head dim, query heads per KV head.
HQ, HKV, D = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
G = HQ // HKV


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


def make_model(shape: dict, layers: int, max_positions: int, device: torch.device, seed: int):
    """A ``LlamaForCausalLM`` with the given shapes and random weights, built on the meta device and initialised in
    bf16 in place (normal std 0.02; norms 1), so that no float32 copy of the weights is ever made."""
    # transformers is imported here only: the kernel benchmarks do not need it.
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=max_positions,
        rms_norm_eps=shape["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(DTYPE).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # The rotary frequencies are buffers computed at construction: recompute them, in float32.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Synthetic keys
# --------------------------------------------------------------------------------------------------------------


def structured_row(N: int, seed: int, device, sinks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch row with realistic structure (NOT iid noise): keys, values [1, HKV, N, D] and the row's queries
    [1, HQ, 1, D], all bf16.

    Keys = shared offset + topic-cluster centre (runs of 32 tokens share a topic; ~N/512 topics recur all over the
    context) + 4 dominant directions (std 4, 3, 2, 1.5) + noise 0.5; the first ``sinks`` tokens are attention sinks
    (norm 40 along a sink direction); the most recent tokens carry a decaying recency direction (scale 256 tokens).
    Queries aim at 2 topic centres per head (weights 9 and 6), mix the dominant directions, and lean towards the
    sink and recency directions. At 32K with 4 sinks this gives (row 0, median over query rows) 90% of the softmax
    mass in ~0.1% of the keys, 99% in ~1-2%, ~10% on the sinks: in the range DESIGN.md §2b measured on a real model.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    f = dict(device=device, dtype=torch.float32)
    H = HKV
    nc = max(16, N // 512)
    mu = torch.randn(H, 1, D, generator=gen, **f) * 0.6
    dirs = torch.linalg.qr(torch.randn(H, D, 4, generator=gen, **f))[0].transpose(1, 2).contiguous()  # [H, 4, D]
    centers = torch.randn(H, nc, D, generator=gen, **f)
    run = 32
    cid = torch.randint(nc, (H, -(-N // run)), generator=gen, device=device).repeat_interleave(run, 1)[:, :N]
    k = torch.gather(centers, 1, cid[..., None].expand(H, N, D))
    del cid
    coef = torch.randn(H, N, 4, generator=gen, **f) * torch.tensor([4.0, 3.0, 2.0, 1.5], device=device)
    k += torch.bmm(coef, dirs)
    del coef
    k += mu
    k += 0.5 * torch.randn(H, N, D, generator=gen, **f)
    sink_dir = torch.randn(H, 1, D, generator=gen, **f)
    sink_dir /= sink_dir.norm(dim=-1, keepdim=True)
    k[:, :sinks] = sink_dir * 40.0 + 0.3 * torch.randn(H, sinks, D, generator=gen, **f)
    loc_dir = torch.randn(H, 1, D, generator=gen, **f)
    loc_dir /= loc_dir.norm(dim=-1, keepdim=True)
    age = torch.arange(N - 1, -1, -1, device=device, dtype=torch.float32)
    k += loc_dir * (30.0 * torch.exp(-age / 256.0))[None, :, None]
    keys = k.to(DTYPE)[None]
    del k
    values = torch.randn(1, H, N, D, generator=gen, **f).to(DTYPE)
    tgt = torch.randint(nc, (H, G, 2), generator=gen, device=device)
    c = centers[torch.arange(H, device=device)[:, None, None], tgt]  # [H, G, 2, D]
    c = c / c.norm(dim=-1, keepdim=True)
    q = (c * torch.tensor([9.0, 6.0], device=device)[:, None]).sum(2)  # [H, G, D]
    q += torch.bmm(torch.randn(H, G, 4, generator=gen, **f) * 2.0, dirs)
    q += sink_dir * 4.0 + loc_dir * 4.0
    q += 0.5 * torch.randn(H, G, D, generator=gen, **f)
    return keys, values, q.reshape(1, HQ, 1, D).to(DTYPE)


def topic_kv(N: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v [1, HKV, N, D] and q [1, HQ, 1, D], bf16, the same for a seed on every rank: keys around 64 recurring
    topic directions (so blocks differ in score), plus noise; no sinks, runs or recency (``structured_row`` has
    them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    topics = torch.randn(1, HKV, 64, D, device=device, generator=gen)
    which = torch.randint(0, 64, (1, HKV, N), device=device, generator=gen)
    k = torch.gather(topics, 2, which[..., None].expand(1, HKV, N, D))
    k = (k + 0.5 * torch.randn(1, HKV, N, D, device=device, generator=gen)).to(DTYPE)
    v = torch.randn(1, HKV, N, D, device=device, generator=gen, dtype=DTYPE)
    q = (2 * torch.randn(1, HQ, 1, D, device=device, generator=gen)).to(DTYPE)
    return k, v, q


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: torch.device, rep_ms: float) -> float:
    """Median ms of fn(): triton's do_bench on CUDA (L2 flushed before each rep), else a host clock over about
    ``rep_ms`` ms of calls (at least 3, at most 200) after one untimed call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timed_ms(fn, device: torch.device, reps: int, warm: int = 3) -> float:
    """Median ms of ``reps`` calls after ``warm`` calls, each call between two CUDA events (a host clock on CPU); L2
    is not flushed. Every caller makes the same number of calls: fn may be a collective."""
    for _ in range(warm):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


class Clock:
    """CUDA events on CUDA, a host clock on CPU. ``mark()`` returns a timestamp; ``ms(a, b)`` the time between two
    (after a synchronize on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def capture_graph(fn, warm: int = 3):
    """Warm fn up on a side stream (``warm`` calls), capture one call in a CUDA graph and replay it once; returns
    (graph, the captured call's outputs: static tensors that each replay rewrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return g, out


def graph_ms(fn, device: torch.device, rep_ms: float) -> float:
    """Median ms (``bench``) of replays of fn captured in a CUDA graph (``capture_graph``)."""
    g, _ = capture_graph(fn)
    return bench(g.replay, device, rep_ms)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), best of 5; NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 29, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * a.numel() * a.element_size() / best


# --------------------------------------------------------------------------------------------------------------
# Compiles
# --------------------------------------------------------------------------------------------------------------


def unique_graphs() -> int:
    """Dynamo graphs compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Timed:
    """Counts dynamo graphs compiled inside the block (``.recompiles``), which runs with the fail_on_recompile
    stance."""

    def __enter__(self):
        self.before = unique_graphs()
        self.stance = torch.compiler.set_stance("fail_on_recompile")
        self.stance.__enter__()
        return self

    def __exit__(self, *exc):
        self.stance.__exit__(*exc)
        self.recompiles = unique_graphs() - self.before
        return False


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def parse_size(s: str) -> int:
    """A token count as written on a command line: 2048, 32K (×1024), 1M or 1.5M (×1024²)."""
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def fmt_size(n: float, approx: bool = False) -> str:
    """A token count for a table: exactly (1M, 128K, 3000), or with ``approx`` rounded to 0.1M from 1M on and to
    1K below (1.5M, 374K)."""
    if approx:
        if n >= 1024 * 1024:
            return f"{n / (1024 * 1024):.1f}M".replace(".0M", "M")
        return f"{n / 1024:.0f}K"
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def fmt_num(x, nd: int = 2) -> str:
    """x with ``nd`` decimals; "—" for None or NaN."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal: 0.1234 -> 12.3%."""
    return f"{100 * x:.1f}%"


def cell(msg, n: int = 160, start: tuple[str, ...] = ()) -> str:
    """Text for one table cell: no newlines or pipes, at most ``n`` characters. Each marker of ``start`` found in
    the text, in turn, drops what comes before it (an error's informative part)."""
    msg = str(msg)
    for key in start:
        if key in msg:
            msg = msg[msg.index(key):]
    return " ".join(msg.replace("|", "/").split())[:n]


def md_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table: a header row, the separator, then one line per row (each cell ``str()``-ed). A row with
    fewer cells than headers ends in empty cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" + " |" * (len(headers) - len(r)) for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name, else the CPU's (or "cpu")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def write_report(path: str, text: str, data: dict) -> None:
    """``text`` (markdown) to ``path`` and ``data`` as JSON (indent 1; what JSON lacks as str) beside it, .json; the
    folder is made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as fh:
        json.dump(data, fh, indent=1, default=str)
