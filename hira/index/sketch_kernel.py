"""A Triton kernel for the key sketch on CUDA: per block and query row, the max and the log-sum-exp of q·k̃.

The tensor program (``hira.index.sketch.key_scores``) produces q·k̃ for every key, [B, H, R, C], and then reduces it
per block; the unpacked codes or the per-key scores make it read several times the sketch's bytes (0.51 ms at 128K
on an H100). Here a program reads its blocks' codes once, as int32 words (byte loads ran at 0.3 TB/s), unpacks them
in registers, and writes only the per-block results: one block per program on the CUDA cores, up to four
consecutive blocks per program on the tensor cores (head dims 64, 128, 256, …), where the codes' order in storage
(``hira.index.sketch.nibble_channels``) makes each int32 word two float16 pairs of the product's inputs by a mask
and an or: 1.48 TB/s at 128K and 2.03 at 512K on the H200 (benchmarks/NOTES.md §34).

Registered as an opaque custom operator: inductor does not analyse the kernel (as a ``triton_op`` inside the compiled
step, the search's kernels were read with wrong dependencies, benchmarks/NOTES.md §17). Imported on CUDA
(``hira.index.sketch``); the CPU path stays the tensor program, which the tests compare with, also with this kernel
in triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hira.index.bounds import margin_factor
from hira.index.sketch import HALF_STEP


@triton.jit
def _block_stats_kernel(
    q_ptr, words_ptr, lo_ptr, step_ptr, valid_ptr, max_ptr, lse_ptr,
    H, NB, C,
    R: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (b, h, block). The codes are read as int32 words: bits 4t–4t+3 of word i hold channel
    8i + 2(t % 4) + t // 4 (``hira.index.sketch.nibble_channels``)."""
    pid = tl.program_id(0)  # (b, h, n) flattened
    n = pid % NB
    bh = pid // NB
    b = bh // H
    s = tl.arange(0, BS)
    i = tl.arange(0, BLOCK_W)
    words = tl.load(words_ptr + (bh * C + n * BS + s)[:, None] * W + i[None, :], mask=(i < W)[None, :], other=0)
    plane = (bh * NB + n) * D
    real = tl.load(valid_ptr + b * C + n * BS + s) != 0
    for r in range(R):
        qrow = q_ptr + (bh * R + r) * D
        base = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc = tl.zeros([BS, BLOCK_W], dtype=tl.float32)  # reduced once per row, not once per nibble
        for t in tl.static_range(8):
            ch = 8 * i + 2 * (t % 4) + t // 4
            inside = ch < D
            qc = tl.load(qrow + ch, mask=inside, other=0.0)
            lo = tl.load(lo_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
            st = tl.load(step_ptr + plane + ch, mask=inside, other=0.0).to(tl.float32)
            base += qc * lo
            acc += ((words >> (4 * t)) & 15).to(tl.float32) * (qc * st)[None, :]
        est = tl.where(real, tl.sum(base, axis=0) + tl.sum(acc, axis=1), float("-inf"))
        m = tl.max(est, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(tl.exp(est - m_safe), axis=0))
        out = (bh * R + r) * NB + n
        tl.store(max_ptr + out, m)
        tl.store(lse_ptr + out, lse)


# The tensor-core kernel's rounding of q·step to float16, per unit of Σ|c|·|q·step| (c ≤ 15): half an ulp of float16
# (2^-11) plus the float32 division before it (2^-22 with slack), and per unit of max|q·step| and channel, the
# subnormal floor: 2^-25 of the weights scaled to max 1, and for the tiles then divided by 16 (``_weight_tiles``),
# whose division may round again below 2^-14, 2^-25 + 2^-21 (in the units of max 1): 2^-20 with slack.
DOT_REL_ERROR = 2.0**-11 + 2.0**-22
DOT_ABS_ERROR = 2.0**-20


@triton.jit
def _code_tile(x, MASK: tl.constexpr):
    """[BS, 2W] float16 from int32 words x [BS, W]: the two nibbles MASK selects in each word (bits 0–3 and 16–19,
    or 4–7 and 20–23), the word's two side by side. (x & MASK) | 0x64006400 is a pair of float16 values, 1024 + c
    or 1024 + 16c (the bits lie in the mantissa), exact; less 1024, c or 16c. The pair is already the tensor cores'
    register of two adjacent inputs: no permute (the channel-ordered codes of an earlier layout took ~400 permutes
    per four blocks to interleave, benchmarks/NOTES.md §34)."""
    h = (x & MASK) | 0x64006400
    lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    BS: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    return tl.reshape(tl.join(lo, hi), (BS, 2 * W)) - 1024.0


@triton.jit
def _weight_tiles(wn):
    """wn [N, D] float16 (channel order) -> the four [D/4, N] tiles of ``_block_dot``: tile u holds channels
    8i + 2u + b at row 2i + b, tiles 1 and 3 divided by 16 (their codes come as 16c)."""
    N: tl.constexpr = wn.shape[0]
    D: tl.constexpr = wn.shape[1]
    x = tl.permute(tl.reshape(wn, (N, D // 8, 4, 2)), (0, 1, 3, 2))  # (n, i, b, u)
    even, odd = tl.split(tl.reshape(x, (N, D // 8, 2, 2, 2)))  # u = 2·u1 + u0, split on u0: (n, i, b, u1)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return (tl.trans(tl.reshape(w0, (N, D // 4))), tl.trans(tl.reshape(w1, (N, D // 4)) * 0.0625),
            tl.trans(tl.reshape(w2, (N, D // 4))), tl.trans(tl.reshape(w3, (N, D // 4)) * 0.0625))


@triton.jit
def _block_dot(words, w0, w1, w2, w3):
    """[BS, N] float32: one block's codes (its int32 words [BS, W]) times every column of the weights, as four
    products of K = D/4, one per pair of nibbles (``hira.index.sketch.nibble_channels``)."""
    high = words >> 8
    acc = tl.dot(_code_tile(words, 0x000F000F), w0)
    acc = tl.dot(_code_tile(words, 0x00F000F0), w1, acc)
    acc = tl.dot(_code_tile(high, 0x000F000F), w2, acc)
    return tl.dot(_code_tile(high, 0x00F000F0), w3, acc)


@triton.jit
def _block_words(words_ptr, bh, C, n, NB, BS: tl.constexpr, W: tl.constexpr):
    """Block n's codes as [BS, W] int32 words (0 past the last block)."""
    s = tl.arange(0, BS)
    i = tl.arange(0, W)
    return tl.load(words_ptr + (bh * C + n * BS + s)[:, None] * W + i[None, :], mask=n < NB, other=0)


@triton.jit
def _block_stats_dot_kernel(
    q_ptr, words_ptr, lo_ptr, step_ptr, valid_ptr, max_ptr, lse_ptr, half_ptr,
    H, NB, C, NG, per_step, per_lo, per_max,
    R: tl.constexpr, R_PAD: tl.constexpr, G: tl.constexpr, N: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
    BS: tl.constexpr,
):
    """One program per (b, h, group of G ≤ 4 consecutive blocks), every row at once. Column c of the product is row
    c % R_PAD of block c // R_PAD. Each block's codes are multiplied on the tensor cores by every column of q·step
    (scaled to max 1 per column and rounded to float16), the same four weight tiles for every block, and the block
    keeps its own columns of the result, so that the epilogue (the scale, the validity, max and log-sum-exp over the
    keys) runs once for G blocks with every column real where G·R_PAD = 16.

    Each column's half-width comes from the same tiles (``half_width_terms``): per_step·Σ|q·step| + per_lo·Σ|q·lo| +
    per_max·max|q·step|.

    Every load comes first, the G blocks' codes at once: a layout change or a reduction is a barrier, and a load
    written after one waits for everything before it."""
    pid = tl.program_id(0)
    g = pid % NG
    bh = pid // NG
    b = bh // H
    n0 = g * G
    words0 = _block_words(words_ptr, bh, C, n0, NB, BS, W)
    if G > 1:
        words1 = _block_words(words_ptr, bh, C, n0 + 1, NB, BS, W)
    if G > 2:
        words2 = _block_words(words_ptr, bh, C, n0 + 2, NB, BS, W)
        words3 = _block_words(words_ptr, bh, C, n0 + 3, NB, BS, W)
    c = tl.arange(0, N)
    r = c % R_PAD
    block_of_col = c // R_PAD
    n = n0 + block_of_col  # [N]
    real_col = (r < R) & (block_of_col < G) & (n < NB)
    d = tl.arange(0, D)
    s = tl.arange(0, BS)
    plane = (bh * NB + n)[:, None] * D + d[None, :]  # [N, D]
    lo = tl.load(lo_ptr + plane, mask=real_col[:, None], other=0.0).to(tl.float32)
    step = tl.load(step_ptr + plane, mask=real_col[:, None], other=0.0).to(tl.float32)
    q = tl.load(q_ptr + (bh * R + r)[:, None] * D + d[None, :], mask=real_col[:, None], other=0.0)
    real = tl.load(valid_ptr + b * C + n[None, :] * BS + s[:, None], mask=real_col[None, :], other=0) != 0  # [BS, N]
    base = tl.sum(q * lo, axis=1)  # [N]
    w = q * step
    scale = tl.max(tl.abs(w), axis=1)
    half = per_step * tl.sum(tl.abs(w), axis=1) + per_lo * tl.sum(tl.abs(q * lo), axis=1) + per_max * scale
    out = (bh * R + r) * NB + n
    # Stored at once: live across the products, it took an earlier form of the kernel from 172 to 242 registers
    # and from 55 to 67 µs at 128K on the H200 (benchmarks/NOTES.md §33).
    tl.store(half_ptr + out, half, mask=real_col)
    scale = tl.where(scale > 0, scale, 1.0)
    w0, w1, w2, w3 = _weight_tiles((w / scale[:, None]).to(tl.float16))
    dot = _block_dot(words0, w0, w1, w2, w3)
    if G > 1:
        dot = tl.where((block_of_col == 1)[None, :], _block_dot(words1, w0, w1, w2, w3), dot)
    if G > 2:
        dot = tl.where((block_of_col == 2)[None, :], _block_dot(words2, w0, w1, w2, w3), dot)
        dot = tl.where((block_of_col == 3)[None, :], _block_dot(words3, w0, w1, w2, w3), dot)
    est = tl.where(real, base[None, :] + dot * scale[None, :], float("-inf"))
    m = tl.max(est, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(tl.exp(est - m_safe[None, :]), axis=0))
    tl.store(max_ptr + out, m, mask=real_col)
    tl.store(lse_ptr + out, lse, mask=real_col)


def dot_launch(R: int, G: int | None = None) -> dict:
    """``_block_stats_dot_kernel``'s launch for R rows: G consecutive blocks per program (default 16 columns' worth
    of rows: R ≤ 4 takes 4 blocks, 8 takes 2, 1 to 4), the product's N columns, 4 warps (128 registers: four
    programs per SM). At 128K and 512K (R 4, H200) the kernel took 48.4 / 140.6 µs at 4 blocks per program and 4
    warps; a copy of it 50.5 / 153.0 at 2 blocks, 52.4 / 160.4 at 4 blocks and 8 warps, 92.7 / 310.7 at 8 blocks and
    8 warps (benchmarks/NOTES.md §34; ``benchmarks/bench_search_kernel.py --parts sketch`` sweeps it)."""
    r_pad = triton.next_power_of_2(R)
    if G is None:
        G = max(1, min(4, 16 // r_pad))
    return dict(R_PAD=r_pad, G=G, N=max(16, G * r_pad), num_warps=4)


def dot_applies(D: int) -> bool:
    """Whether ``sketch_block_stats_dot`` takes head dim D: a power of two of at least 64 (each of its four products
    is over D/4 channels, and the tensor cores take at least 16)."""
    return D >= 64 and D & (D - 1) == 0


@torch.library.custom_op("hira::sketch_block_stats_dot", mutates_args=())
def sketch_block_stats_dot(
    q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sketch_block_stats`` on the tensor cores (``dot_applies(D)``): the same max and log-sum-exp up to
    ``dot_error``, and a half-width that covers both, at most ``hira.index.sketch.half_width`` plus ``dot_error``
    (``half_width_terms``), each [B, H, R, NB] float32."""
    B, H, R, D = q.shape
    NB = lo.shape[2]
    C = codes.shape[2]
    words = codes.contiguous().view(torch.int32)
    out_max = torch.empty(B, H, R, NB, device=q.device, dtype=torch.float32)
    out_lse = torch.empty_like(out_max)
    out_half = torch.empty_like(out_max)
    launch = dot_launch(R)
    NG = triton.cdiv(NB, launch["G"])
    _block_stats_dot_kernel[(B * H * NG,)](
        q.contiguous(), words, lo.contiguous(), step.contiguous(), valid.contiguous(),
        out_max, out_lse, out_half, H, NB, C, NG, *half_width_terms(D),
        R=R, D=D, W=D // 8, BS=C // NB, **launch,
    )
    return out_max, out_lse, out_half


def half_width_terms(D: int) -> tuple[float, float, float]:
    """The tensor-core kernel's half-width, as factors of Σ|q·step|, Σ|q·lo| and max|q·step| per block and row:

    - the quantisation error, HALF_STEP·Σ|q·step| (as in ``hira.index.sketch.half_width``);
    - the float32 rounding of computing q·k̃ = q·lo + Σ c·(q·step) with c ≤ 15: ``margin_factor``'s ulps per term
      times Σ|q·lo| + 15·Σ|q·step|, which is at most ``half_width``'s ‖q‖·(‖lo‖ + 15‖step‖) (Cauchy–Schwarz); the
      kernel's products are float32 FMAs and exact products of float16 inputs, so no TF32 allowance;
    - the float16 rounding of q·step: ``dot_error``'s terms, its subnormal floor per unit of max|q·step| itself
      rather than of max|q|·max step (the larger).

    So it is at most ``half_width`` plus ``dot_error``, and needs no norm: two sums more per column than the scan
    already takes."""
    rounding = margin_factor(D, False)
    return (HALF_STEP + 15 * DOT_REL_ERROR + 15 * rounding, rounding, 15 * DOT_ABS_ERROR * D)


def dot_error(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B, H, R, NB]: a bound on |q·k̃ from ``sketch_block_stats_dot`` − q·k̃| for q [B, H, R, D] float32 and the
    sketch's step [B, H, NB, D]: the float16 rounding of q·step times codes up to 15."""
    qa, st = q.abs(), step.float()
    D = q.shape[-1]
    return 15 * (DOT_REL_ERROR * (qa @ st.transpose(-1, -2))
                 + DOT_ABS_ERROR * D * qa.amax(-1)[..., None] * st.amax(-1)[:, :, None, :])


@torch.library.custom_op("hira::sketch_block_stats", mutates_args=())
def sketch_block_stats(
    q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block and row: max and log-sum-exp of the sketch scores q·k̃ over the block's real keys (-inf if none).

    Args:
        q: [B, H, R, D] float32, D a multiple of 8; codes: [B, H, C, D/2] uint8; lo, step: [B, H, NB, D] bfloat16;
            valid: [B, C] bool.
    Returns:
        (max, lse), each [B, H, R, NB] float32.
    """
    B, H, R, D = q.shape
    NB = lo.shape[2]
    C = codes.shape[2]
    words = codes.contiguous().view(torch.int32)  # [B, H, C, D / 8]: the caller ensures D % 8 == 0
    W = words.shape[3]
    out_max = torch.empty(B, H, R, NB, device=q.device, dtype=torch.float32)
    out_lse = torch.empty_like(out_max)
    _block_stats_kernel[(B * H * NB,)](
        q.contiguous(), words, lo.contiguous(), step.contiguous(), valid.contiguous(),
        out_max, out_lse, H, NB, C,
        R=R, D=D, W=W, BS=C // NB, BLOCK_W=triton.next_power_of_2(W), num_warps=2,
    )
    return out_max, out_lse


def _stats_like(q, codes, lo, step, valid):
    """The fake of ``sketch_block_stats``: (max, lse) [B, H, R, NB] each."""
    out = q.new_empty(q.shape[:3] + lo.shape[2:3])
    return out, torch.empty_like(out)


sketch_block_stats.register_fake(_stats_like)


@sketch_block_stats_dot.register_fake
def _(q, codes, lo, step, valid):
    top, lse = _stats_like(q, codes, lo, step, valid)
    return top, lse, torch.empty_like(top)
